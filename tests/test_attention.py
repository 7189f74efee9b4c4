"""attention.py: the UNet's attention product in fp32 inside a bf16 step, where the CPU is faster so."""

import torch
from diffusers.models.attention_processor import Attention

from conftest import randomize_up
from lora_diffusion import inject_trainable_lora
from sdlora.attention import Float32AttentionProcessor, use_fp32_attention


def attention_layers(unet) -> list:
    return [module for module in unet.modules() if isinstance(module, Attention)]


def output_and_lora_grads(unet, inputs, dtype) -> list[torch.Tensor]:
    """The UNet's output under autocast (none in fp32) and the gradients of its LoRA weights, all as fp32."""
    unet.zero_grad(set_to_none=True)
    latents, timesteps, embeddings = inputs
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        out = unet(latents.to(dtype), timesteps, embeddings.to(dtype)).sample.float()
    out.square().mean().backward()
    return [out.detach()] + [p.grad.float() for p in unet.parameters() if p.requires_grad]


def lora_unet(unet, dtype):
    unet = unet.to(dtype).requires_grad_(False)
    network = inject_trainable_lora(unet, rank=4, alpha=4.0)
    randomize_up(network)  # a trained-looking LoRA, so its gradients pass through the attention product
    return unet


def seeded_lora_unet(tiny_model_dir, dtype):
    """The tiny model's UNet with the same seeded LoRA each call, in `dtype`."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return lora_unet(UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet"), dtype)


def relative_error(result: list[torch.Tensor], reference: list[torch.Tensor]) -> torch.Tensor:
    """The summed relative distances of output and gradients to the reference computation's."""
    return sum((a - b).norm() / b.norm() for a, b in zip(result, reference))


def test_in_fp32_the_processor_is_the_default_attention_bitwise(unet, unet_inputs):
    """With nothing to cast, the processor computes exactly what diffusers' own does: the same output and LoRA
    gradients, bitwise."""
    unet = lora_unet(unet, torch.float32)
    default = output_and_lora_grads(unet, unet_inputs, torch.float32)
    unet.set_attn_processor(Float32AttentionProcessor())
    ours = output_and_lora_grads(unet, unet_inputs, torch.float32)
    assert len(ours) > 1 and all(torch.equal(a, b) for a, b in zip(default, ours))


def test_in_bf16_every_layer_takes_it_and_the_step_stays_as_near_fp32(tiny_model_dir, unet_inputs):
    """In bf16 every attention layer of the UNet gets the processor; it changes the output and LoRA gradients (so
    it is in the step), and they stay as near the fp32 computation as bf16 attention's (bf16's own rounding
    elsewhere in the UNet sets that distance)."""
    reference = output_and_lora_grads(seeded_lora_unet(tiny_model_dir, torch.float32), unet_inputs, torch.float32)
    bf16 = seeded_lora_unet(tiny_model_dir, torch.bfloat16)
    in_bf16 = output_and_lora_grads(bf16, unet_inputs, torch.bfloat16)
    changed = use_fp32_attention(bf16)
    layers = attention_layers(bf16)
    assert changed == len(layers) > 0
    assert all(isinstance(layer.processor, Float32AttentionProcessor) for layer in layers)
    in_fp32 = output_and_lora_grads(bf16, unet_inputs, torch.bfloat16)

    assert not torch.equal(in_fp32[0], in_bf16[0])
    assert relative_error(in_fp32, reference) < 1.05 * relative_error(in_bf16, reference)


def test_one_layer_in_bf16_is_nearer_fp32_with_the_product_in_fp32():
    """With bf16 weights and input, the layer's output is nearer the fp32 computation of the same weights when
    the product is taken in fp32: its own rounding to bf16 is gone."""
    torch.manual_seed(0)
    layer = Attention(64, heads=2, dim_head=32).to(torch.bfloat16)
    x = torch.randn(2, 256, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        reference = Attention(64, heads=2, dim_head=32)
        reference.load_state_dict({name: w.float() for name, w in layer.state_dict().items()})
        exact = reference(x.float())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            default = layer(x).float()
            layer.set_processor(Float32AttentionProcessor())
            ours = layer(x).float()
    assert (ours - exact).norm() < (default - exact).norm()


def test_a_masked_call_goes_to_the_default_processor():
    """A mask is outside what the processor covers: the call is the default processor's, bitwise."""
    torch.manual_seed(0)
    layer = Attention(16, heads=2, dim_head=8)
    x = torch.randn(2, 5, 16)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    default = layer(x, attention_mask=mask)
    layer.set_processor(Float32AttentionProcessor())
    assert torch.equal(layer(x, attention_mask=mask), default)
