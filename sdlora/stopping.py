"""Stopping a run safely: on SIGTERM / SIGINT at the next step boundary (after a checkpoint), and after too many
non-finite steps in a row; each stop says how to resume."""

import signal
from pathlib import Path

import torch

from sdlora.checkpoints import latest_valid_checkpoint


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


class Stopping:
    """The ways a run stops early, each message with the command that resumes it: a SIGTERM / SIGINT, handled while
    the `with` lasts (the loop saves at the next step boundary, then stops), and `limit` non-finite steps in a row
    (each skips its update; the count in all goes into the checkpoints)."""

    def __init__(self, accelerator, output_dir: Path, limit: int, nonfinite_total: int, resume_command: str):
        self.accelerator, self.output_dir, self.resume_command = accelerator, output_dir, resume_command
        self.limit, self.nonfinite_total, self.nonfinite_in_row = limit, nonfinite_total, 0
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

    def count_nonfinite(self, finite: bool, step: int, progress) -> None:
        """Count the step; a non-finite one is said on the progress bar, and the run stops after `limit` in a row."""
        self.nonfinite_in_row = 0 if finite else self.nonfinite_in_row + 1
        self.nonfinite_total += 0 if finite else 1
        if finite:
            return
        progress.write(f"step {step}: non-finite loss or gradient, update skipped ({self.nonfinite_in_row} in a row, "
                       f"{self.nonfinite_total} in all)")
        if self.nonfinite_in_row >= self.limit:
            raise TrainingStopped(
                f"stopped at step {step}: {self.nonfinite_in_row} non-finite steps in a row (lower learning_rate, or "
                f"check the data). Newest valid checkpoint: {latest_valid_checkpoint(self.output_dir)}. Resume with:\n"
                f"  {self.resume_command}", 3)
