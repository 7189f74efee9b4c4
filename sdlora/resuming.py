"""A training run's side of its checkpoints: saving one on schedule (with what a resume checks against),
continuing from one, and the command line that does."""

import logging
import shlex
from pathlib import Path

from sdlora.checkpoints import load_checkpoint, prune_checkpoints, save_checkpoint
from sdlora.ema import Ema
from sdlora.run_files import lora_metadata

log = logging.getLogger(__name__)


def resume_command(cfg, defaults: dict) -> str:
    """The command line that continues this run: every setting that differs from the constants, plus resume (a
    --config file's settings among them, so the file itself is not needed)."""
    args = []
    for name, value in vars(cfg).items():
        if name in ("resume_from_checkpoint", "config") or value == defaults.get(name):
            continue
        if isinstance(value, tuple):
            args += [f"--{name}", *map(str, value)]
        else:
            args += [f"--{name}", str(value).lower() if isinstance(value, bool) else str(value)]
    return shlex.join(["python", "train_lora.py", *args, "--resume_from_checkpoint", "latest"])


def checkpoint_run(cfg, step: int, network, optimizer, lr_scheduler, dataset, identity: dict,
                   counters: dict, started_at: str, ema: Ema | None, grad_scaler) -> None:
    """Write checkpoint-<step> (with what a resume checks against, and Stopping's `counters`), then drop the oldest
    beyond the limit."""
    output_dir = Path(cfg.output_dir)
    state = {"step": step, "run_identity": identity, "dataset_fingerprint": dataset.fingerprint(), **counters}
    extra = None
    if ema:
        extra = {f"ema.{i}": shadow for i, shadow in enumerate(ema.shadow)}
        state["ema_updates"] = ema.updates
    save_checkpoint(output_dir / f"checkpoint-{step}", network, lora_metadata(cfg, dataset, step, started_at),
                    optimizer, lr_scheduler, state, extra, grad_scaler)
    best = counters.get("early_stopping", {}).get("best_step")  # early stopping keeps its best checkpoint
    prune_checkpoints(output_dir, cfg.checkpoints_total_limit, keep_also=f"checkpoint-{best}" if best else None)


def resume_training(folder: Path | None, cfg, network, optimizer, lr_scheduler,
                    accelerator) -> tuple[int, Ema | None]:
    """(step, the EMA or None): (0, a fresh EMA) for a new run; else the checkpoint's,
    with the LoRA weights, optimizer, schedule, RNGs and GradScaler restored, and the EMA taken from the checkpoint
    or, when it has none, started from the resumed weights. Which checkpoint, and whether it belongs to this run,
    was settled at minute 0 (checkpoints.resolve_resume and check_resume_matches, in preflight.check_data)."""
    if folder is None:
        return 0, Ema(network.parameters(), cfg.ema_decay) if cfg.ema_decay else None
    state = load_checkpoint(folder, network, optimizer, lr_scheduler, accelerator.scaler)
    ema = None
    if cfg.ema_decay:
        saved = state["extra_tensors"]
        ema = Ema(network.parameters(), cfg.ema_decay, updates=state.get("ema_updates", state["step"]))
        if "ema.0" in saved:
            ema.shadow = [saved[f"ema.{i}"].to(p.device) for i, p in enumerate(ema.parameters)]
        else:
            log.warning("warning: the checkpoint has no EMA weights; the EMA starts from the resumed weights")
    accelerator.print(f"resumed from {folder} at step {state['step']}")
    return state["step"], ema
