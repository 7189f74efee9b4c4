"""Exponential moving average of weights, with a warm-up, for the LoRA trainer and the tiny model's pretraining.

Without a warm-up, an average that starts at zero-initialised weights (a LoRA's `up`) keeps decay^steps of that
start: 0.999 over 1000 steps leaves 0.37 of it, so the averaged file lands at about half strength. The warm-up
(effective decay min(decay, (1 + t) / (10 + t)) at update t, as diffusers' EMAModel) forgets the start quickly
and reaches `decay` only once the run is long enough for it.
"""

from contextlib import contextmanager

import torch


class Ema:
    """ema = d * ema + (1 - d) * weight after each update, d = min(decay, (1 + t) / (10 + t)), t = updates so far
    including this one. Start it from the weights training starts from (on a resume: the resumed ones)."""

    def __init__(self, parameters: list[torch.Tensor], decay: float, updates: int = 0):
        self.parameters, self.decay, self.updates = list(parameters), decay, updates
        self.shadow = [p.detach().clone() for p in self.parameters]

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        weight = 1 - self.current_decay()
        for shadow, parameter in zip(self.shadow, self.parameters):
            shadow.lerp_(parameter.detach(), weight)

    @torch.no_grad()
    def copy_to_parameters(self) -> None:
        for shadow, parameter in zip(self.shadow, self.parameters):
            parameter.copy_(shadow)

    @contextmanager
    def swapped_in(self):
        """The averaged weights in the parameters for the block (to save or sample them), the live ones after."""
        live = [p.detach().clone() for p in self.parameters]
        self.copy_to_parameters()
        try:
            yield
        finally:
            with torch.no_grad():
                for parameter, value in zip(self.parameters, live):
                    parameter.copy_(value)
