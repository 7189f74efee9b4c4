"""The training loop's record as it goes: the progress bar, loss_log.jsonl (one row per optimizer step, main process
only), TensorBoard, and each epoch's average loss."""

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

from tqdm.auto import tqdm

from sdlora.run_files import LOSS_LOG_NAME


class LossLog:
    """One JSON line per optimizer step, flushed at once: what each attempt of a run saw, step by step."""

    def __init__(self, path: Path, run: str):
        self.path, self.run = path, f"{run}/{os.getpid()}"

    def write(self, step: int, loss: float, lr: float, skipped: bool) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            row = {"run": self.run, "step": step, "loss": loss, "lr": lr, "skipped": skipped, "time": time.time()}
            f.write(json.dumps(row) + "\n")


def log_step(progress, accelerator, loss_log: LossLog | None, step: int, loss: float, lr: float,
             finite: bool) -> None:
    """One optimizer step on the progress bar, in TensorBoard and in the loss log."""
    progress.update(1)
    progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
    accelerator.log({"train/loss": loss, "train/lr": lr}, step=step)
    if loss_log:
        loss_log.write(step, loss, lr, skipped=not finite)


def report_epoch(progress, accelerator, epoch: int, losses: list[float], step: int) -> None:
    if losses:
        average = sum(losses) / len(losses)
        progress.write(f"epoch {epoch}: average loss {average:.4f} over {len(losses)} micro-batches")
        accelerator.log({"train/epoch_loss": average}, step=step)


class TrainingLog:
    """The loop's record from `step` on: an optimizer step's loss is the mean of its micro-batches' losses; the
    run's start time (UTC, for the LoRA metadata) and the trackers' config are set when it opens. A context manager
    that closes the progress bar."""

    def __init__(self, cfg, accelerator, output_dir: Path, step: int, max_steps: int):
        self.started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        accelerator.init_trackers("lora", config={k: str(v) for k, v in vars(cfg).items()})
        self.accelerator = accelerator
        self.loss_log = LossLog(output_dir / LOSS_LOG_NAME, self.started_at) if accelerator.is_main_process else None
        self.progress = tqdm(total=max_steps, initial=step, desc="training", disable=not accelerator.is_main_process)
        self.start_time, self.start_step, self.loss = time.time(), step, float("nan")
        self.epoch_losses: list[float] = []
        self.window_losses: list[float] = []

    def __enter__(self) -> "TrainingLog":
        return self

    def __exit__(self, *exc) -> None:
        self.progress.close()

    def micro_batch(self, loss: float) -> None:
        self.epoch_losses.append(loss)
        self.window_losses.append(loss)

    def optimizer_step(self, step: int, lr: float, finite: bool) -> None:
        self.loss, self.window_losses = sum(self.window_losses) / len(self.window_losses), []
        log_step(self.progress, self.accelerator, self.loss_log, step, self.loss, lr, finite)

    def end_epoch(self, epoch: int, step: int) -> None:
        """The epoch's average loss; the next epoch starts its own (and its first accumulation window)."""
        report_epoch(self.progress, self.accelerator, epoch, self.epoch_losses, step)
        self.epoch_losses, self.window_losses = [], []
