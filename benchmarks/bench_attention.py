"""Can the attention of a bf16 training step run faster on the CPU than PyTorch's flash kernel? Three alternatives,
timed against it at SD 1.4's largest self-attention (512 px: 4096 tokens, 8 heads of 40), forward and backward:

  padded   the head dimension zero-padded to 48 or 64 (the same product; aligned rows may vectorise better)
  blocked  the product written out in PyTorch ops over blocks of queries against all keys: logits and softmax
           in fp32, the two large products in bf16, the probabilities recomputed in the backward pass from the
           saved log-sum-exp, as a flash kernel does, but with whole key rows, so no running maximum is needed
  flex     torch.compile of FlexAttention, whose generated CPU kernel has a forward only (its backward raises on a
           CPU), so it is timed forward only, against flash's forward; it would only be worth pairing with flash's
           backward if its forward were much faster

    python benchmarks/bench_attention.py [OUT.json]

Each entry is bench_kernels.py's median of 5 timed repeats after 2 warm-ups, and each alternative's relative error
in the output (and the three input gradients) against fp32 flash attention is printed beside flash bf16's own.
"""

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from bench_kernels import forward_backward, seconds as median_seconds

ROOT = Path(__file__).resolve().parents[1]
TOKENS, HEADS, HEAD_DIM = 4096, 8, 40


class BlockedAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(d)) v for q, k, v of shape (batch, heads, tokens, d), `block` queries at a time."""

    @staticmethod
    def forward(ctx, q, k, v, block: int):
        scale = q.shape[-1] ** -0.5
        keys_t = k.float().transpose(-1, -2)
        out = torch.empty_like(q)
        log_sum_exp = torch.empty(q.shape[:-1], dtype=torch.float32)
        for start in range(0, q.shape[-2], block):
            rows = slice(start, start + block)
            logits = (q[..., rows, :].float() @ keys_t).mul_(scale)
            peak = logits.amax(-1, keepdim=True)
            weights = logits.sub_(peak).exp_()
            total = weights.sum(-1, keepdim=True)
            log_sum_exp[..., rows] = (peak + total.log()).squeeze(-1)
            out[..., rows, :] = weights.div_(total).to(q.dtype) @ v
        ctx.save_for_backward(q, k, v, out, log_sum_exp)
        ctx.block = block
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, log_sum_exp = ctx.saved_tensors
        scale = q.shape[-1] ** -0.5
        keys_t, values_t = k.float().transpose(-1, -2), v.float().transpose(-1, -2)
        grad_out = grad_out.contiguous()
        row_dot = (grad_out.float() * out.float()).sum(-1)  # sum_j p_ij dp_ij, the softmax backward's shift
        grad_q = torch.empty_like(q)
        grad_k, grad_v = torch.zeros(k.shape), torch.zeros(v.shape)
        for start in range(0, q.shape[-2], ctx.block):
            rows = slice(start, start + ctx.block)
            q_rows, grad_rows = q[..., rows, :], grad_out[..., rows, :]
            weights = (q_rows.float() @ keys_t).mul_(scale).sub_(log_sum_exp[..., rows, None]).exp_()
            grad_v += weights.to(q.dtype).transpose(-1, -2) @ grad_rows
            grad_weights = grad_rows.float() @ values_t
            grad_logits = weights.mul_(grad_weights.sub_(row_dot[..., rows, None])).mul_(scale).to(q.dtype)
            grad_q[..., rows, :] = grad_logits @ k
            grad_k += grad_logits.transpose(-1, -2) @ q_rows
        return grad_q, grad_k.to(k.dtype), grad_v.to(v.dtype), None


def padded(width: int):
    def attention(q, k, v):
        pad = (0, width - q.shape[-1])
        out = F.scaled_dot_product_attention(*(F.pad(t, pad) for t in (q, k, v)), scale=q.shape[-1] ** -0.5)
        return out[..., :q.shape[-1]]
    return attention


def timed(attention, inputs, grad_out):
    """(bench_kernels.py's median seconds of forward and backward, output, input gradients), the last two from one
    more pass with `grad_out` and in fp32 for comparing."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    seconds = median_seconds(forward_backward(attention, *leaves), "cpu")
    out = attention(*leaves)
    out.backward(grad_out)
    return seconds, out.detach().float(), [leaf.grad.float() for leaf in leaves]


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value - reference).norm() / reference.norm())


def forward_only(inputs, reference_out) -> dict:
    """Flash's forward against compiled FlexAttention's, both bf16, with the output's error against fp32 flash."""
    results = {}
    print(f"\n| attention, {TOKENS} tokens, forward only, bf16 | ms | relative error: out |\n|---|---|---|")
    for name, attention in {"flash forward": F.scaled_dot_product_attention,
                            "flex forward (compiled)": torch.compile(flex_attention)}.items():
        with torch.no_grad():
            seconds = median_seconds(lambda: attention(*inputs), "cpu")  # FlexAttention compiles in a warm-up
            error = relative_error(attention(*inputs).float(), reference_out)
        results[name] = {"ms": seconds * 1000, "relative_errors": [error]}
        print(f"| {name} | {seconds * 1000:.0f} | {error:.4f} |", flush=True)
    return results


def main() -> None:
    torch.manual_seed(0)
    inputs = [torch.randn(1, HEADS, TOKENS, HEAD_DIM) for _ in range(3)]
    grad_out = torch.randn(1, HEADS, TOKENS, HEAD_DIM)
    reference_seconds, reference_out, reference_grads = timed(F.scaled_dot_product_attention, inputs, grad_out)
    bf16_inputs, bf16_grad_out = [t.bfloat16() for t in inputs], grad_out.bfloat16()
    candidates = {"flash bf16": F.scaled_dot_product_attention, "padded to 48": padded(48),
                  "padded to 64": padded(64),
                  **{f"blocked, {block} queries": (lambda q, k, v, block=block: BlockedAttention.apply(q, k, v, block))
                     for block in (32, 64, 256)}}
    results = {"flash fp32": {"ms": reference_seconds * 1000}}
    print(f"| attention, {TOKENS} tokens, forward + backward | ms | relative error: out, dq, dk, dv |\n|---|---|---|")
    print(f"| flash fp32 | {reference_seconds * 1000:.0f} | (the reference) |")
    for name, attention in candidates.items():
        seconds, out, grads = timed(attention, bf16_inputs, bf16_grad_out)
        errors = [relative_error(a, b) for a, b in zip([out, *grads], [reference_out, *reference_grads])]
        results[name] = {"ms": seconds * 1000, "relative_errors": errors}
        print(f"| {name} | {seconds * 1000:.0f} | " + ", ".join(f"{e:.4f}" for e in errors) + " |", flush=True)
    results.update(forward_only(bf16_inputs, reference_out))
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "benchmarks" / "results-attention-cpu.json"
    out.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), **results}, indent=1))
    print(f"\nwrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
