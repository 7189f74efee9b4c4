"""generate.py: same images as diffusers with load_lora_weights, safe file names, settings in the PNG."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import generate
from conftest import randomize_up
from lora_diffusion import inject_trainable_lora
from sdlora.lora_file import LoRAError
from sdlora.settings import ConfigError


def random_lora(tiny_model_dir, path: Path, seed: int, with_text_encoder: bool) -> Path:
    """A LoRA file with non-zero weights on a fresh copy of the tiny model (rank 4, alpha 2: alpha != rank)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    network = inject_trainable_lora(pipe.unet, rank=4, alpha=2.0,
                                    text_encoder=pipe.text_encoder if with_text_encoder else None)
    randomize_up(network, seed, std=0.2)
    return network.save(path)


def generate_config(tiny_model_dir, output_dir, *extra: str):
    return generate.parse_config([
        "--pretrained_model_name_or_path", str(tiny_model_dir), "--output_dir", str(output_dir),
        "--height", "64", "--width", "64", "--num_inference_steps", "4", "--num_images", "2", "--seed", "7",
        "--prompt", "a photo of a cat", "--guidance_scale", "5.0", *extra,
    ])


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_images_equal_diffusers_with_load_lora_weights(tiny_model_dir, tmp_path):
    """Two LoRAs at their own multipliers, fused: the PNGs equal diffusers' images with the same LoRAs loaded
    by load_lora_weights and set_adapters (within 2/255 per pixel, for fused-vs-unfused float rounding)."""
    from diffusers import StableDiffusionPipeline

    first = random_lora(tiny_model_dir, tmp_path / "first.safetensors", seed=1, with_text_encoder=True)
    second = random_lora(tiny_model_dir, tmp_path / "second.safetensors", seed=2, with_text_encoder=False)
    cfg = generate_config(tiny_model_dir, tmp_path / "out", "--lora", f"{first}:0.7", f"{second}:0.5")
    paths = generate.main(cfg)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    pipe.load_lora_weights(str(first), adapter_name="first")
    pipe.load_lora_weights(str(second), adapter_name="second")
    pipe.set_adapters(["first", "second"], adapter_weights=[0.7, 0.5])
    for index in range(2):
        reference = pipe("a photo of a cat", num_inference_steps=4, guidance_scale=5.0, height=64, width=64,
                         generator=torch.Generator("cpu").manual_seed(7 + index)).images[0]
        difference = np.abs(pixels(paths[index]) - np.asarray(reference, dtype=np.int16))
        # In 8-bit levels of 255, relative to the image's range: fp32 rounding of fused against unfused weights
        # (~1e-6) moves a pixel far less than one level; 2 allows a value rounded to either side twice over.
        assert difference.max() <= 2, f"image {index} differs by up to {difference.max()}/255"
    base = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    base_image = base("a photo of a cat", num_inference_steps=4, guidance_scale=5.0, height=64, width=64,
                      generator=torch.Generator("cpu").manual_seed(7)).images[0]
    assert np.abs(pixels(paths[0]) - np.asarray(base_image, dtype=np.int16)).max() > 2, "the LoRA must show"


def test_png_carries_settings_and_names_never_come_from_the_prompt(tiny_model_dir, tmp_path):
    """A hostile prompt never reaches a file name; each PNG has its settings; a grid of all images is saved."""
    lora_path = random_lora(tiny_model_dir, tmp_path / "l.safetensors", seed=3, with_text_encoder=False)
    prompt = "../../etc/passwd: " + "x" * 500
    cfg = generate_config(tiny_model_dir, tmp_path / "out", "--lora", str(lora_path), "--prompt", prompt,
                          "--negative_prompt", "blurry")
    paths = generate.main(cfg)
    assert len(paths) == 3 and all(p.parent == tmp_path / "out" and len(p.name) < 40 for p in paths)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths)
    text = Image.open(paths[1]).text["parameters"]
    assert text.startswith(prompt) and "Negative prompt: blurry" in text and "Seed: 8" in text
    assert "Steps: 4" in text and "CFG scale: 5.0" in text and "Lora: l.safetensors:1.0" in text
    assert Image.open(paths[-1]).size == (128, 64)


def test_prompts_file_gives_num_images_per_prompt(tiny_model_dir, tmp_path):
    """Each non-comment line of the prompts file is a prompt; image i of the run uses seed + i."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\na cat\n\na dog\n", encoding="utf-8")
    cfg = generate_config(tiny_model_dir, tmp_path / "out", "--lora", "--prompts_file", str(prompts))
    paths = generate.main(cfg)
    seeds = [Image.open(p).text["parameters"].split("Seed: ")[1].split(",")[0] for p in paths[:-1]]
    firsts = [Image.open(p).text["parameters"].splitlines()[0] for p in paths[:-1]]
    assert seeds == ["7", "8", "9", "10"] and firsts == ["a cat", "a cat", "a dog", "a dog"]


@pytest.mark.parametrize("spec, expected", [
    ("out/a.safetensors", (Path("out/a.safetensors"), 1.0)),
    ("out/a.safetensors:0.6", (Path("out/a.safetensors"), 0.6)),
    ("C:\\loras\\a.safetensors:-1", (Path("C:\\loras\\a.safetensors"), -1.0)),
    ("C:\\loras\\a.safetensors", (Path("C:\\loras\\a.safetensors"), 1.0)),
])
def test_lora_spec_parsing(spec, expected):
    """PATH[:MULTIPLIER]: the last colon splits only when a number follows."""
    assert generate.parse_lora_spec(spec) == expected


def test_missing_lora_and_bad_settings_are_refused(tiny_model_dir, tmp_path):
    """A missing LoRA file, an unknown scheduler and a bad size are refused naming the option."""
    with pytest.raises(ConfigError, match="--lora .*missing.safetensors: file not found"):
        generate.main(generate_config(tiny_model_dir, tmp_path, "--lora", str(tmp_path / "missing.safetensors")))
    (tmp_path / "fake.safetensors").write_text("not a safetensors file")
    with pytest.raises(LoRAError, match="fake.safetensors is not a readable safetensors file"):
        generate.check_config(generate_config(tiny_model_dir, tmp_path, "--lora", str(tmp_path / "fake.safetensors")))
    with pytest.raises(ConfigError, match="--scheduler 'k_lms'"):
        generate.main(generate_config(tiny_model_dir, tmp_path, "--lora", "--scheduler", "k_lms"))
    with pytest.raises(ConfigError, match="--height 100"):
        generate.main(generate_config(tiny_model_dir, tmp_path, "--lora", "--height", "100"))
