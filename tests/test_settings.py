"""settings.py: the constants-as-flags convention both scripts share."""

import pytest

import generate
from sdlora import settings
import train_lora


def test_a_bare_boolean_flag_means_true_and_an_explicit_value_still_parses():
    """`--train_text_encoder` alone is true; `--random_flip false` is false; neighbours are left as they were."""
    cfg = train_lora.parse_config(["--train_text_encoder", "--gradient_checkpointing", "--random_flip", "false",
                                   "--rank", "8"])
    assert cfg.train_text_encoder is True and cfg.gradient_checkpointing is True
    assert cfg.random_flip is False and cfg.rank == 8
    assert cfg.center_crop is train_lora.center_crop  # untouched default
    cfg = train_lora.parse_config(["--random_flip", "--train_text_encoder", "off"])
    assert cfg.random_flip is True and cfg.train_text_encoder is False


def test_a_boolean_flag_with_a_word_that_is_not_true_or_false_is_refused(capsys):
    """`--random_flip maybe` stops at parsing and says which values are accepted."""
    with pytest.raises(SystemExit):
        train_lora.parse_config(["--random_flip", "maybe"])
    assert "expected true or false, got 'maybe'" in capsys.readouterr().err


def test_generate_flags_follow_the_same_convention():
    """generate.py's flags are built the same way: a flag per constant, typed like its default."""
    cfg = generate.parse_config(["--num_images", "2", "--guidance_scale", "3.5"])
    assert cfg.num_images == 2 and cfg.guidance_scale == 3.5 and cfg.seed == generate.seed


@pytest.mark.parametrize("cuda, bf16, expected", [(False, False, "no"), (True, False, "fp16"), (True, True, "bf16")])
def test_auto_precision_fits_the_machine(monkeypatch, cuda, bf16, expected):
    """`auto` is bf16 on a GPU that has it, fp16 on other GPUs and no (fp32) on a CPU; an explicit choice stands."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    assert settings.resolve_precision("auto") == expected
    assert settings.resolve_precision("bf16") == "bf16"
    assert train_lora.mixed_precision == generate.mixed_precision == "auto"  # the two scripts agree


def test_training_records_the_precision_auto_chose(tiny_model_dir, tmp_path, capsys):
    """A run left at `auto` says what it chose and saves that, not `auto`, in config.json."""
    import json

    from conftest import REPO_ROOT

    cfg = train_lora.parse_config([
        "--pretrained_model_name_or_path", str(tiny_model_dir), "--dataset_path", str(REPO_ROOT / "examples/dataset"),
        "--output_dir", str(tmp_path), "--resolution", "64", "--max_train_steps", "1", "--validation_prompts"])
    train_lora.main(cfg)
    assert "mixed precision: auto -> no (no GPU)" in capsys.readouterr().out
    assert json.loads((tmp_path / "config.json").read_text())["mixed_precision"] == "no"
