"""The UNet's large convolutions and matmuls in fp32 on a CPU whose bf16 (or fp16) kernels are slower.

A CPU without bf16 matrix units (AMX) multiplies bf16 no faster than fp32, and oneDNN's bf16 kernels then lose to
its fp32 ones. On a 2-core avx512_bf16 Xeon, forward and backward to the input: a 3x3 convolution of 320 channels
over 64 x 64 positions takes 105 ms in bf16 against 72 in fp32, a 4096 x 320 -> 2560 linear layer 98 against 75 ms
(benchmarks/bench_kernels.py). An AMD EPYC with avx512_bf16 is the other way round (108 against 185 ms for the
convolution). So a short timing at
start decides, and the decision is kept with the run's checkpoints, so that a resumed run computes as the original
did.

Where fp32 is faster, each frozen Conv2d and Linear of the UNet over at least MIN_POSITIONS positions (pixels times
batch, or rows) reads its bf16 input and weight as fp32, computes in fp32 and rounds its output to bf16, as the
bf16 kernel does after accumulating in fp32; its input gradient likewise. Smaller layers (SD 1.4's 16 x 16 and 8 x 8
levels at 512 px) stay with the bf16 kernels, which are as fast or faster there. Only the frozen weight is kept for
the backward pass, never an fp32 copy. On a GPU, and in fp32, nothing changes.
"""

import time

import torch
import torch.nn as nn
import torch.nn.functional as F

MIN_POSITIONS = 1024  # below this, the fp32 kernel's gain does not pay for reading the weight as fp32
FASTER_BY = 0.9  # fp32 is taken only when it needs at most this share of the low-precision kernels' time


class _ConvInFp32(torch.autograd.Function):
    """conv2d of a frozen layer in fp32 arithmetic; the output and input gradient in the layer's own dtypes."""

    @staticmethod
    def forward(ctx, x, weight, bias, conv: nn.Conv2d):
        ctx.save_for_backward(weight)  # the frozen bf16 weight itself: no fp32 copy waits for the backward pass
        ctx.conv, ctx.input_shape, ctx.input_dtype = conv, x.shape, x.dtype
        bias = None if bias is None else bias.float()
        out = F.conv2d(x.float(), weight.float(), bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        return out.to(weight.dtype)

    @staticmethod
    def backward(ctx, grad):
        (weight,), conv = ctx.saved_tensors, ctx.conv
        grad_input = torch.nn.grad.conv2d_input(ctx.input_shape, weight.float(), grad.float(), conv.stride,
                                                conv.padding, conv.dilation, conv.groups)
        return grad_input.to(ctx.input_dtype), None, None, None


class _LinearInFp32(torch.autograd.Function):
    """linear of a frozen layer in fp32 arithmetic; the output and input gradient in the layer's own dtypes."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        ctx.input_dtype = x.dtype
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(weight.dtype)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return (grad.float() @ weight.float()).to(ctx.input_dtype), None, None


def _in_fp32(layer: nn.Module, positions: int) -> bool:
    return (positions >= MIN_POSITIONS and layer.weight.dtype != torch.float32 and not layer.weight.requires_grad
            and (layer.bias is None or not layer.bias.requires_grad))


class Float32Conv2d(nn.Conv2d):
    """A frozen Conv2d that computes in fp32 over MIN_POSITIONS positions or more (see the module's docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.padding_mode != "zeros" or isinstance(self.padding, str) or x.ndim != 4
                or not _in_fp32(self, x.shape[0] * x.shape[2] * x.shape[3])):
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):  # autocast would cast the fp32 copies back down
            return _ConvInFp32.apply(x, self.weight, self.bias, self)


class Float32Linear(nn.Linear):
    """A frozen Linear that computes in fp32 over MIN_POSITIONS rows or more (see the module's docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _in_fp32(self, x.numel() // max(x.shape[-1], 1)):
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return _LinearInFp32.apply(x, self.weight, self.bias)


def kernel_timings(dtype: torch.dtype, repeats: int = 3) -> tuple[float, float]:
    """(fp32 seconds, `dtype` seconds): the median of `repeats` forward and backward passes of SD 1.4's first-level
    3x3 convolution and feed-forward linear layer at 512 px, the two precisions taken in turn."""
    generator = torch.Generator().manual_seed(0)
    conv_weight = torch.randn(320, 320, 3, 3, generator=generator) * 0.02
    linear_weight = torch.randn(1280, 320, generator=generator) * 0.05
    image = torch.randn(1, 320, 64, 64, generator=generator)
    rows = image.flatten(2).transpose(1, 2)

    def one_pass(precision: torch.dtype) -> float:
        x, y = image.to(precision).requires_grad_(), rows.to(precision).requires_grad_()
        start = time.perf_counter()
        F.conv2d(x, conv_weight.to(precision), padding=1).sum().backward()
        F.linear(y, linear_weight.to(precision)).sum().backward()
        return time.perf_counter() - start

    seconds = {torch.float32: [], dtype: []}
    for index in range(repeats + 1):  # the first round warms the kernels up
        for precision in seconds:
            taken = one_pass(precision)
            if index:
                seconds[precision].append(taken)
    fp32, low = (sorted(seconds[p])[repeats // 2] for p in (torch.float32, dtype))
    return fp32, low


def fp32_kernels_pay(dtype: torch.dtype) -> tuple[bool, str]:
    """(whether the UNet's large layers in `dtype`, bf16 or fp16, should compute in fp32 on this CPU, a line saying
    why), from kernel_timings."""
    fp32, low = kernel_timings(dtype)
    name = str(dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float16", "fp16")
    faster = fp32 <= FASTER_BY * low
    verdict = "large convolutions and matmuls in fp32" if faster else f"{name} kernels kept"
    return faster, f"CPU kernels: fp32 {fp32 * 1000:.0f} ms, {name} {low * 1000:.0f} ms per probe pass: {verdict}"


def use_fp32_kernels(unet: nn.Module) -> int:
    """Give each frozen bf16 or fp16 Conv2d and Linear of `unet` (the LoRA layers' bases among them, not their own
    fp32 weights) the fp32 forward; returns how many. Their weights and state-dict keys are unchanged."""
    count = 0
    for module in unet.modules():
        fp32_class = {nn.Conv2d: Float32Conv2d, nn.Linear: Float32Linear}.get(type(module))
        if fp32_class and not module.weight.requires_grad and module.weight.dtype != torch.float32:
            module.__class__ = fp32_class
            count += 1
    return count
