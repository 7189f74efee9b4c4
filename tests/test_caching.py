"""Latent and text-embedding caches: training with them is training without them, and they are never stale."""

import json
import shutil

import torch
from safetensors.torch import load_file

from sdlora import caching
import train_lora
from conftest import REPO_ROOT
from dataset import CustomDataset


def run(tiny_model_dir, output_dir, *extra: str):
    cfg = train_lora.parse_config([
        "--pretrained_model_name_or_path", str(tiny_model_dir), "--dataset_path", str(REPO_ROOT / "examples/dataset"),
        "--output_dir", str(output_dir), "--resolution", "64", "--max_train_steps", "6", "--checkpointing_steps", "2",
        "--random_flip", "true", "--learning_rate", "1e-3", "--sample_prompts", *extra])
    return train_lora.main(cfg)


def losses(output_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (output_dir / "loss_log.jsonl").read_text().splitlines()]


def test_cached_training_equals_uncached_training(tiny_model_dir, tmp_path):
    """Same seed: the cached run logs the same loss at every step and ends with the same LoRA, bitwise."""
    cached = load_file(str(run(tiny_model_dir, tmp_path / "cached")))
    uncached = load_file(str(run(tiny_model_dir, tmp_path / "uncached", "--cache_latents", "false",
                                 "--cache_text_embeddings", "false")))
    assert losses(tmp_path / "cached") == losses(tmp_path / "uncached")
    assert all(torch.equal(cached[k], uncached[k]) for k in uncached)


def test_resume_with_caches_is_exact(tiny_model_dir, tmp_path):
    """A cached run resumed from a mid-run checkpoint ends bitwise equal to the uninterrupted cached run."""
    reference = load_file(str(run(tiny_model_dir, tmp_path / "reference")))
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "reference" / "checkpoint-4", tmp_path / "resumed" / "checkpoint-4")
    resumed = load_file(str(run(tiny_model_dir, tmp_path / "resumed", "--resume_from_checkpoint", "latest")))
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


def test_disk_cache_is_reused_and_a_changed_image_is_encoded_again(tiny_model_dir, tmp_path, monkeypatch):
    """The disk cache serves unchanged images without the VAE and re-encodes exactly the image that changed."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_model_dir, subfolder="vae")
    encoded = []
    original = caching.latent_distribution
    monkeypatch.setattr(caching, "latent_distribution", lambda v, p: encoded.append(1) or original(v, p))
    data_dir = tmp_path / "data"
    shutil.copytree(REPO_ROOT / "examples" / "dataset", data_dir)
    dataset = CustomDataset(data_dir, resolution=64, random_flip=True)
    first = caching.encode_latent_cache(dataset, vae, tmp_path / "cache", "tiny|fp32")
    assert len(encoded) == 8 and len(list((tmp_path / "cache").glob("*.safetensors"))) == 8  # 4 images x 2 flips
    again = caching.encode_latent_cache(dataset, vae, tmp_path / "cache", "tiny|fp32")
    assert len(encoded) == 8 and all(torch.equal(first[k][0], again[k][0]) for k in first)

    from PIL import Image
    Image.open(data_dir / "coffee.jpg").rotate(90).save(data_dir / "coffee.jpg")
    changed = CustomDataset(data_dir, resolution=64, random_flip=True)
    after = caching.encode_latent_cache(changed, vae, tmp_path / "cache", "tiny|fp32")
    assert len(encoded) == 10, "only the changed image's two variants are encoded again"
    coffee = [e.path.name for e in changed.examples].index("coffee.jpg")
    assert not torch.equal(after[(coffee, False)][0], first[(coffee, False)][0])
    caching.encode_latent_cache(changed, vae, tmp_path / "cache", "tiny|bf16")
    assert len(encoded) == 18, "another VAE precision is another cache"


def test_caches_switch_off_with_a_note_when_settings_rule_them_out(tiny_model_dir, tmp_path, capsys):
    """Random crops turn the latent cache off, a training text encoder the text cache, each with one line."""
    run(tiny_model_dir, tmp_path / "out", "--center_crop", "false", "--train_text_encoder", "true",
        "--max_train_steps", "1")
    printed = capsys.readouterr().out
    assert "latent cache off: random crops" in printed and "text-embedding cache off: the text encoder" in printed
