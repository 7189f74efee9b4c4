"""The optimizers a LoRA can be trained with, each from the package that keeps it, installed only by who picks it.

    adamw      torch.optim.AdamW (the default)
    adamw8bit  bitsandbytes' 8-bit AdamW: its two moments in 8 bits, a quarter of AdamW's optimizer memory
    prodigy    Prodigy (Mishchenko & Defazio 2024, arXiv:2306.06101): estimates the step size itself, so
               learning_rate is a multiplier of that estimate, 1.0 as usual
    adafactor  transformers' Adafactor (Shazeer & Stern 2018): factored second moments, the least memory; at the
               learning rate given (relative_step and scale_parameter off). Its own relative step scales each
               step by the weight's RMS, and a LoRA's up weights start at zero: on the tiny model it drew the
               concept in 15 % of samples after demo.py's 600 steps, where AdamW drew it in 84 %
    lion       Lion (Chen et al. 2023, arXiv:2302.06675): the sign of a momentum, one moment; wants a learning
               rate 3-10x smaller than AdamW's and a weight decay 3-10x larger
"""

import importlib.util
from dataclasses import dataclass

import torch


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


def optimizer_problem(name: str, learning_rate: float) -> str | None:
    """What is wrong with training with optimizer `name` at `learning_rate`, or None."""
    if name not in OPTIMIZERS:
        return f"--optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}"
    choice = OPTIMIZERS[name]
    if importlib.util.find_spec(choice.module) is None:
        return (f"--optimizer {name} needs the {choice.module} package: pip install {choice.pip} "
                f"(or pick another optimizer, e.g. adamw)")
    if name == "prodigy" and learning_rate < PRODIGY_LR_AT_LEAST:
        return (f"--optimizer prodigy with --learning_rate {learning_rate}: Prodigy finds the step size itself and "
                f"learning_rate multiplies it; set --learning_rate 1.0 (0.5 for a gentler run)")
    return None


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

        return Adafactor(groups, lr=groups[0]["lr"], relative_step=False, scale_parameter=False, warmup_init=False,
                         weight_decay=weight_decay)
    if name == "lion":
        from lion_pytorch import Lion

        return Lion(groups, weight_decay=weight_decay)
    raise AssertionError(f"unchecked optimizer {name!r}")  # optimizer_problem refuses unknown names first


def make_optimizer(cfg, network) -> torch.optim.Optimizer:
    """The chosen optimizer over the LoRA weights: the UNet's at learning_rate, the text encoder's at
    text_encoder_lr, a trained token's embedding at train_token_lr."""
    groups = [{"params": [p for (name, _), layer in network.layers.items() if name == model_name
                          for p in layer.trainable_parameters()], "lr": lr}
              for model_name, lr in (("unet", cfg.learning_rate),
                                     ("text_encoder", cfg.text_encoder_lr or cfg.learning_rate))]
    if network.token is not None:  # decay would pull the vectors towards zero, away from every word
        groups.append({"params": [network.token.vectors], "lr": cfg.train_token_lr, "weight_decay": 0.0})
    return build_optimizer(cfg.optimizer, [group for group in groups if group["params"]], cfg.adam_weight_decay)
