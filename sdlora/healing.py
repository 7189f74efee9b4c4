"""A run that heals: after `max_nonfinite_steps` non-finite steps in a row, go back to the newest valid checkpoint
saved before they began, lower the learning rate by `nonfinite_lr_factor`, and go on, at most `nonfinite_retries`
times.

The checkpoint saved before the streak is the last state known to train; checkpoints saved during the streak hold the
same weights (every update was skipped) on the branch being abandoned, so they are removed and `latest` means the
healed branch. Each rollback is a row of heals.jsonl (the summary and the report read it) and travels in every later
checkpoint (`heals`, `lr_factor`), so a resume knows the retries spent and trains on at the lowered rate. Before the
first rollback nothing differs from a run without healing: the exact-resume guarantee holds for all of it.
"""

import json
import logging
import time
from pathlib import Path

from sdlora.checkpoints import check_checkpoint, list_checkpoints, load_checkpoint, remove_checkpoint
from sdlora.ema import Ema

log = logging.getLogger(__name__)


def checkpoint_step(folder: Path) -> int:
    return int(folder.name.removeprefix("checkpoint-"))


def rollback_target(output_dir: Path, streak_start: int) -> Path | None:
    """The newest valid checkpoint saved before step `streak_start` (the streak's first non-finite step), or None."""
    for folder in reversed(list_checkpoints(output_dir)):
        if checkpoint_step(folder) < streak_start and check_checkpoint(folder) is None:
            return folder
    return None


def roll_back(folder: Path, lr_factor: float, network, optimizer, lr_scheduler, ema: Ema | None,
              accelerator) -> int:
    """Restore the LoRA weights, optimizer, schedule, RNG and EMA of checkpoint `folder`, then set every learning
    rate to `lr_factor` times the run's own (the checkpoint's rates already include its `lr_factor`); returns the
    checkpoint's step."""
    state = load_checkpoint(folder, network, optimizer, lr_scheduler, accelerator.scaler)
    if ema:
        saved = state["extra_tensors"]
        ema.shadow = [saved[f"ema.{i}"].to(p.device) for i, p in enumerate(ema.parameters)]
        ema.updates = state.get("ema_updates", state["step"])
    change = lr_factor / state.get("lr_factor", 1.0)
    # LambdaLR (every schedule of get_scheduler) draws each step's rate from base_lrs: scaling them scales the
    # rest of the schedule; the groups' current rates are scaled too, for the step before the scheduler's next.
    lr_scheduler.base_lrs = [rate * change for rate in lr_scheduler.base_lrs]
    for group in optimizer.param_groups:
        group["lr"] *= change
        if "initial_lr" in group:
            group["initial_lr"] *= change
    return state["step"]


def drop_abandoned_checkpoints(output_dir: Path, after_step: int) -> list[str]:
    """Remove the checkpoints newer than `after_step` (saved during the streak); returns their names."""
    dropped = [folder for folder in list_checkpoints(output_dir) if checkpoint_step(folder) > after_step]
    for folder in dropped:
        remove_checkpoint(folder)
    return [folder.name for folder in dropped]


def log_heal(path: Path, heal: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(dict(heal, time=time.time())) + "\n")


def read_heals(path: Path) -> list[dict]:
    """The rows of heals.jsonl, one per rollback; a rollback replayed by a resume (same step, same target) once."""
    if not path.is_file():
        return []
    rows = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows[(row["step"], row.get("rolled_back_to"), row.get("retry"))] = row
    return list(rows.values())


def heal_lines(heals: list[dict]) -> list[str]:
    """One line per rollback, for the summary and the report."""
    return [f"step {heal['step']}: {heal['streak']} non-finite steps in a row; rolled back to {heal['checkpoint']} "
            f"(step {heal['rolled_back_to']}), learning rate x{heal['lr_factor']:g} of the configured one "
            f"(retry {heal['retry']} of {heal['retries']})" for heal in heals]
