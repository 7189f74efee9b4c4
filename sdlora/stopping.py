"""Stopping a run safely: on SIGTERM / SIGINT at the next step boundary (after a checkpoint), and after too many
non-finite steps in a row once healing (sdlora/healing.py) has no retry left; each stop says how to resume."""

import signal
from pathlib import Path

import torch

from sdlora import healing
from sdlora.checkpoints import latest_valid_checkpoint, read_state
from sdlora.run_files import HEALS_LOG_NAME


class TrainingStopped(Exception):
    """The run stopped early on purpose or to stay safe; the message holds the resume command."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class StopRequest:
    """SIGTERM / SIGINT handler: remembers the signal so the loop can save at the next step boundary."""

    def __init__(self):
        self.signal: int | None = None

    def __call__(self, signum, frame) -> None:
        if self.signal is not None:  # a second Ctrl-C: the user really wants out now
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\n{signal.Signals(signum).name} received: saving at the end of this step, then stopping", flush=True)


def stop_requested(stop: StopRequest, accelerator) -> bool:
    """True on every process when any process was asked to stop, so they all save and leave together."""
    flag = torch.tensor([1.0 if stop.signal is not None else 0.0], device=accelerator.device)
    return bool(accelerator.gather(flag).max() > 0)


def updates_are_finite(loss: torch.Tensor, parameters: list, accelerator) -> bool:
    """Same answer on every process: the loss is finite and (unless fp16's GradScaler judges them) so are grads."""
    checks = [torch.isfinite(loss.detach()).all()]
    if accelerator.scaler is None:
        checks += [torch.isfinite(p.grad).all() for p in parameters if p.grad is not None]
    ok = torch.stack(checks).all().float().reshape(1).to(accelerator.device)
    return bool(accelerator.gather(ok).min() > 0)


NO_EVALUATION = {"best_step": None, "best_score": None, "since_best": 0}  # early stopping's record before the first


class Stopping:
    """The ways a run stops early, each message with the command that resumes it: a SIGTERM / SIGINT, handled while
    the `with` lasts (the loop saves at the next step boundary, then stops), and `max_nonfinite_steps` non-finite
    steps in a row (each skips its update) once `nonfinite_retries` rollbacks are spent. The counters (non-finite
    steps in all, the rollbacks) go into the checkpoints and come back on a resume from `resume_folder`."""

    def __init__(self, cfg, accelerator, resume_folder: Path | None, resume_command: str):
        self.accelerator, self.output_dir, self.resume_command = accelerator, Path(cfg.output_dir), resume_command
        self.limit, self.retries, self.lr_factor = cfg.max_nonfinite_steps, cfg.nonfinite_retries, cfg.nonfinite_lr_factor
        saved = read_state(resume_folder) if resume_folder else {}
        self.nonfinite_total, self.heals = saved.get("nonfinite_total", 0), saved.get("heals", [])
        self.nonfinite_in_row, self.target = 0, None
        # Early stopping: the best score so far, its step, the evaluations since (from the checkpoint on a resume).
        self.patience = cfg.early_stopping_patience
        self.best = dict(saved.get("early_stopping", NO_EVALUATION))
        self.patience_spent, self.stopped_early = False, False
        self.request = StopRequest()
        self.previous_handlers: dict = {}

    def __enter__(self) -> "Stopping":
        self.previous_handlers = {sig: signal.signal(sig, self.request) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous_handlers.items():
            signal.signal(sig, handler)

    def requested(self) -> bool:
        """True on every process when any process was asked to stop."""
        return stop_requested(self.request, self.accelerator)

    def on_request(self, step: int) -> TrainingStopped:
        return TrainingStopped(f"stopped on request at step {step}, checkpoint saved. Resume with:\n"
                               f"  {self.resume_command}", 128 + self.request.signal if self.request.signal else 130)

    def counters(self) -> dict:
        """What a checkpoint keeps of these counters: the rollbacks only once there was one, early stopping's record
        only when it is on (a run without either writes its checkpoints as it always did)."""
        kept = {"nonfinite_total": self.nonfinite_total}
        if self.heals:
            kept |= {"heals": self.heals, "lr_factor": self.heals[-1]["lr_factor"]}
        if self.patience:
            kept["early_stopping"] = dict(self.best)
        return kept

    def evaluated(self, step: int, score: float | None) -> None:
        """Early stopping (main process): the checkpoint at `step` scored `score` (higher is better; None: off)."""
        if score is None:
            return
        if self.best["best_score"] is None or score > self.best["best_score"]:
            self.best = {"best_step": step, "best_score": score, "since_best": 0}
        else:
            self.best["since_best"] += 1
        print(f"early stopping: step {step} scored {score:.4f}; best checkpoint-{self.best['best_step']} "
              f"({self.best['best_score']:.4f}), {self.best['since_best']} of {self.patience} evaluations since",
              flush=True)
        self.patience_spent = self.best["since_best"] >= self.patience

    def out_of_patience(self) -> bool:
        """True on every process once early stopping's patience is spent (the main process decides)."""
        flag = torch.tensor([1.0 if self.patience_spent else 0.0], device=self.accelerator.device)
        self.stopped_early = bool(self.accelerator.gather(flag).max() > 0)
        return self.stopped_early

    def early_stop_line(self) -> str:
        """For the summary: why the run ended before max_train_steps, and which checkpoint was best."""
        if not self.stopped_early:
            return ""
        return (f"\n  stopped early: no better score in {self.patience} evaluations after checkpoint-"
                f"{self.best['best_step']} (score {self.best['best_score']:.4f}), which is kept")

    def count_nonfinite(self, finite: bool, step: int, progress) -> bool:
        """Count the step; a non-finite one is said on the progress bar. True when `limit` came in a row and the run
        is to roll back (then call roll_back); when no retry or no checkpoint is left, the run stops here."""
        self.nonfinite_in_row = 0 if finite else self.nonfinite_in_row + 1
        self.nonfinite_total += 0 if finite else 1
        if finite:
            return False
        progress.write(f"step {step}: non-finite loss or gradient, update skipped ({self.nonfinite_in_row} in a row, "
                       f"{self.nonfinite_total} in all)")
        if self.nonfinite_in_row < self.limit:
            return False
        streak_start, self.progress = step - self.nonfinite_in_row + 1, progress
        self.target = healing.rollback_target(self.output_dir, streak_start)
        if len(self.heals) < self.retries and self.target is not None:
            return True
        why = (f"{len(self.heals)} rollback(s) done, nonfinite_retries is {self.retries}" if self.target is not None
               else f"no valid checkpoint from before step {streak_start} to roll back to")
        raise TrainingStopped(
            f"stopped at step {step}: {self.nonfinite_in_row} non-finite steps in a row ({why}; lower learning_rate, "
            f"or check the data). Newest valid checkpoint: {latest_valid_checkpoint(self.output_dir)}. Resume with:\n"
            f"  {self.resume_command}", 3)

    def roll_back(self, step: int, network, optimizer, lr_scheduler, ema) -> int:
        """Go back to the checkpoint count_nonfinite chose, at nonfinite_lr_factor times the learning rate (once
        more for every earlier rollback); log it; returns the step to continue from."""
        lr_factor = self.lr_factor ** (len(self.heals) + 1)
        if self.patience:  # early stopping's record goes back too: evaluations of the abandoned branch do not count
            self.best = dict(read_state(self.target).get("early_stopping", NO_EVALUATION))
        back_to = healing.roll_back(self.target, lr_factor, network, optimizer, lr_scheduler, ema, self.accelerator)
        self.accelerator.wait_for_everyone()  # every process has read the checkpoint before any is removed
        heal = {"step": step, "streak": self.nonfinite_in_row, "rolled_back_to": back_to,
                "checkpoint": self.target.name, "lr_factor": lr_factor, "retry": len(self.heals) + 1,
                "retries": self.retries, "learning_rates": list(lr_scheduler.base_lrs)}
        self.heals = self.heals + [heal]
        self.nonfinite_in_row = 0
        self.progress.n = back_to  # the bar counts the replayed steps again, not past max_train_steps
        self.progress.refresh()
        if self.accelerator.is_main_process:
            dropped = healing.drop_abandoned_checkpoints(self.output_dir, back_to)
            healing.log_heal(self.output_dir / HEALS_LOG_NAME, dict(heal, dropped=dropped))
            removed = f"; removed {', '.join(dropped)} (saved during the streak)" if dropped else ""
            print(f"healing: {healing.heal_lines([heal])[0]}{removed}", flush=True)
        return back_to
