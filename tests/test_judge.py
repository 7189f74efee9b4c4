"""The checkpoint judge (sdlora/judge.py, `evaluate.py judge`, `judge_checkpoints`) and early stopping: the pick is
copied with its judgement and nothing else in the run folder changes; DINO and CLIP load through the real
transformers code (tiny random models saved at test time); every bad input is one clear error."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import ViTConfig, ViTImageProcessor, ViTModel

import evaluate
import train_lora
from conftest import REPO_ROOT
from sdlora import judge as judge_module
from sdlora import validation
from sdlora.files import sha256_file
from sdlora.judge import BEST_FILE_NAME, Judge, JudgeError, judge_run, mean_cosine
from sdlora.lora_file import LORA_FILE_NAME
from sdlora.settings import ConfigError
from test_evaluate import build_tiny_clip

TRIGGER = "sks thing"


def run_config(tiny_model_dir, output_dir, *extra: str):
    """4 steps of the tiny random model, a checkpoint every 2, samples drawn in 2 sampler steps."""
    return train_lora.parse_config([
        "--pretrained_model_name_or_path", str(tiny_model_dir), "--dataset_path", str(REPO_ROOT / "examples/dataset"),
        "--output_dir", str(output_dir), "--resolution", "64", "--max_train_steps", "4", "--checkpointing_steps", "2",
        "--checkpoints_total_limit", "0", "--sample_prompts", "--sample_inference_steps", "2",
        "--learning_rate", "1e-2", "--trigger_phrase", TRIGGER, "--judge_samples_per_prompt", "1",
        "--judge_multipliers", "0.5", "1.0", "--interop_check", "false", *extra])


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("judged_run")
    train_lora.main(run_config(tiny_model_dir, output_dir))
    return output_dir


@pytest.fixture(scope="module")
def scorer_folders(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny random DINO-style ViT and a tiny random CLIP, saved as `save_pretrained` writes them."""
    root = tmp_path_factory.mktemp("scorers")
    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4), add_pooling_layer=False).save_pretrained(root / "dino")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "dino")
    model, processor = build_tiny_clip()  # the random CLIP the CLIP-score tests use
    model.save_pretrained(root / "clip")
    processor.save_pretrained(root / "clip")
    return root / "dino", root / "clip"


def folder_hashes(run_dir: Path) -> dict[str, str]:
    return {str(path.relative_to(run_dir)): sha256_file(path) for path in sorted(run_dir.rglob("*"))
            if path.is_file() and (path.name == LORA_FILE_NAME or "checkpoint-" in str(path))}


def test_judge_scores_every_checkpoint_and_copies_the_pick_leaving_the_run_alone(trained_run, scorer_folders):
    """2 checkpoints x 2 multipliers scored by DINO, CLIP-I, CLIP-T and the VAE; the pick's tensors copied with which
    checkpoint, multiplier and scores in the metadata; no checkpoint or final file changed; the report shows it."""
    dino, clip = scorer_folders
    before = folder_hashes(trained_run)
    evaluate.main(["judge", str(trained_run), "--dino_model", str(dino), "--clip_model", str(clip)])
    assert folder_hashes(trained_run) == before
    rows = (trained_run / "judge" / "judge.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 2  # the final file has checkpoint-4's step: judged once
    header = rows[0].split(",")
    first = dict(zip(header, rows[1].split(",")))
    assert all(first[name] for name in ("fidelity_dino", "fidelity_clip", "fidelity_vae", "clip_t", "prior_dino"))
    assert first["features"] == "dino" and 0 <= float(first["score"]) <= 1
    recommendation = json.loads((trained_run / "judge" / "recommendation.json").read_text())
    chosen = trained_run / recommendation["file"]
    best = trained_run / BEST_FILE_NAME
    assert load_file(str(best)).keys() == load_file(str(chosen)).keys()
    assert all(torch.equal(t, load_file(str(chosen))[k]) for k, t in load_file(str(best)).items())
    with safe_open(str(best), "pt") as f:
        metadata = f.metadata()
    assert metadata["judge_checkpoint"] == recommendation["checkpoint"]
    assert float(metadata["judge_multiplier"]) == recommendation["multiplier"] in (0.5, 1.0)
    assert json.loads(metadata["judge_scores"])["score"] == pytest.approx(recommendation["scores"]["score"])
    assert recommendation["skipped"] == []
    assert "Which checkpoint to use" in (trained_run / "report.html").read_text()
    assert (trained_run / "judge" / "grid.png").is_file()


def test_judge_without_scorer_weights_scores_what_it_can_and_names_what_it_skipped(trained_run, capsys):
    """No DINO or CLIP folder: VAE-feature fidelity and prior only, and the skipped scores named with where to get
    their weights."""
    recommendation = judge_run(trained_run, {"multipliers": [1.0]})
    assert recommendation["scores"]["features"] == "vae" and "prompt_fidelity" not in recommendation["scores"]
    out = capsys.readouterr().out
    assert "skipped DINO" in out and "facebook/dino-vits16" in out and "skipped CLIP-I" in out


def test_identical_images_score_no_gain_and_the_prior_fully_kept(trained_run, monkeypatch):
    """A LoRA drawn at a multiplier so small its images equal the base model's: fidelity gain 0, prior kept 1."""
    judge = Judge(trained_run, {"multipliers": [1e-9]})
    rows = judge.judge_candidate(judge_module.candidates(trained_run)[0])
    assert rows[0].scores["fidelity_gain"] == pytest.approx(0, abs=1e-6)
    assert rows[0].scores["prior_kept"] == pytest.approx(1, abs=1e-6)


def test_mean_cosine_never_exceeds_the_ceiling_the_rule_divides_by():
    """mean_j cos(x, t_j) <= |mean_j t_j / |t_j||: the judge's fidelity gain cannot pass 1."""
    generator = torch.Generator().manual_seed(0)
    train = torch.randn(6, 10, generator=generator) + 1
    ceiling = float(torch.nn.functional.normalize(train.double(), dim=1).mean(0).norm())
    candidates = torch.randn(50, 10, generator=generator)
    assert max(mean_cosine(x[None], train) for x in candidates) <= ceiling + 1e-12
    along = torch.nn.functional.normalize(train, dim=1).mean(0, keepdim=True)
    assert mean_cosine(along, train) == pytest.approx(ceiling)


def test_a_run_folder_without_checkpoints_is_refused_naming_the_fix(tmp_path):
    """A folder with a config but no checkpoint or final file: one line naming the folder and checkpointing_steps."""
    (tmp_path / "config.json").write_text(json.dumps({"pretrained_model_name_or_path": "x", "resolution": 64}))
    with pytest.raises(SystemExit) as exited:
        evaluate.main(["judge", str(tmp_path)])
    assert "no valid checkpoint-<step> folder" in str(exited.value) and "checkpointing_steps" in str(exited.value)
    with pytest.raises(SystemExit, match="no config.json"):
        evaluate.main(["judge", str(tmp_path / "nowhere")])


def test_a_file_from_another_base_model_is_refused_before_any_image(trained_run, tmp_path, monkeypatch):
    """A LoRA file whose base_model is another model's: refused with its path, before the pipeline loads."""
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("config.json", "data_report.json"):
        (copy / name).write_bytes((trained_run / name).read_bytes())
    tensors = load_file(str(trained_run / LORA_FILE_NAME))
    with safe_open(str(trained_run / LORA_FILE_NAME), "pt") as f:
        metadata = dict(f.metadata(), base_model="runwayml/stable-diffusion-v1-5", step="99")
    save_file(tensors, str(copy / LORA_FILE_NAME), metadata)
    monkeypatch.setattr(Judge, "load", lambda self: pytest.fail("the pipeline loaded before the check"))
    with pytest.raises(JudgeError, match="trained on 'runwayml/stable-diffusion-v1-5'") as error:
        Judge(copy).judge_all()
    assert str(copy / LORA_FILE_NAME) in str(error.value)


@pytest.mark.parametrize("flag, message", [
    ("--judge_dino_model", "judge_dino_model .*hf download facebook/dino-vits16"),
    ("--judge_clip_model", "judge_clip_model .*no model folder there"),
])
def test_missing_scorer_weights_stop_the_run_at_minute_zero(tiny_model_dir, tmp_path, flag, message):
    """judge_checkpoints with a scorer folder that holds no model: refused before training, naming the option."""
    with pytest.raises(ConfigError, match=message):
        train_lora.main(run_config(tiny_model_dir, tmp_path, "--judge_checkpoints", "true", flag,
                                   str(tmp_path / "missing")))
    assert not (tmp_path / "config.json").exists()


def test_evaluate_judge_with_missing_or_wrong_scorer_folders_names_them(trained_run, tmp_path, scorer_folders):
    """evaluate.py judge: a missing DINO folder, or a CLIP folder that holds a ViT, each one line naming the option."""
    with pytest.raises(SystemExit, match="judge_dino_model .*no model folder there.*hf download facebook/dino-vits16"):
        evaluate.main(["judge", str(trained_run), "--dino_model", str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="judge_clip_model .* holds a 'vit' model, not a 'clip' one"):
        evaluate.main(["judge", str(trained_run), "--clip_model", str(scorer_folders[0])])


def test_judge_prompts_without_the_trigger_phrase_are_refused(tiny_model_dir, tmp_path, trained_run):
    """A judge prompt without the trigger phrase cannot show the subject: refused at minute 0 and by evaluate.py."""
    with pytest.raises(ConfigError, match="'a thing on the beach' does not contain the trigger phrase 'sks thing'"):
        train_lora.main(run_config(tiny_model_dir, tmp_path, "--judge_checkpoints", "true",
                                   "--judge_prompts", "a thing on the beach"))
    with pytest.raises(SystemExit, match="does not contain the trigger phrase"):
        evaluate.main(["judge", str(trained_run), "--prompts", "a thing on the beach"])


def test_judge_checkpoints_at_the_end_of_a_run_reuses_early_stoppings_images(tiny_model_dir, tmp_path, monkeypatch,
                                                                              capsys):
    """With early stopping by the judge, each checkpoint is drawn once, before it is saved; the judgement at the end
    draws nothing again (1 base set + 2 checkpoints x 2 multipliers) and names its pick in the summary."""
    draws = []
    original = Judge.draw
    monkeypatch.setattr(Judge, "draw", lambda self: draws.append(1) or original(self))
    train_lora.main(run_config(tiny_model_dir, tmp_path, "--judge_checkpoints", "true",
                               "--early_stopping_patience", "5"))
    assert len(draws) == 1 + 2 * 2
    assert (tmp_path / BEST_FILE_NAME).is_file() and "judge: use checkpoint-" in capsys.readouterr().out
    assert not list(tmp_path.glob(".judging-*"))


def test_early_stopping_stops_after_patience_and_keeps_the_best_checkpoint(tiny_model_dir, tmp_path, monkeypatch,
                                                                           capsys):
    """Held-out losses 1.0, 0.5, 0.6, 0.7 at checkpoints 2, 4, 6, 8 with patience 2: the run ends at step 8 (not 20),
    keeps checkpoint-4 although checkpoints_total_limit is 1, and says so; the record travels in the checkpoint."""
    losses = iter([9.0, 1.0, 0.5, 0.6, 0.7, 0.8, 0.9])  # step 0 (the base model) first
    monkeypatch.setattr(validation, "validation_loss", lambda *args: next(losses))
    final = train_lora.main(run_config(tiny_model_dir, tmp_path, "--max_train_steps", "20", "--validation_split",
                                       "0.5", "--early_stopping_patience", "2", "--checkpoints_total_limit", "1"))
    with safe_open(str(final), "pt") as f:
        assert f.metadata()["step"] == "8"
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    state = json.loads((tmp_path / "checkpoint-8" / "training_state.json").read_text())
    assert state["early_stopping"] == {"best_step": 4, "best_score": -0.5, "since_best": 2}
    assert "stopped early: no better score in 2 evaluations after checkpoint-4" in capsys.readouterr().out


def weight_size_as_loss(latents, embeddings, unet, *args) -> float:
    """A held-out "loss" that is a function of the LoRA weights only (their L1 size: it grows as they train), so a
    resumed run, holding the same weights at the same step, sees the same values."""
    return float(sum(p.detach().abs().sum() for p in unet.parameters() if p.requires_grad))


def test_early_stopping_resumed_after_a_kill_stops_where_the_whole_run_stops(tiny_model_dir, tmp_path, monkeypatch):
    """Killed in the save of checkpoint-6 and resumed: the run stops at the same step with the same LoRA and the same
    record (the record of checkpoint-4 comes back; checkpoint-6 is evaluated once more)."""
    from kill_runner import plant_save_fault

    monkeypatch.setattr(validation, "validation_loss", weight_size_as_loss)
    flags = ("--max_train_steps", "20", "--validation_split", "0.5", "--early_stopping_patience", "2")
    whole = train_lora.main(run_config(tiny_model_dir, tmp_path / "whole", *flags))

    class Killed(Exception):
        pass

    def kill(*args, **kwargs):
        raise Killed

    plant_save_fault("before_write", "checkpoint-6", kill, monkeypatch.setattr)
    with pytest.raises(Killed):
        train_lora.main(run_config(tiny_model_dir, tmp_path / "killed", *flags))
    monkeypatch.undo()
    monkeypatch.setattr(validation, "validation_loss", weight_size_as_loss)
    resumed = train_lora.main(run_config(tiny_model_dir, tmp_path / "killed", *flags,
                                         "--resume_from_checkpoint", "latest"))
    assert load_file(str(whole)).keys() == load_file(str(resumed)).keys()
    assert all(torch.equal(t, load_file(str(resumed))[k]) for k, t in load_file(str(whole)).items())
    records = [json.loads((run / "checkpoint-6" / "training_state.json").read_text())["early_stopping"]
               for run in (tmp_path / "whole", tmp_path / "killed")]
    assert records[0] == records[1] and records[0]["since_best"] == 2 and records[0]["best_step"] == 2
    for final in (whole, resumed):
        with safe_open(str(final), "pt") as f:
            assert f.metadata()["step"] == "6"


def test_early_stopping_without_a_score_is_refused(tiny_model_dir, tmp_path):
    """Patience without the judge and without held-out images has nothing to compare: refused at minute 0."""
    with pytest.raises(ConfigError, match="early_stopping_patience needs a score"):
        train_lora.main(run_config(tiny_model_dir, tmp_path, "--early_stopping_patience", "2"))
