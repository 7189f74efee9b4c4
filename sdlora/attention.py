"""The attention product in fp32 inside a bf16 or fp16 UNet, for CPUs where that is faster.

PyTorch's CPU flash-attention kernel is slower in bf16 than in fp32 on some CPUs and faster on others: over SD 1.4's
4096 tokens at 512 px, forward and backward, 801 ms in bf16 against 448 ms in fp32 on a 2-core avx512_bf16 Xeon,
486 against 601 ms on an AMD EPYC (Zen 4) (benchmarks/bench_kernels.py). cpu_kernels.fp32_choices times it at
start; where fp32 wins, the query, key and value are cast up for the product alone and the result cast back, and
the projections around it stay in the training precision. The product's own rounding to bf16 goes, so each layer
is a little nearer fp32, and the step as a whole stays as near as bf16's rounding elsewhere allows
(tests/test_attention.py). On a GPU bf16 and fp16 attention is the fast path, and nothing changes there.
"""

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0


class Float32AttentionProcessor:
    """A UNet attention layer (`diffusers` Attention) with its softmax(q k^T / sqrt(d)) v taken in fp32. It covers
    the plain layer of the Stable Diffusion UNet (3-D input, no mask, no extra norms); anything else goes to the
    default processor."""

    def __init__(self):
        self.default = AttnProcessor2_0()

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs) -> torch.Tensor:
        if attention_mask is not None or hidden_states.ndim != 3:
            return self.default(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        batch, heads = query.shape[0], attn.heads
        query, key, value = (t.view(batch, -1, heads, t.shape[-1] // heads).transpose(1, 2)
                             for t in (query, key, value))
        # Outside autocast, which would cast the fp32 inputs straight back down to bf16.
        with torch.autocast(query.device.type, enabled=False):
            out = F.scaled_dot_product_attention(query.float(), key.float(), value.float())
        out = out.to(query.dtype).transpose(1, 2).reshape(batch, -1, heads * query.shape[-1])
        return attn.to_out[1](attn.to_out[0](out))


def is_plain(attn: Attention) -> bool:
    """The layer computes only softmax(q k^T / sqrt(d)) v between its projections, as SD 1.x and 2.x's do."""
    return (attn.spatial_norm is None and attn.group_norm is None and attn.norm_cross is None
            and attn.norm_q is None and attn.norm_k is None and not attn.residual_connection
            and attn.rescale_output_factor == 1.0 and attn.added_kv_proj_dim is None
            and isinstance(attn.processor, AttnProcessor2_0))


def use_fp32_attention(unet: torch.nn.Module) -> int:
    """Give each plain attention layer of `unet` the fp32 processor; returns how many layers got it."""
    layers = [module for module in unet.modules() if isinstance(module, Attention) and is_plain(module)]
    processor = Float32AttentionProcessor()  # it keeps no state, so one serves every layer
    for layer in layers:
        layer.set_processor(processor)
    return len(layers)
