"""Runs that never lose work: kills at any moment, crashes inside the save, NaN, bad data, unsafe files."""

import json
import logging
import pickle
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sdlora import checkpoints, loading, training_step
import lora_diffusion
import train_lora
from conftest import REPO_ROOT
from kill_runner import plant_save_fault
from sdlora.lora_file import LORA_FILE_NAME, LoRAError
from sdlora.settings import ConfigError
from sdlora.stopping import TrainingStopped

KILL_PLAN = [  # 20 kills at set points of a 20-step run (checkpoints every 2 steps, 9 inside a save), then 2 timed
    ["step", 1, ""],  # before the first checkpoint: the next attempt starts afresh
    ["save", 2, "before_write"],  # the save has just begun
    ["save", 2, "mid_write"],  # half of the LoRA file written to its temporary name
    ["step", 3, ""],  # after step 3's update, between checkpoints
    ["save", 4, "before_rename"],  # every file written, folder not yet renamed into place
    ["step", 5, ""],
    ["save", 6, "before_manifest"],  # folder in place, manifest not written
    ["step", 6, ""],  # its loss logged, its checkpoint not yet begun
    ["save", 8, "mid_prune"],  # new checkpoint complete, old one half deleted
    ["step", 9, ""],
    ["step", 9, ""],  # the same point twice: a resume that is killed where it was killed before
    ["save", 10, "mid_write"],
    ["step", 11, ""],
    ["save", 12, "before_rename"],
    ["step", 13, ""],
    ["save", 14, "before_write"],
    ["step", 15, ""],
    ["save", 16, "before_manifest"],
    ["step", 17, ""],
    ["step", 19, ""],
    ["timer", 6, ""],  # wherever the process is 0.6 s after it starts
    ["timer", 9, ""],
]
DETERMINISTIC_KILLS = sum(1 for kind, _, _ in KILL_PLAN if kind != "timer")


def read_loss_log(path: Path) -> dict[str, dict[int, float]]:
    """{attempt: {step: loss}} from loss_log.jsonl (a line cut short by a kill is ignored)."""
    runs: dict[str, dict[int, float]] = defaultdict(dict)
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        runs[row["run"]][row["step"]] = row["loss"]
    return runs


def test_sigkill_anywhere_then_resume_is_bitwise_exact(tiny_model_dir, tmp_path):
    """A run SIGKILLed at every planned point (inside saves too) and resumed each time with
    --resume_from_checkpoint latest ends with LoRA tensors bitwise equal to an uninterrupted run's,
    and every attempt logged, for each step it ran, exactly the reference run's loss."""
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tests" / "kill_runner.py"), str(tiny_model_dir), str(tmp_path),
         json.dumps(KILL_PLAN)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    statuses = json.loads(result.stdout.strip().splitlines()[-1])
    assert statuses["reference"] == 0
    attempts = statuses["attempts"]
    assert [a["status"] for a in attempts[:DETERMINISTIC_KILLS]] == [-9] * DETERMINISTIC_KILLS, attempts
    assert attempts[-1]["status"] == 0
    # Killed at step 1 and twice inside the first save, the run had no checkpoint for its first 4 attempts.
    assert [a["resumed"] for a in attempts] == [False] * 4 + [True] * (len(attempts) - 4), attempts

    reference = load_file(str(tmp_path / "reference" / "pytorch_lora_weights.safetensors"))
    resumed = load_file(str(tmp_path / "killed" / "pytorch_lora_weights.safetensors"))
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)

    (reference_losses,) = read_loss_log(tmp_path / "reference" / "loss_log.jsonl").values()
    attempt_losses = read_loss_log(tmp_path / "killed" / "loss_log.jsonl")
    assert len(attempt_losses) >= DETERMINISTIC_KILLS
    for losses in attempt_losses.values():
        assert losses == {step: reference_losses[step] for step in losses}
    assert set().union(*attempt_losses.values()) == set(reference_losses) == set(range(1, 21))


class Crash(Exception):
    """Stands in for a kill: nothing after the crash point runs, so the files are left as a kill leaves them."""


def crash() -> None:
    raise Crash


def crash_at(monkeypatch, where: str, target: str) -> None:
    """Make the save of `target` stop at `where` (see KILL_PLAN) by raising Crash."""
    plant_save_fault(where, target, crash, monkeypatch.setattr)


def short_run(tiny_model_dir, output_dir, *extra: str):
    return train_lora.parse_config([
        "--pretrained_model_name_or_path", str(tiny_model_dir), "--dataset_path", str(REPO_ROOT / "examples/dataset"),
        "--output_dir", str(output_dir), "--resolution", "64", "--max_train_steps", "4", "--checkpointing_steps", "2",
        "--checkpoints_total_limit", "0", "--sample_prompts", *extra])


@pytest.mark.parametrize("where", ["before_write", "mid_write", "before_rename", "before_manifest"])
def test_crash_inside_save_leaves_previous_checkpoint_as_latest(tiny_model_dir, tmp_path, monkeypatch, where):
    """A save interrupted at any point leaves no valid-looking partial checkpoint: latest is the previous one."""
    crash_at(monkeypatch, where, "checkpoint-4")
    with pytest.raises(Crash):
        train_lora.main(short_run(tiny_model_dir, tmp_path))
    assert checkpoints.latest_valid_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    monkeypatch.undo()
    resumed = train_lora.main(short_run(tiny_model_dir, tmp_path, "--resume_from_checkpoint", "latest"))
    assert checkpoints.latest_valid_checkpoint(tmp_path) == tmp_path / "checkpoint-4" and resumed.is_file()


def test_corrupt_newest_checkpoint_is_skipped_with_a_warning(tiny_model_dir, tmp_path, caplog):
    """A truncated file in the newest checkpoint makes it invalid; latest falls back to the one before, named."""
    train_lora.main(short_run(tiny_model_dir, tmp_path))
    lora_file = tmp_path / "checkpoint-4" / LORA_FILE_NAME
    lora_file.write_bytes(lora_file.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        assert checkpoints.latest_valid_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    assert "checkpoint-4" in caplog.text and "checksum" in caplog.text


def test_resume_with_other_settings_or_data_is_refused_listing_differences(tiny_model_dir, tmp_path):
    """Resuming with another rank, seed or dataset refuses and lists each difference; the override continues."""
    train_lora.main(short_run(tiny_model_dir, tmp_path / "run"))
    changed_data = tmp_path / "data"
    changed_data.mkdir()
    for path in (REPO_ROOT / "examples" / "dataset").iterdir():
        (changed_data / path.name).write_bytes(path.read_bytes())
    (changed_data / "coffee.txt").write_text("a different caption", encoding="utf-8")
    cfg = short_run(tiny_model_dir, tmp_path / "run", "--resume_from_checkpoint", "latest", "--rank", "8",
                    "--seed", "1", "--dataset_path", str(changed_data))
    with pytest.raises(ConfigError) as error:
        train_lora.main(cfg)
    message = str(error.value)
    assert "rank: checkpoint 4, now 8" in message and "seed: checkpoint 42, now 1" in message
    assert "dataset: images or captions differ" in message and "--resume_despite_changes true" in message
    cfg = short_run(tiny_model_dir, tmp_path / "run", "--resume_from_checkpoint", "latest", "--seed", "1",
                    "--resume_despite_changes", "true", "--max_train_steps", "4")
    assert train_lora.main(cfg).is_file()


def nan_loss_at(monkeypatch, bad_calls) -> None:
    """Make diffusion_loss return NaN (keeping the graph) on the given 1-based call numbers."""
    original = training_step.diffusion_loss
    calls = {"n": 0}

    def loss(*args, **kwargs):
        calls["n"] += 1
        value = original(*args, **kwargs)
        return value * float("nan") if calls["n"] in bad_calls else value
    monkeypatch.setattr(training_step, "diffusion_loss", loss)


def test_one_nan_step_is_skipped_and_logged(tiny_model_dir, tmp_path, monkeypatch):
    """A NaN loss at step 3 skips that update only; the run finishes with finite weights and says so."""
    nan_loss_at(monkeypatch, {3})
    final = train_lora.main(short_run(tiny_model_dir, tmp_path, "--max_train_steps", "5"))
    rows = [json.loads(line) for line in (tmp_path / "loss_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if row["skipped"]] == [3] and len(rows) == 5
    assert all(torch.isfinite(t).all() for t in load_file(str(final)).values())


def test_persistent_nan_aborts_with_last_good_checkpoint_intact(tiny_model_dir, tmp_path, monkeypatch):
    """NaN from step 5 on: the run stops after max_nonfinite_steps, keeps its checkpoints valid and finite,
    writes no final file, and prints the command that resumes."""
    nan_loss_at(monkeypatch, set(range(5, 100)))
    cfg = short_run(tiny_model_dir, tmp_path, "--max_train_steps", "20", "--max_nonfinite_steps", "3",
                    "--nonfinite_retries", "0")
    with pytest.raises(TrainingStopped) as stopped:
        train_lora.main(cfg)
    assert stopped.value.exit_code != 0
    assert "3 non-finite steps in a row" in str(stopped.value) and "--resume_from_checkpoint latest" in str(stopped.value)
    # Step 6 was due a checkpoint and skipped its update: it is written, holding step 4's finite weights.
    assert checkpoints.latest_valid_checkpoint(tmp_path) == tmp_path / "checkpoint-6"
    last_good = load_file(str(tmp_path / "checkpoint-4" / LORA_FILE_NAME))
    newest = load_file(str(tmp_path / "checkpoint-6" / LORA_FILE_NAME))
    assert all(torch.isfinite(t).all() and torch.equal(t, newest[k]) for k, t in last_good.items())
    assert not (tmp_path / LORA_FILE_NAME).exists()


def healed_run(tiny_model_dir, output_dir, *extra: str):
    """10 steps, a checkpoint every 2, healing after 3 non-finite steps in a row."""
    return short_run(tiny_model_dir, output_dir, "--max_train_steps", "10", "--max_nonfinite_steps", "3", *extra)


def test_planted_divergence_rolls_back_lowers_the_rate_and_finishes(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """NaN at steps 5-7: the run goes back to checkpoint-4 (the newest saved before the streak), removes checkpoint-6
    (saved during it), halves the learning rate, finishes all 10 steps with finite weights, and says so in the log,
    the summary, the report and the later checkpoints."""
    nan_loss_at(monkeypatch, {5, 6, 7})
    final = train_lora.main(healed_run(tiny_model_dir, tmp_path, "--learning_rate", "2e-4"))
    assert all(torch.isfinite(t).all() for t in load_file(str(final)).values())
    heals = [json.loads(line) for line in (tmp_path / "heals.jsonl").read_text().splitlines()]
    assert [(h["step"], h["rolled_back_to"], h["lr_factor"], h["dropped"]) for h in heals] == [
        (7, 4, 0.5, ["checkpoint-6"])]
    rows = [json.loads(line) for line in (tmp_path / "loss_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6, 7, 5, 6, 7, 8, 9, 10]
    assert rows[3]["lr"] == pytest.approx(2e-4) and rows[-1]["lr"] == pytest.approx(1e-4)
    assert not rows[-1]["skipped"] and all(not row["skipped"] for row in rows[7:])
    state = checkpoints.read_state(tmp_path / "checkpoint-10")
    assert state["lr_factor"] == 0.5 and len(state["heals"]) == 1 and state["nonfinite_total"] == 3
    assert "lr_factor" not in checkpoints.read_state(tmp_path / "checkpoint-4")  # before the heal: as it was
    assert "1 rollback(s)" in capsys.readouterr().out and "Healing" in (tmp_path / "report.html").read_text()


def test_a_healed_run_resumed_after_its_rollback_finishes_identically(tiny_model_dir, tmp_path, monkeypatch):
    """Killed in the save of checkpoint-10 after a rollback, resumed from checkpoint-8: same final LoRA as the run
    that was not killed (the lowered rate and the retries spent come back from the checkpoint)."""
    nan_loss_at(monkeypatch, {5, 6, 7})
    whole = load_file(str(train_lora.main(healed_run(tiny_model_dir, tmp_path / "whole"))))
    monkeypatch.undo()
    nan_loss_at(monkeypatch, {5, 6, 7})
    crash_at(monkeypatch, "before_write", "checkpoint-10")
    with pytest.raises(Crash):
        train_lora.main(healed_run(tiny_model_dir, tmp_path / "killed"))
    monkeypatch.undo()
    resumed = load_file(str(train_lora.main(healed_run(tiny_model_dir, tmp_path / "killed",
                                                       "--resume_from_checkpoint", "latest"))))
    assert all(torch.equal(tensor, resumed[key]) for key, tensor in whole.items())
    assert checkpoints.read_state(tmp_path / "killed" / "checkpoint-10")["heals"][0]["rolled_back_to"] == 4


def test_healing_stops_as_before_once_its_retries_are_spent(tiny_model_dir, tmp_path, monkeypatch):
    """NaN from step 5 on with one retry: one rollback to checkpoint-4, then the run stops with the resume command."""
    nan_loss_at(monkeypatch, set(range(5, 100)))
    with pytest.raises(TrainingStopped) as stopped:
        train_lora.main(healed_run(tiny_model_dir, tmp_path, "--nonfinite_retries", "1"))
    assert "1 rollback(s) done, nonfinite_retries is 1" in str(stopped.value) and stopped.value.exit_code == 3
    assert len((tmp_path / "heals.jsonl").read_text().splitlines()) == 1
    assert not (tmp_path / LORA_FILE_NAME).exists()


def test_divergence_before_the_first_checkpoint_stops_naming_why(tiny_model_dir, tmp_path, monkeypatch):
    """NaN at steps 1-3: no checkpoint from before the streak exists, so the run stops, saying so."""
    nan_loss_at(monkeypatch, {1, 2, 3})
    with pytest.raises(TrainingStopped, match="no valid checkpoint from before step 1 to roll back to"):
        train_lora.main(healed_run(tiny_model_dir, tmp_path))


@pytest.mark.parametrize("flag, value", [("--nonfinite_lr_factor", "1.0"), ("--nonfinite_lr_factor", "0"),
                                         ("--nonfinite_retries", "-1")])
def test_healing_settings_that_cannot_heal_are_refused(tiny_model_dir, tmp_path, flag, value):
    """A factor outside (0, 1) or negative retries stop at minute 0, naming the flag."""
    with pytest.raises(ConfigError, match=flag):
        train_lora.main(short_run(tiny_model_dir, tmp_path, flag, value))


def test_checkpoint_due_on_a_skipped_step_is_written(tiny_model_dir, tmp_path, monkeypatch):
    """A non-finite step 2 skips its update but not its checkpoint: checkpoint-2 is written and valid."""
    nan_loss_at(monkeypatch, {2})
    train_lora.main(short_run(tiny_model_dir, tmp_path, "--max_train_steps", "4"))
    assert checkpoints.check_checkpoint(tmp_path / "checkpoint-2") is None


def test_stop_request_during_a_skipped_step_stops_at_that_step(tiny_model_dir, tmp_path, monkeypatch):
    """SIGTERM arriving in a non-finite step 2 saves checkpoint-2 and stops there, not one finite step later."""
    import os
    import signal

    original = training_step.diffusion_loss
    calls = {"n": 0}

    def loss(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            return original(*args, **kwargs) * float("nan")
        return original(*args, **kwargs)
    monkeypatch.setattr(training_step, "diffusion_loss", loss)
    with pytest.raises(TrainingStopped, match="at step 2"):
        train_lora.main(short_run(tiny_model_dir, tmp_path, "--max_train_steps", "6", "--checkpointing_steps", "0"))
    assert [c.name for c in checkpoints.list_checkpoints(tmp_path)] == ["checkpoint-2"]


def test_run_whose_last_step_is_skipped_ends_at_max_train_steps(tiny_model_dir, tmp_path, monkeypatch):
    """A non-finite last step (3 of 3, mid-epoch) ends the run there: no extra update afterwards."""
    nan_loss_at(monkeypatch, {3})
    final = train_lora.main(short_run(tiny_model_dir, tmp_path, "--max_train_steps", "3"))
    rows = [json.loads(line) for line in (tmp_path / "loss_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3] and rows[-1]["skipped"]
    with safe_open(str(final), "pt") as f:
        assert f.metadata()["step"] == "3"


def test_network_refuses_to_write_non_finite_weights(unet, tmp_path):
    """save() refuses a LoRA holding NaN rather than writing it."""
    network = lora_diffusion.inject_trainable_lora(unet)
    with torch.no_grad():
        network.parameters()[1][0, 0] = float("nan")
    with pytest.raises(LoRAError, match="non-finite"):
        network.save(tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_sigterm_saves_at_step_boundary_and_prints_resume_command(tiny_model_dir, tmp_path, monkeypatch):
    """A SIGTERM during step 3 saves checkpoint-3 at the end of that step and stops with the resume command;
    resuming then finishes bitwise equal to an uninterrupted run."""
    import os
    import signal

    original = training_step.diffusion_loss
    calls = {"n": 0}

    def loss(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)
    monkeypatch.setattr(training_step, "diffusion_loss", loss)
    cfg = short_run(tiny_model_dir, tmp_path / "stopped", "--max_train_steps", "6")
    with pytest.raises(TrainingStopped) as stopped:
        train_lora.main(cfg)
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert "python train_lora.py" in str(stopped.value) and "--resume_from_checkpoint latest" in str(stopped.value)
    assert checkpoints.latest_valid_checkpoint(tmp_path / "stopped") == tmp_path / "stopped" / "checkpoint-3"
    monkeypatch.undo()
    resumed = train_lora.main(short_run(tiny_model_dir, tmp_path / "stopped", "--max_train_steps", "6",
                                        "--resume_from_checkpoint", "latest"))
    reference = train_lora.main(short_run(tiny_model_dir, tmp_path / "reference", "--max_train_steps", "6"))
    a, b = load_file(str(resumed)), load_file(str(reference))
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_pickle_as_checkpoint_state_is_refused_unexecuted(tiny_model_dir, tmp_path):
    """A checkpoint whose state file was replaced by a pickle is invalid, and loading it never unpickles."""
    train_lora.main(short_run(tiny_model_dir, tmp_path))
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "checkpoint-4" / checkpoints.STATE_TENSORS).write_bytes(pickle.dumps(Payload()))
    assert "checksum" in checkpoints.check_checkpoint(tmp_path / "checkpoint-4")
    with pytest.raises(checkpoints.CheckpointError):
        checkpoints.load_checkpoint(tmp_path / "checkpoint-4", None, None, None)
    assert not marker.exists()


def test_training_on_planted_defects_completes_and_reports_exactly_the_unusable(tiny_model_dir, tmp_path, capsys):
    """Training on the planted-defect folder finishes; data_report.json lists exactly the unusable files;
    the long caption is reported once as truncated."""
    from planted import SKIPPED, USABLE, make_planted_dataset

    data = make_planted_dataset(tmp_path / "data")
    cfg = short_run(tiny_model_dir, tmp_path / "out", "--dataset_path", str(data), "--max_train_steps", "2",
                    "--train_batch_size", "4")
    assert train_lora.main(cfg).is_file()
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert {s["file"] for s in report["skipped"]} == set(SKIPPED) and report["usable"] == len(USABLE)
    printed = capsys.readouterr().out
    assert f"{len(USABLE)} usable, {len(SKIPPED)} skipped" in printed
    assert "1 caption(s) longer than the 77-token CLIP limit are truncated" in printed


def test_strict_data_refuses_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch):
    """--strict_data true turns the skips into a refusal that names the files, before any model is loaded."""
    from dataset import DatasetError
    from planted import make_planted_dataset

    data = make_planted_dataset(tmp_path / "data")
    monkeypatch.setattr(train_lora, "load_encoders", lambda *a: pytest.fail("no model may load"))
    monkeypatch.setattr(loading, "load_unet", lambda *a: pytest.fail("no model may load"))
    with pytest.raises(DatasetError, match="strict checking is on"):
        train_lora.main(short_run(tiny_model_dir, tmp_path / "out", "--dataset_path", str(data),
                                  "--strict_data", "true"))


def test_unwritable_output_dir_is_refused_at_start(tiny_model_dir, tmp_path):
    """An output_dir that cannot be created is refused at minute 0, naming the option."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="--output_dir .* is not writable"):
        train_lora.main(short_run(tiny_model_dir, blocker / "out"))


def test_grad_scaler_state_survives_a_checkpoint(unet, tmp_path):
    """fp16's GradScaler (its scale and growth count) is saved with a checkpoint and restored on resume."""
    network = lora_diffusion.inject_trainable_lora(unet)
    optimizer = torch.optim.AdamW(network.parameters())
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 11, growth_interval=7)
    checkpoints.save_checkpoint(tmp_path / "checkpoint-1", network, {}, optimizer, schedule, {"step": 1},
                                grad_scaler=scaler)
    restored = torch.amp.GradScaler("cpu")
    checkpoints.load_checkpoint(tmp_path / "checkpoint-1", network, optimizer, schedule, restored)
    assert restored.get_scale() == 2.0 ** 11 and restored.get_growth_interval() == 7


def test_logged_loss_is_the_mean_over_the_accumulation_window(tiny_model_dir, tmp_path, monkeypatch):
    """With gradient_accumulation_steps 2 each logged step loss is the mean of its two micro-batch losses."""
    original, micro = training_step.diffusion_loss, []

    def recording_loss(*args, **kwargs):
        value = original(*args, **kwargs)
        micro.append(value.item())
        return value
    monkeypatch.setattr(training_step, "diffusion_loss", recording_loss)
    train_lora.main(short_run(tiny_model_dir, tmp_path, "--gradient_accumulation_steps", "2"))
    logged = [json.loads(line)["loss"] for line in (tmp_path / "loss_log.jsonl").read_text().splitlines()]
    assert len(micro) == 8 and micro[0] != micro[1]
    # Relative: the losses are near 1, and fp32 against float64 means differ by a rounding or two (equal here).
    assert logged == pytest.approx([(micro[i] + micro[i + 1]) / 2 for i in range(0, 8, 2)], rel=1e-6)
