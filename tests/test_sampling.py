"""Samples and validation loss during training: prompts file, step-0 base images, fixed-noise validation loss."""

import json

import pytest
import torch
from safetensors.torch import load_file

from sdlora import sampling
import train_lora
from conftest import REPO_ROOT
from sdlora.loading import NO_FP32_PARTS, load_encoders, load_text_encoder
from sdlora.preflight import held_out_dataset
from sdlora.training_data import make_dataset
from sdlora.validation import ValidationSet, validation_loss
from sdlora.sampling import PromptFileError, SamplePrompt, parse_prompt_line, read_prompts_file

DEFAULTS = SamplePrompt("", seed=10, steps=25, guidance_scale=7.5, width=512, height=512)


def test_prompt_line_options_are_parsed():
    """Every kohya-style option lands in its field; the prompt keeps its commas; unset fields keep defaults."""
    sample = parse_prompt_line("a dog, on a beach --n blurry, dark --d 7 --s 30 --l 6.5 --w 256 --h 384 --m 0.5",
                               DEFAULTS, "p.txt line 1")
    assert sample == SamplePrompt("a dog, on a beach", "blurry, dark", 7, 30, 6.5, 256, 384, 0.5)
    assert parse_prompt_line("plain", DEFAULTS, "x") == SamplePrompt("plain", seed=10)


@pytest.mark.parametrize("line, message", [
    ("a dog --q 3", "line 2: unknown option --q"),
    ("a dog --s many", "line 2: --s needs a int, got 'many'"),
    ("--n blurry", "line 2: the line has options but no prompt"),
    ("a dog --w 100", "line 2: --w/--h must be positive multiples of 8"),
])
def test_bad_prompt_lines_are_named_by_line_number(tmp_path, line, message):
    """A bad line is refused with the file name, its line number and what is wrong."""
    path = tmp_path / "prompts.txt"
    path.write_text(f"# comment\n{line}\n", encoding="utf-8")
    with pytest.raises(PromptFileError, match=f"prompts.txt {message}"):
        read_prompts_file(path, DEFAULTS)


def test_prompts_file_seeds_count_from_the_base_seed(tmp_path):
    """Lines without --d get seed + their index among prompts (comments and blank lines do not count)."""
    path = tmp_path / "p.txt"
    path.write_text("one\n\n# skip\ntwo --d 99\nthree\n", encoding="utf-8")
    assert [p.seed for p in read_prompts_file(path, DEFAULTS)] == [10, 99, 12]


def run(tiny_model_dir, output_dir, *extra):
    cfg = train_lora.parse_config([
        "--pretrained_model_name_or_path", str(tiny_model_dir), "--dataset_path", str(REPO_ROOT / "examples/dataset"),
        "--output_dir", str(output_dir), "--resolution", "64", "--max_train_steps", "4", "--checkpointing_steps", "2",
        "--learning_rate", "1e-3", "--sample_steps", "2", "--sample_inference_steps", "2", *extra])
    return train_lora.main(cfg)


def test_prompts_file_samples_at_step_zero_and_every_n_steps(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """With a prompts file the run draws every prompt at step 0 (base model), every sample_steps and at the
    end, at each line's own size; the validation split gives a loss at 0, every validation_loss_steps and at the end,
    and the summary names the best checkpoint. A last step that falls on the schedule is sampled and
    validated once, not twice."""
    sampled_steps = []
    original = train_lora.save_samples

    def counting_save_samples(*args):
        sampled_steps.append(args[-1])
        return original(*args)
    monkeypatch.setattr(train_lora, "save_samples", counting_save_samples)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat --w 64 --h 128 --m 0\na rocket --d 3\n", encoding="utf-8")
    run(tiny_model_dir, tmp_path / "out", "--sample_prompts_file", str(prompts), "--validation_split", "0.25",
        "--validation_loss_steps", "2")
    samples = tmp_path / "out" / "samples"
    for step in (0, 2, 4):
        assert (samples / f"step{step:06d}-grid.png").is_file()
        assert (samples / f"step{step:06d}-01.png").is_file()
    from PIL import Image
    assert Image.open(samples / "step000002-00.png").size == (64, 128)
    rows = [json.loads(line) for line in (tmp_path / "out" / "val_loss_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 2, 4]
    assert sampled_steps == [0, 2, 4]
    assert "best by validation loss:" in capsys.readouterr().out


def test_validation_loss_is_bitwise_repeatable_and_moves_with_the_weights(tiny_model_dir):
    """Two evaluations of the same weights give the identical number; changing the LoRA changes it."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from lora_diffusion import inject_trainable_lora

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    network = inject_trainable_lora(unet)
    scheduler = DDPMScheduler.from_pretrained(tiny_model_dir, subfolder="scheduler")
    g = torch.Generator().manual_seed(0)
    latents = [torch.randn(4, 8, 8, generator=g) for _ in range(2)]
    embeddings = [torch.randn(77, 32, generator=g) for _ in range(2)]

    def autocast():
        return torch.autocast("cpu", enabled=False)

    first = validation_loss(latents, embeddings, unet, scheduler, 42, autocast)
    assert first == validation_loss(latents, embeddings, unet, scheduler, 42, autocast)
    torch.nn.init.normal_(network.parameters()[1])
    assert validation_loss(latents, embeddings, unet, scheduler, 42, autocast) != first


def test_validation_loss_sees_the_text_encoder_lora(tiny_model_dir, tmp_path):
    """With a text-encoder LoRA the logged validation loss is the trained pair's (UNet and text encoder both with
    the LoRA), not the trained UNet's on the base encoder's embeddings."""
    from contextlib import nullcontext

    from diffusers import UNet2DConditionModel

    from sdlora.lora_file import fuse_lora_file

    cfg = train_lora.parse_config([
        "--pretrained_model_name_or_path", str(tiny_model_dir), "--dataset_path", str(REPO_ROOT / "examples/dataset"),
        "--output_dir", str(tmp_path / "out"), "--resolution", "64", "--max_train_steps", "4",
        "--checkpointing_steps", "0", "--sample_steps", "0", "--sample_prompts", "--learning_rate", "1e-3",
        "--train_text_encoder", "--text_encoder_lr", "3e-2", "--validation_split", "0.25"])
    final = train_lora.main(cfg)
    logged = json.loads((tmp_path / "out" / "val_loss_log.jsonl").read_text().splitlines()[-1])
    assert logged["step"] == 4

    held_out = held_out_dataset(cfg, make_dataset(cfg, cfg.dataset_path))
    tokenizer, base_encoder, vae, scheduler = load_encoders(str(tiny_model_dir), torch.float32, NO_FP32_PARTS)
    trained_encoder = load_text_encoder(str(tiny_model_dir), torch.float32)
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    fuse_lora_file(final, unet, trained_encoder, 1.0)
    losses = {}
    for name, encoder in (("trained", trained_encoder), ("base", base_encoder)):
        data = ValidationSet(held_out, vae, tokenizer, encoder, vae.config.scaling_factor, False)
        losses[name] = validation_loss(data.latents, data.embeddings(None), unet, scheduler, cfg.seed,
                                                  nullcontext)
    # Relative to the loss (near 1): fused weights against the LoRA path round differently by ~1e-6 of a UNet's
    # output (equal here); the base encoder's loss differs by 7e-3, so 1e-5 and 1e-3 keep the two apart.
    assert losses["trained"] == pytest.approx(logged["val_loss"], rel=1e-5)
    assert losses["base"] != pytest.approx(logged["val_loss"], rel=1e-3)


def test_sampling_failure_never_stops_training(tiny_model_dir, tmp_path, monkeypatch, caplog):
    """If drawing a sample raises, the error is logged and training finishes with fp32 LoRA weights."""
    def broken_pipeline_call(*args, **kwargs):
        raise RuntimeError("out of memory while sampling")

    monkeypatch.setattr("diffusers.StableDiffusionPipeline.__call__", broken_pipeline_call)
    final = run(tiny_model_dir, tmp_path / "out", "--sample_prompts", "a cat", "--mixed_precision", "bf16")
    assert "sampling at step 0 failed; training goes on" in caplog.text and "out of memory" in caplog.text
    assert all(t.dtype == torch.float32 for t in load_file(str(final)).values())
    assert (tmp_path / "out" / "checkpoint-4").is_dir()


def test_sample_images_restores_the_multiplier_and_training_mode(tmp_path):
    """After sampling (even a failed one) the LoRA multiplier is 1 and the UNet is back in training mode."""
    class FakeNetwork:
        multiplier = 1.0

        def set_multiplier(self, value):
            self.multiplier = value

    class FakePipeline:
        unet = torch.nn.Linear(1, 1)

        def __call__(self, *args, **kwargs):
            raise RuntimeError("boom")

    network, pipeline = FakeNetwork(), FakePipeline()
    pipeline.unet.train()
    sampling.sample_images(pipeline, network, [SamplePrompt("x", multiplier=0.0)], tmp_path, 1,
                           lambda: torch.autocast("cpu", enabled=False))
    assert network.multiplier == 1.0 and pipeline.unet.training
