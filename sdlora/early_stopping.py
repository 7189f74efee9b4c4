"""What a run scores its checkpoints by: for early stopping (`early_stopping_patience`), at each checkpoint before
it is saved (so the checkpoint keeps the count, and a resume continues it exactly), and for the judge at the end of
the run (`judge_checkpoints`). The score is the judge's (sdlora/judge.py: the best of the checkpoint's multipliers)
when the judge is on, else minus the held-out loss; higher is better either way."""

import logging
from pathlib import Path

from sdlora.judge import Candidate, Judge, judge_run
from sdlora.run_files import lora_metadata

log = logging.getLogger(__name__)


def early_stopping_problem(cfg) -> str | None:
    """Why these early-stopping settings cannot work, or None (checked at minute 0, in check_config)."""
    if cfg.early_stopping_patience < 0:
        return f"--early_stopping_patience {cfg.early_stopping_patience}: 0 (off) or the evaluations to wait, e.g. 3"
    if not cfg.early_stopping_patience:
        return None
    if not cfg.checkpointing_steps:
        return ("--early_stopping_patience needs checkpoints to evaluate and keep: set --checkpointing_steps (e.g. a "
                "tenth of max_train_steps)")
    if not (cfg.judge_checkpoints or cfg.validation_split or cfg.validation_dataset_path):
        return ("--early_stopping_patience needs a score: --judge_checkpoints true, or held-out images for the "
                "held-out loss (--validation_split 0.1 or --validation_dataset_path)")
    return None


class CheckpointScorer:
    """Scores the weights in training at each checkpoint (early stopping only) and judges the run at its end
    (judge_checkpoints only); the judge, built at the first use, keeps every row it drew for the end."""

    def __init__(self, cfg, validation, val_log, accelerator, models):
        self.cfg, self.validation, self.val_log, self.accelerator, self.models = cfg, validation, val_log, accelerator, models
        self.output_dir = Path(cfg.output_dir)
        self.judge: Judge | None = None

    def __call__(self, step: int, network, dataset, started_at: str) -> float | None:
        """The score of the current weights at `step`, or None when early stopping is off or the checkpoint is not a
        scheduled one (a stop request's: the resumed run would not evaluate it, and must count as the run would)."""
        if not self.cfg.early_stopping_patience or step % self.cfg.checkpointing_steps:
            return None
        if not self.cfg.judge_checkpoints:
            self.val_log.record(step, self.validation, self.accelerator, self.models, self.cfg.seed)
            return -self.val_log.last_value
        # The weights the checkpoint is about to hold: the judge keeps its rows by the file's tensors, so the
        # end-of-run judgement of checkpoint-<step> draws nothing again.
        path = self.output_dir / f".judging-checkpoint-{step}.safetensors"
        network.save(path, lora_metadata(self.cfg, dataset, step, started_at))
        try:
            self.judge = self.judge or Judge(self.output_dir)
            return self.judge.score_checkpoint(Candidate(f"checkpoint-{step}", step, path))
        finally:
            path.unlink(missing_ok=True)

    def finish(self) -> None:
        """With judge_checkpoints: judge every kept checkpoint and recommend one; a failure is reported, never fatal
        (the LoRA file is saved), with the command that retries."""
        if not self.cfg.judge_checkpoints:
            return
        try:
            judge_run(self.output_dir, judge=self.judge)
        except Exception as error:  # noqa: BLE001
            log.error(f"the checkpoint judge failed ({error}); the LoRA file is saved. Retry with "
                      f"`python evaluate.py judge {self.output_dir}`")
