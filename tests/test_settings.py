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


@pytest.mark.parametrize("old, new, values, expected", [
    ("validation_prompts", "sample_prompts", ["a", "b c"], ("a", "b c")),
    ("validation_steps", "sample_steps", ["7"], 7),
    ("validation_inference_steps", "sample_inference_steps", ["3"], 3),
    ("validation_guidance_scale", "sample_guidance_scale", ["2.5"], 2.5),
])
def test_an_old_flag_name_sets_the_new_setting_with_a_notice(capsys, old, new, values, expected):
    """A flag renamed in this release still works for one release: it sets the new name and says so in one line."""
    cfg = train_lora.parse_config([f"--{old}", *values])
    assert getattr(cfg, new) == expected and not hasattr(cfg, old)
    assert capsys.readouterr().err == f"note: --{old} is now --{new}; the old name goes in the next release\n"


def test_the_held_out_loss_has_its_own_cadence():
    """validation_loss_steps is apart from sample_steps and checkpointing_steps, and does not define the run."""
    cfg = train_lora.parse_config(["--sample_steps", "3", "--validation_loss_steps", "5"])
    assert (cfg.sample_steps, cfg.validation_loss_steps, cfg.checkpointing_steps) == (3, 5, 500)
    assert "validation_loss_steps" not in train_lora.RUN_DEFINING


def test_a_checkpoint_saved_under_old_setting_names_still_resumes(tmp_path):
    """A checkpoint written before a rename names the setting the old way; the comparison maps it to the new name."""
    import json

    from sdlora.checkpoints import STATE_JSON, check_resume_matches

    (tmp_path / STATE_JSON).write_text(json.dumps({"run_identity": {"validation_steps": 7, "rank": 4},
                                                   "dataset_fingerprint": "f"}))
    check_resume_matches(tmp_path, {"sample_steps": 7, "rank": 4}, "f", allow_changes=False)
    with pytest.raises(settings.ConfigError, match="sample_steps: checkpoint 7, now 8"):
        check_resume_matches(tmp_path, {"sample_steps": 8, "rank": 4}, "f", allow_changes=False)


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
        "--output_dir", str(tmp_path), "--resolution", "64", "--max_train_steps", "1", "--sample_prompts"])
    train_lora.main(cfg)
    assert "mixed precision: auto -> no (no GPU)" in capsys.readouterr().out
    assert json.loads((tmp_path / "config.json").read_text())["mixed_precision"] == "no"
