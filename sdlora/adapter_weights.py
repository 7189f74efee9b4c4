"""LoHa, LoKr and DoRA weights as a file stores them, and the weight delta each makes, computed the way
AUTOMATIC1111 (extensions-builtin/Lora: network_hada.py, network_lokr.py, network.py) and ComfyUI
(comfy/weight_adapter: loha.py, lokr.py, base.py) compute it when they load the file.

Shapes are the file's: a k x k convolution's "in" side is flattened to in * k * k, as Conv2d weights flatten, and
the delta is returned as an fp32 [out, in * k * k] matrix (reshape it to the weight's shape). Needs no layer and
no training code: lora_file.py parses files into these, the adapter layers (adapters.py, lora_diffusion.py) write
them.
"""

import math
from dataclasses import dataclass

import torch


def factorization(dimension: int, factor: int) -> tuple[int, int] | None:
    """LoKr's split of a dimension into (m, n), m * n = dimension, m <= n (LyCORIS's rule): `factor` > 0 takes
    m = factor (or n = factor, whichever keeps m <= n) and must divide the dimension; `factor` -1 takes the most
    balanced split, m the largest divisor <= sqrt(dimension). Returns None when `factor` does not divide it."""
    if factor > 0:
        if dimension % factor:
            return None
        return tuple(sorted((factor, dimension // factor)))
    m = max(d for d in range(1, math.isqrt(dimension) + 1) if dimension % d == 0)
    return m, dimension // m


def weight_decompose(weight: torch.Tensor, delta: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """DoRA (Liu et al. 2024, arXiv:2402.09353) as AUTOMATIC1111 and ComfyUI merge a `dora_scale` file: with
    W' = W + delta (delta already scaled by alpha / rank: A1111's `finalize_updown` scales before it decomposes, and
    ComfyUI multiplies the diff by alpha first), the new weight is dora_scale * W' / ||W'|| and the returned
    difference is that minus W. The norm is taken per *input* column (over the output and kernel axes):
    A1111 network.py `NetworkModule.apply_weight_decompose` always does so (`merged.transpose(0, 1).reshape(in, -1)
    .norm(dim=1)`), and ComfyUI base.py `weight_decompose` does when `dora_scale.shape[0]` is not the output size,
    which our [1, in(, 1, 1)] magnitude never is. The user's multiplier scales the returned difference in both.

    weight: the base weight, any shape [out, in, ...]; delta: same numel; dora_scale: [1, in, 1...]. fp32 result
    shaped like `weight`."""
    weight = weight.float()
    merged = weight + delta.float().reshape(weight.shape)
    norm = column_norm(merged)
    return merged * (dora_scale.float().reshape(norm.shape) / norm) - weight


def column_norm(weight: torch.Tensor) -> torch.Tensor:
    """||W||_c per input column: [out, in, k, k] -> [1, in, 1, 1] ([out, in] -> [1, in]), the norm over every axis
    but the input one: DoRA's magnitude axis in kohya/LyCORIS files (see weight_decompose)."""
    by_column = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
    return by_column.reshape(1, weight.shape[1], *[1] * (weight.dim() - 2))


@dataclass
class LoHaModule:
    """One module's LoHa (Hadamard product of two low-rank products, Hyeon-Woo et al. 2022, arXiv:2108.06098):

        delta = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank,    rank = w1_b.shape[0]

    w1_a, w2_a: [out, rank]; w1_b, w2_b: [rank, in * k * k] (no CP cores: `hada_t1`/`hada_t2` are not written).
    Keys: `<name>.hada_w1_a`, `.hada_w1_b`, `.hada_w2_a`, `.hada_w2_b`, `.alpha` (A1111 network_hada.py:
    dim = w1_b.shape[0]; ComfyUI loha.py the same)."""

    w1_a: torch.Tensor
    w1_b: torch.Tensor
    w2_a: torch.Tensor
    w2_b: torch.Tensor
    alpha: float
    network_type = "loha"

    @property
    def rank(self) -> int:
        return self.w1_b.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def shape_2d(self) -> tuple[int, int]:
        return self.w1_a.shape[0], self.w1_b.flatten(1).shape[1]

    def delta(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 [out, in * k * k]; `weight` (the base weight) is not needed."""
        first = self.w1_a.float() @ self.w1_b.flatten(1).float()
        second = self.w2_a.float() @ self.w2_b.flatten(1).float()
        return first * second * self.scale

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {f"{name}.hada_w1_a": self.w1_a, f"{name}.hada_w1_b": self.w1_b, f"{name}.hada_w2_a": self.w2_a,
                f"{name}.hada_w2_b": self.w2_b, f"{name}.alpha": torch.tensor(self.alpha, dtype=torch.float32)}


@dataclass
class LoKrModule:
    """One module's LoKr (Kronecker product, LyCORIS; Edalati et al. 2022, arXiv:2212.10650):

        delta = kron(w1, w2) * scale,   w1 = `lokr_w1` [out1, in1] whole (the small factor; other trainers may
                                             write `lokr_w1_a` @ `lokr_w1_b`, which is read, never written),
                                        w2 = `lokr_w2` [out2, in2 * k * k] whole, or `lokr_w2_a` [out2, r] @
                                             `lokr_w2_b` [r, in2 * k * k]

    with out = out1 * out2 and in = in1 * in2. scale = alpha / r when w2 is factored, and 1 when both are whole:
    A1111 network_lokr.py takes dim from `lokr_w2_b` (else `lokr_w1_b`) and ComfyUI lokr.py likewise, ignoring
    alpha when no factor is low-rank. w2 is always written 2-D: both clients take kron(w1, w2) of 2-D factors and
    reshape it to the weight's shape, which for a k x k kernel is the same as the kron of a 4-D w2 [out2, in2, k, k]
    with w1 [out1, in1, 1, 1] (in * k * k flattens as in1, then in2 * k * k)."""

    w1: torch.Tensor | None
    w2: torch.Tensor | None
    w2_a: torch.Tensor | None
    w2_b: torch.Tensor | None
    alpha: float
    w1_a: torch.Tensor | None = None
    w1_b: torch.Tensor | None = None
    network_type = "lokr"

    @property
    def rank(self) -> int:
        """The inner size of the low-rank factor w2_a @ w2_b (else w1_a @ w1_b's); with both factors whole, the
        smaller side of w2 (what `ss_network_dim` shows, no scale depends on it)."""
        if self.w2 is None:
            return self.w2_b.shape[0]
        if self.w1 is None:
            return self.w1_b.shape[0]
        return min(self.w2.shape[0], self.w2.flatten(1).shape[1])

    @property
    def scale(self) -> float:
        return 1.0 if self.w2 is not None and self.w1 is not None else self.alpha / self.rank

    def whole_w1(self) -> torch.Tensor:
        return self.w1.float() if self.w1 is not None else self.w1_a.float() @ self.w1_b.float()

    def whole_w2(self) -> torch.Tensor:
        """w2 as an fp32 [out2, in2 * k * k] matrix."""
        if self.w2 is not None:
            return self.w2.flatten(1).float()
        return self.w2_a.float() @ self.w2_b.flatten(1).float()

    @property
    def shape_2d(self) -> tuple[int, int]:
        out2, in2 = (self.w2.flatten(1).shape if self.w2 is not None else (self.w2_a.shape[0], self.w2_b.shape[1]))
        out1, in1 = self.w1.shape if self.w1 is not None else (self.w1_a.shape[0], self.w1_b.shape[1])
        return out1 * out2, in1 * in2

    def delta(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 [out, in * k * k]; `weight` (the base weight) is not needed."""
        return torch.kron(self.whole_w1(), self.whole_w2()) * self.scale

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        found = ({f"{name}.lokr_w1": self.w1} if self.w1 is not None
                 else {f"{name}.lokr_w1_a": self.w1_a, f"{name}.lokr_w1_b": self.w1_b})
        if self.w2 is not None:
            found[f"{name}.lokr_w2"] = self.w2
        else:
            found |= {f"{name}.lokr_w2_a": self.w2_a, f"{name}.lokr_w2_b": self.w2_b}
        return found | {f"{name}.alpha": torch.tensor(self.alpha, dtype=torch.float32)}
