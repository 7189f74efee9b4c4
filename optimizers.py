"""The optimizers a LoRA can be trained with, each from the package that keeps it, installed only by who picks it.

    adamw      torch.optim.AdamW (the default)
    adamw8bit  bitsandbytes' 8-bit AdamW: its two moments in 8 bits, a quarter of AdamW's optimizer memory
    prodigy    Prodigy (Mishchenko & Defazio 2024, arXiv:2306.06101): estimates the step size itself, so
               learning_rate is a multiplier of that estimate, 1.0 as usual
    adafactor  transformers' Adafactor with relative step (Shazeer & Stern 2018): factored second moments (least
               memory) and its own step size, min(1e-2, 1/sqrt(step)) times each weight's RMS; no learning_rate
    lion       Lion (Chen et al. 2023, arXiv:2302.06675): the sign of a momentum, one moment; wants a learning
               rate 3-10x smaller than AdamW's and a weight decay 3-10x larger
"""

import importlib.util
import math
from dataclasses import dataclass

import torch
from diffusers.optimization import get_scheduler


@dataclass(frozen=True)
class OptimizerChoice:
    module: str  # what must be importable
    pip: str  # how to install it


OPTIMIZERS = {
    "adamw": OptimizerChoice("torch", "torch"),
    "adamw8bit": OptimizerChoice("bitsandbytes", "bitsandbytes"),
    "prodigy": OptimizerChoice("prodigyopt", "prodigyopt"),
    "adafactor": OptimizerChoice("transformers", "transformers"),
    "lion": OptimizerChoice("lion_pytorch", "lion-pytorch"),
}
PRODIGY_LR_AT_LEAST = 0.1  # Prodigy's lr multiplies its own estimate: 1e-4 there means "barely train"


def optimizer_problems(name: str, learning_rate: float, set_by_user: set[str]) -> list[str]:
    """What is wrong with training with optimizer `name` at `learning_rate`; `set_by_user` names the settings given
    other values than their defaults (Adafactor's relative step would ignore them)."""
    if name not in OPTIMIZERS:
        return [f"--optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}"]
    choice = OPTIMIZERS[name]
    if importlib.util.find_spec(choice.module) is None:
        return [f"--optimizer {name} needs the {choice.module} package: pip install {choice.pip} "
                f"(or pick another optimizer, e.g. adamw)"]
    if name == "prodigy" and learning_rate < PRODIGY_LR_AT_LEAST:
        return [f"--optimizer prodigy with --learning_rate {learning_rate}: Prodigy finds the step size itself and "
                f"learning_rate multiplies it; set --learning_rate 1.0 (0.5 for a gentler run)"]
    ignored = sorted(set_by_user & {"learning_rate", "text_encoder_lr", "lr_scheduler", "lr_warmup_steps"})
    if name == "adafactor" and ignored:
        return [f"--optimizer adafactor sets its own step size (relative step), so {', '.join(ignored)} would do "
                f"nothing: drop {'it' if len(ignored) == 1 else 'them'}, or pick an optimizer with a learning rate "
                f"(adamw, adamw8bit, lion)"]
    return []


def build_optimizer(name: str, groups: list[dict], weight_decay: float) -> torch.optim.Optimizer:
    """Optimizer `name` over parameter `groups` (each with its "params" and "lr")."""
    if name == "adamw":
        return torch.optim.AdamW(groups, weight_decay=weight_decay)
    if name == "adamw8bit":
        import bitsandbytes

        # min_8bit_size 0: a LoRA's small down/up matrices would otherwise all stay in 32 bits.
        return bitsandbytes.optim.AdamW8bit(groups, weight_decay=weight_decay, min_8bit_size=0)
    if name == "prodigy":
        from prodigyopt import Prodigy

        # Prodigy's recommended settings for diffusion fine-tuning: bias correction, and no step-size growth while
        # a warm-up holds the learning rate low.
        return Prodigy(groups, weight_decay=weight_decay, use_bias_correction=True, safeguard_warmup=True)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        for group in groups:
            group.pop("lr")  # relative step: Adafactor refuses a learning rate beside it
        return Adafactor(groups, lr=None, relative_step=True, scale_parameter=True, warmup_init=False,
                         weight_decay=weight_decay)
    if name == "lion":
        from lion_pytorch import Lion

        return Lion(groups, weight_decay=weight_decay)
    raise AssertionError(f"unchecked optimizer {name!r}")  # optimizer_problems refuses unknown names first


class RelativeStep(torch.optim.lr_scheduler.LambdaLR):
    """Stands in for the learning-rate schedule of Adafactor's relative step, so the loop, the log and checkpoints
    treat every optimizer alike: it leaves the optimizer's step size alone and reports its base, min(1e-2,
    1/sqrt(step)) (each weight's step is that times the weight's RMS)."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        for group in optimizer.param_groups:
            group["initial_lr"] = 0.0  # Adafactor ignores group["lr"] under relative step
        super().__init__(optimizer, lambda _: 0.0)

    def get_last_lr(self) -> list[float]:
        return [min(1e-2, 1 / math.sqrt(max(1, self.last_epoch)))]


def make_lr_scheduler(name: str, optimizer, schedule: str, warmup_steps: int, total_steps: int):
    """The learning-rate schedule, stepped once per optimizer step (so warm-up counts optimizer steps)."""
    if name == "adafactor":
        return RelativeStep(optimizer)
    return get_scheduler(schedule, optimizer=optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
