"""The adapter layers beside LoRA: what every layer shares (AdapterLayer), and LoHa and LoKr, the LyCORIS types
that AUTOMATIC1111 and ComfyUI read from the same file as LoRA.

Each layer wraps a frozen `nn.Linear` or `nn.Conv2d` by composition and adds multiplier * F(x, delta_weight), F the
base's own operation (linear, or convolution with the base's stride and padding): the update is built as a weight,
as the clients build it when they load the file (adapter_weights.py), because neither type factors into two small
projections. Every layer's weights are fp32 whatever the base dtype; a zero-initialised layer is an exact no-op.
LoRALayer and DoRALayer live in lora_diffusion.py.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from sdlora.adapter_weights import LoHaModule, LoKrModule, factorization
from sdlora.lora_file import LoRAError


class AdapterLayer(nn.Module):
    """What every adapter layer shares: the frozen `base`, the user's `multiplier` (1 as trained), `rank`, `alpha`
    and `scale`, and the dropouts that leave parts of the update out of a training step (never in eval mode):

    module_dropout: with this probability the whole update is left out of a forward pass (kohya's module_dropout);
    rank_dropout: each rank (LoRA, DoRA) or output row of the update (LoHa, LoKr, as LyCORIS) is left out with this
        probability and the rest scaled by 1 / (1 - p), so the update keeps its expected size (kohya, LyCORIS).

    A subclass sets `network_type`, builds its weights, and gives delta_weight (the update at multiplier 1 as an
    fp32 tensor shaped like the base weight), trainable_parameters, file_module and load_file_module."""

    network_type = ""

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, alpha: float, module_dropout: float = 0.0,
                 rank_dropout: float = 0.0):
        super().__init__()
        check_wrappable(base, self.network_type)
        if rank < 1:
            raise LoRAError(f"rank must be a positive integer, got {rank}")
        self.base = base
        self.rank = rank
        self.alpha = float(alpha)
        self.scale = self.alpha / rank
        self.multiplier = 1.0
        self.module_dropout = module_dropout
        self.rank_dropout = rank_dropout

    def skips_this_pass(self) -> bool:
        """Module dropout: True when this training forward pass leaves the update out (one draw of torch's
        generator per pass, none when module_dropout is 0, so runs without it draw exactly as before)."""
        return self.training and self.module_dropout > 0 and torch.rand(1).item() < self.module_dropout

    def left_out(self, out: torch.Tensor) -> torch.Tensor:
        """`out` for a pass module dropout skipped, with this layer's parameters still in the graph (at gradient
        0): several-GPU training all-reduces every parameter's gradient at each step and stops when one took no part
        in the pass. Adding -0.0 or 0.0 leaves every value as it is."""
        return out + sum(p.sum() for p in self.trainable_parameters()) * 0

    def kept_share(self, count: int, device: torch.device) -> torch.Tensor | None:
        """Rank dropout's mask over `count` ranks or rows, already scaled by 1 / (1 - p); None when off."""
        if not (self.training and self.rank_dropout > 0):
            return None
        return (torch.rand(count, device=device) >= self.rank_dropout).float() / (1 - self.rank_dropout)

    def apply_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base's operation with `weight` (reshaped to the base's) and no bias."""
        weight = weight.reshape(self.base.weight.shape)
        if isinstance(self.base, nn.Linear):
            return F.linear(x, weight)
        return F.conv2d(x, weight, None, self.base.stride, self.base.padding, self.base.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.multiplier == 0:
            return out
        if self.skips_this_pass():
            return self.left_out(out)
        if not torch.is_autocast_enabled(x.device.type):
            # Under autocast the operations cast x to the autocast dtype themselves: an fp32 copy first would be
            # wasted work (and memory kept for the backward pass) with the same result.
            x = x.to(torch.float32)
        return out + self.update(x).to(out.dtype)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """multiplier x the update's output for x (fp32 unless under autocast): here the delta weight applied."""
        return self.multiplier * self.apply_weight(x, self.training_delta())

    def training_delta(self) -> torch.Tensor:
        """delta_weight with rank dropout's row mask in training (LyCORIS drops output rows of the update)."""
        delta = self.delta_weight()
        kept = self.kept_share(delta.shape[0], delta.device)
        return delta if kept is None else delta * kept.reshape(-1, *[1] * (delta.dim() - 1))

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def trainable_parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError


def check_wrappable(base: nn.Module, network_type: str) -> None:
    """Only a Linear or a plain convolution can take an adapter: a grouped or non-zero-padded convolution's weight
    does not mean what the file's delta assumes."""
    if isinstance(base, nn.Linear):
        return
    if not isinstance(base, nn.Conv2d) or base.groups != 1 or base.padding_mode != "zeros":
        detail = (f"groups={base.groups}, padding_mode={base.padding_mode!r}" if isinstance(base, nn.Conv2d)
                  else type(base).__name__)
        raise LoRAError(f"network_type {network_type or 'lora'}: only nn.Linear and plain nn.Conv2d layers can "
                        f"take an adapter, got {detail}; leave this module out of the targets")


def _in_size(base: nn.Linear | nn.Conv2d) -> int:
    """The flattened input side of the base weight: in, or in * k * k."""
    return base.weight[0].numel()


class LoHaLayer(AdapterLayer):
    """LoHa (Hyeon-Woo et al. 2022, arXiv:2108.06098; LyCORIS `loha`): the update is the Hadamard product of two
    rank-`rank` products,

        delta_weight = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank     [out, in * k * k], reshaped to the weight

    w1_a, w2_a: [out, rank]; w1_b, w2_b: [rank, in * k * k]. Its rank is up to rank^2 for the parameters of a
    rank-2r LoRA. Init as LyCORIS: w1_a ~ N(0, 0.1^2), w1_b and w2_b ~ N(0, 1), w2_a zeros, so the update starts
    at exactly zero and every factor gets a gradient from the first step on (w1's through w2_a)."""

    network_type = "loha"

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int = 4, alpha: float = 4.0, module_dropout: float = 0.0,
                 rank_dropout: float = 0.0):
        super().__init__(base, rank, alpha, module_dropout, rank_dropout)
        out_features, in_size, device = base.weight.shape[0], _in_size(base), base.weight.device
        self.w1_a = nn.Parameter(torch.empty(out_features, rank, device=device))
        self.w1_b = nn.Parameter(torch.empty(rank, in_size, device=device))
        self.w2_a = nn.Parameter(torch.empty(out_features, rank, device=device))
        self.w2_b = nn.Parameter(torch.empty(rank, in_size, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w1_a, std=0.1)
        nn.init.normal_(self.w1_b, std=1.0)
        nn.init.normal_(self.w2_b, std=1.0)
        nn.init.zeros_(self.w2_a)

    def delta_weight(self) -> torch.Tensor:
        delta = (self.w1_a @ self.w1_b) * (self.w2_a @ self.w2_b) * self.scale
        return delta.reshape(self.base.weight.shape)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self.w1_a, self.w1_b, self.w2_a, self.w2_b]

    def file_module(self) -> LoHaModule:
        copies = [p.detach().float().cpu().contiguous() for p in self.trainable_parameters()]
        return LoHaModule(*copies, alpha=self.alpha)

    @torch.no_grad()
    def load_file_module(self, module: LoHaModule) -> None:
        for parameter, value in zip(self.trainable_parameters(), (module.w1_a, module.w1_b, module.w2_a, module.w2_b)):
            parameter.copy_(value.reshape(parameter.shape))


class LoKrLayer(AdapterLayer):
    """LoKr (LyCORIS `lokr`; Edalati et al. 2022, arXiv:2212.10650): the update is a Kronecker product,

        delta_weight = kron(w1, w2) * scale      [out1 * out2, in1 * in2 * k * k], reshaped to the weight

    with out = out1 * out2 and in = in1 * in2 split by LyCORIS's `factorization(dim, factor)` (out1 <= out2, the
    same for in; factor -1: the most balanced split). w1 [out1, in1] is kept whole, as LyCORIS does by default: it is
    the small factor (about sqrt(out) x sqrt(in), or factor x factor). w2 [out2, in2 * k * k] is low-rank,
    w2_a [out2, rank] @ w2_b [rank, in2 * k * k] with scale alpha / rank, unless rank >= max(out2, in2) / 2 where
    LyCORIS keeps it whole too, and then scale is 1 (the clients ignore alpha when no factor is low-rank).
    Init as LyCORIS: w1 and w2_a Kaiming-uniform, w2 (or w2_b) zeros.

    `w1_shape` and `whole_w2` rebuild a layer for a file's weights (network_weights); by default they follow
    `factor` and `rank`."""

    network_type = "lokr"

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int = 4, alpha: float = 4.0, factor: int = -1,
                 module_dropout: float = 0.0, rank_dropout: float = 0.0, w1_shape: tuple[int, int] | None = None,
                 whole_w2: bool | None = None):
        super().__init__(base, rank, alpha, module_dropout, rank_dropout)
        out_features, in_features = base.weight.shape[:2]
        kernel = _in_size(base) // in_features
        if w1_shape is None:
            splits = factorization(out_features, factor), factorization(in_features, factor)
            if None in splits:
                raise LoRAError(f"--lokr_factor {factor} does not divide this layer's dimensions ({out_features} "
                                f"out, {in_features} in); use a factor that divides every target's dimensions "
                                f"(SD 1.x: 4 or 8 divide all), or -1 for the most balanced split of each")
            w1_shape = (splits[0][0], splits[1][0])
        out2, in2 = out_features // w1_shape[0], in_features // w1_shape[1]
        whole_w2 = rank >= max(out2, in2) / 2 if whole_w2 is None else whole_w2
        device = base.weight.device
        self.w1 = nn.Parameter(torch.empty(*w1_shape, device=device))
        if whole_w2:
            self.w2 = nn.Parameter(torch.empty(out2, in2 * kernel, device=device))
            self.scale = 1.0
        else:
            self.w2_a = nn.Parameter(torch.empty(out2, rank, device=device))
            self.w2_b = nn.Parameter(torch.empty(rank, in2 * kernel, device=device))
        self.whole_w2 = whole_w2
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.w1, a=math.sqrt(5))
        if self.whole_w2:
            nn.init.zeros_(self.w2)
        else:
            nn.init.kaiming_uniform_(self.w2_a, a=math.sqrt(5))
            nn.init.zeros_(self.w2_b)

    def delta_weight(self) -> torch.Tensor:
        w2 = self.w2 if self.whole_w2 else self.w2_a @ self.w2_b
        return (torch.kron(self.w1, w2) * self.scale).reshape(self.base.weight.shape)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self.w1, self.w2] if self.whole_w2 else [self.w1, self.w2_a, self.w2_b]

    def file_module(self) -> LoKrModule:
        def copy(parameter: nn.Parameter) -> torch.Tensor:
            return parameter.detach().float().cpu().contiguous()

        if self.whole_w2:
            return LoKrModule(copy(self.w1), copy(self.w2), None, None, alpha=self.alpha)
        return LoKrModule(copy(self.w1), None, copy(self.w2_a), copy(self.w2_b), alpha=self.alpha)

    @torch.no_grad()
    def load_file_module(self, module: LoKrModule) -> None:
        values = [module.w1] + ([module.w2] if self.whole_w2 else [module.w2_a, module.w2_b])
        for parameter, value in zip(self.trainable_parameters(), values):
            parameter.copy_(value.reshape(parameter.shape))
