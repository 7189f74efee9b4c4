"""The UNet's three kernel kinds at SD 1.4's 512 px shapes, forward and backward, per precision and per attention
backend: what a step can gain by picking a backend or a precision, before any whole-step benchmark.

    python benchmarks/bench_kernels.py            # writes benchmarks/results-kernels-<device>.json
    python benchmarks/bench_kernels.py OUT.json   # or there

Shapes (batch 1, 512 px, so 64 x 64 latents): the 3x3 convolution of the first level (320 channels), a
320 -> 320 projection and the 320 -> 2560 feed-forward over its 4096 tokens, and self-attention over those 4096
tokens (8 heads of 40); and the 3x3 convolutions of the two lowest levels (1280 channels over 16 x 16 and
8 x 8), where a layer has few positions for its weights. Gradients go to the input only, as in LoRA training
where the base weights are frozen. Each entry is the median of 5 timed repeats after 2 warm-ups.
"""

import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "math": SDPBackend.MATH}


def seconds(run, device: str) -> float:
    """Median seconds of `run()` over 5 repeats after 2 warm-ups."""
    times = []
    for index in range(7):
        start = time.perf_counter()
        run()
        if device == "cuda":
            torch.cuda.synchronize()
        if index >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_backward(function, *inputs):
    """A run: `function(inputs)` and the backward of its sum to the inputs that need a gradient."""
    def run():
        function(*inputs).sum().backward()
        for tensor in inputs:
            tensor.grad = None
    return run


def kernels(dtype: torch.dtype, device: str) -> dict[str, float]:
    def tensor(*shape, grad=False):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)

    conv_input, conv_weight = tensor(1, 320, 64, 64, grad=True), tensor(320, 320, 3, 3)
    deep_weight = tensor(1280, 1280, 3, 3)
    tokens, projection, feed_forward = tensor(4096, 320, grad=True), tensor(320, 320), tensor(2560, 320)
    q, k, v = (tensor(1, 8, 4096, 40, grad=True) for _ in range(3))
    results = {
        "conv3x3 320ch 64x64": seconds(forward_backward(lambda x: F.conv2d(x, conv_weight, padding=1), conv_input),
                                       device),
        **{f"conv3x3 1280ch {side}x{side}": seconds(forward_backward(
            lambda x: F.conv2d(x, deep_weight, padding=1), tensor(1, 1280, side, side, grad=True)), device)
           for side in (16, 8)},
        "linear 4096x320 -> 320": seconds(forward_backward(lambda x: F.linear(x, projection), tokens), device),
        "linear 4096x320 -> 2560": seconds(forward_backward(lambda x: F.linear(x, feed_forward), tokens), device),
    }
    for name, backend in BACKENDS.items():
        def attention(q, k, v, backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)
        try:
            results[f"attention 4096 tokens, {name}"] = seconds(forward_backward(attention, q, k, v), device)
        except RuntimeError as error:  # a backend this device or dtype does not have
            results[f"attention 4096 tokens, {name}"] = f"unavailable: {str(error).splitlines()[0][:120]}"
    return results


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precisions = ["fp32", "bf16"] + (["fp16"] if device == "cuda" else [])
    torch.manual_seed(0)
    from bench_train import machine_name

    results = {"device": device, "machine": machine_name(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "seconds": {p: kernels(DTYPES[p], device) for p in precisions}}
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "benchmarks" / f"results-kernels-{device}.json"
    out.write_text(json.dumps(results, indent=1))
    names = list(results["seconds"]["fp32"])
    print("| kernel (forward + backward to the input) | " + " | ".join(precisions) + " |")
    print("|---|" + "---|" * len(precisions))
    for name in names:
        cells = [results["seconds"][p][name] for p in precisions]
        print(f"| {name} | " + " | ".join(f"{c * 1000:.1f} ms" if isinstance(c, float) else c for c in cells) + " |")
    print(f"\nwrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
