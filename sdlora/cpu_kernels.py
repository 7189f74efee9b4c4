"""Which parts of a bf16 (or fp16) UNet step compute in fp32 on this CPU: the attention product, and the large
convolutions and matmuls. Each is timed at start and taken in fp32 only where that is faster here.

CPUs differ both ways. A CPU without bf16 matrix units (AMX) may multiply bf16 no faster than fp32, and oneDNN's
bf16 kernels then lose to its fp32 ones: on a 2-core avx512_bf16 Xeon, forward and backward to the input, a 3x3
convolution of 320 channels over 64 x 64 positions took 105 ms in bf16 against 72 in fp32, and attention over 4096
tokens 801 ms against 448 (benchmarks/bench_kernels.py). An AMD EPYC (Zen 4) is the other way round for both: 39
against 80 ms for the convolution, 486 against 601 for attention. So a short timing at start decides each
(fp32_choices), and the decision is kept with the run's checkpoints, so that a resumed run computes as the
original did.

Where fp32 kernels are faster, each frozen Conv2d and Linear of the UNet (and of the VAE and text encoder, which
train_lora.py gives the same choice) over at least MIN_POSITIONS positions (pixels times batch, or rows) reads its
bf16 input and weight as fp32, computes in fp32 and rounds its output to bf16, as the bf16 kernel does after
accumulating in fp32; its input gradient likewise. Smaller layers (SD 1.4's 16 x 16 and 8 x 8 levels at 512 px) stay
with the bf16 kernels, which are as fast or faster there. Only the frozen weight is kept for the backward pass,
never an fp32 copy. Where fp32 attention is faster, attention.py's processor takes the product in fp32. On a GPU,
and in fp32, nothing changes.

A CPU without any bf16 instructions (AVX2 only: no avx512_bf16, no AMX) is another case: there oneDNN's bf16
kernels crawl (a 3x3 convolution of 128 channels over 128 x 128: 47 ms in fp32, 17,680 in bf16, 376 times, on an
AVX2-only EPYC with torch 2.14.1), and no choice of parts saves the run, since the VAE, the text encoder and the
UNet's small layers still compute in bf16. check_cpu_precision times a small probe at start and stops such a run
with the fix, --mixed_precision no, before any model loads.
"""

import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from sdlora.attention import use_fp32_attention
from sdlora.settings import PRECISION_DTYPES, ConfigError

MIN_POSITIONS = 1024  # below this, the fp32 kernel's gain does not pay for reading the weight as fp32
FASTER_BY = 0.9  # fp32 is taken only when it needs at most this share of the low-precision kernels' time
# A low precision whose probe takes more than this multiple of fp32's time is refused on the CPU. bf16 can buy at
# most 2x on a CPU (half the bytes moved), so a kernel 3x slower never pays for itself; CPUs with bf16 instructions
# time 0.4-1.5x (Zen 4, a 2-core avx512_bf16 Xeon), CPUs without them hundreds of times (376x above): 3 lies
# between, twice the Xeon's 1.5 so that a loaded machine's noise does not refuse a CPU that has them.
CRAWL_RATIO = 3.0
CONFIRMATIONS = 3  # probes that must all find the low precision crawling before a run is refused


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


def timed_in_turn(one_pass, dtype: torch.dtype, repeats: int, fastest: bool = False) -> tuple[float, float]:
    """(fp32 seconds, `dtype` seconds): the median (or with `fastest`, the minimum) of `repeats` calls of
    `one_pass(precision)` (which returns its seconds) in each precision, the two taken in turn so that a change in
    the machine's speed hits both alike."""
    seconds = {torch.float32: [], dtype: []}
    for index in range(repeats + 1):  # the first round warms the kernels up
        for precision in seconds:
            taken = one_pass(precision)
            if index:
                seconds[precision].append(taken)
    fp32, low = (sorted(seconds[p])[0 if fastest else repeats // 2] for p in (torch.float32, dtype))
    return fp32, low


def kernel_timings(dtype: torch.dtype, repeats: int = 3) -> tuple[float, float]:
    """(fp32 seconds, `dtype` seconds): forward and backward passes of SD 1.4's first-level 3x3 convolution and
    feed-forward linear layer at 512 px."""
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

    return timed_in_turn(one_pass, dtype, repeats)


def attention_timings(dtype: torch.dtype, repeats: int = 3) -> tuple[float, float]:
    """(fp32 seconds, `dtype` seconds): forward and backward passes of SD 1.4's largest self-attention at 512 px
    (4096 tokens, 8 heads of 40) from a query, key and value in `dtype`; the fp32 pass includes the processor's
    casts up and back down, as a training step pays them."""
    generator = torch.Generator().manual_seed(0)
    qkv = [torch.randn(1, 8, 4096, 40, generator=generator).to(dtype) for _ in range(3)]

    def one_pass(precision: torch.dtype) -> float:
        query, key, value = (t.detach().requires_grad_() for t in qkv)
        start = time.perf_counter()
        out = F.scaled_dot_product_attention(*(t.to(precision) for t in (query, key, value)))
        out.to(dtype).sum().backward()
        return time.perf_counter() - start

    return timed_in_turn(one_pass, dtype, repeats)


def low_precision_timings(dtype: torch.dtype, repeats: int = 5) -> tuple[float, float]:
    """(fp32 seconds, `dtype` seconds): the fastest of `repeats` forward passes of a 3x3 convolution (64 channels
    over 32 x 32) and a linear layer (256 to 256 features on 1024 rows), a millisecond or two in fp32: small enough
    that a CPU emulating bf16 at hundreds of times the cost still answers within seconds. The fastest, not the
    median: on a busy machine a pass this short is often interrupted (here a 1 ms pass once took 9), and
    interruptions only ever add time."""
    generator = torch.Generator().manual_seed(0)
    image, conv_weight = torch.randn(1, 64, 32, 32, generator=generator), torch.randn(64, 64, 3, 3, generator=generator)
    rows, linear_weight = torch.randn(1024, 256, generator=generator), torch.randn(256, 256, generator=generator)

    def one_pass(precision: torch.dtype) -> float:
        x, w, y, v = (t.to(precision) for t in (image, conv_weight, rows, linear_weight))
        start = time.perf_counter()
        F.conv2d(x, w, padding=1)
        F.linear(y, v)
        return time.perf_counter() - start

    return timed_in_turn(one_pass, dtype, repeats, fastest=True)


def check_cpu_precision(mixed_precision: str, device: torch.device | str) -> None:
    """Stop a run on the CPU whose `mixed_precision` (bf16 or fp16) computes more than CRAWL_RATIO times slower than
    fp32 here (low_precision_timings), before any model loads: a ConfigError naming the option, the measured
    figures and the fix, `--mixed_precision no`. One timing decides for every frozen model (VAE, text encoder,
    UNet); on a GPU, and in fp32, nothing is timed."""
    dtype = PRECISION_DTYPES[mixed_precision]
    if dtype == torch.float32 or torch.device(device).type != "cpu":
        return
    for _ in range(CONFIRMATIONS):  # a refusal needs every probe to say so
        fp32, low = low_precision_timings(dtype)
        if low <= CRAWL_RATIO * fp32:
            return
    raise ConfigError(
        f"--mixed_precision {mixed_precision}: {mixed_precision} computes {low / fp32:.0f}x slower than fp32 on this "
        f"CPU (a 3x3 convolution and a linear layer: fp32 {fp32 * 1000:.1f} ms, {mixed_precision} {low * 1000:.1f} ms; "
        f"over {CRAWL_RATIO:.0f}x, as where bf16 instructions such as avx512_bf16 or AMX are missing), so the run "
        f"would crawl; use --mixed_precision no")


def fp32_choices(dtype: torch.dtype) -> tuple[dict[str, bool], str]:
    """({"fp32_attention": ..., "fp32_kernels": ...}: whether each part of a UNet step in `dtype`, bf16 or fp16,
    should compute in fp32 on this CPU, a line saying why), from attention_timings and kernel_timings."""
    name = str(dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float16", "fp16")
    choices, parts = {}, []
    for key, label, timings in (("fp32_attention", "attention", attention_timings),
                                ("fp32_kernels", "large convolutions and matmuls", kernel_timings)):
        fp32, low = timings(dtype)
        choices[key] = fp32 <= FASTER_BY * low
        parts.append(f"{label} fp32 {fp32 * 1000:.0f} ms, {name} {low * 1000:.0f} ms: "
                     f"{'fp32' if choices[key] else name} taken")
    return choices, "CPU kernels (per probe pass): " + "; ".join(parts)


def use_fp32_choices(model: nn.Module, choices: dict[str, bool]) -> None:
    """Give `model` (the UNet, VAE or text encoder: one timing decides for all) the fp32 attention and fp32 kernels
    that `choices` (fp32_choices's) take; layers that are not SD's plain attention keep their processor."""
    if choices["fp32_attention"]:
        use_fp32_attention(model)
    if choices["fp32_kernels"]:
        use_fp32_kernels(model)


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
