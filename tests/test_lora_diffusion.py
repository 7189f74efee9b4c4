"""LoRALayer, LoRANetwork, injection and the LoRA file."""

import logging
import pickle

import pytest
import torch
from torch import nn

from conftest import assert_close_to_scale, randomize_up
from lora_diffusion import LoRALayer, inject_trainable_lora
from sdlora.lora_file import LORA_FILE_NAME, LoRAError, fuse_lora_file, kohya_name, lora_deltas, read_lora_file

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def hand_picked_layer(alpha: float = 2.0) -> LoRALayer:
    base = nn.Linear(3, 2, bias=True)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]]))
        base.bias.copy_(torch.tensor([0.1, -0.2]))
    layer = LoRALayer(base, rank=1, alpha=alpha)
    with torch.no_grad():
        layer.down.weight.copy_(torch.tensor([[1.0, 2.0, 3.0]]))
        layer.up.weight.copy_(torch.tensor([[1.0], [-1.0]]))
    return layer


def unet_output(unet, inputs) -> torch.Tensor:
    latents, timesteps, embeddings = inputs
    with torch.no_grad():
        return unet(latents, timesteps, embeddings).sample


def test_new_layer_is_exact_no_op():
    """A freshly initialised LoRA layer (up = 0) returns exactly the base output."""
    base = nn.Linear(16, 8)
    layer = LoRALayer(base, rank=4, alpha=8.0)
    x = torch.randn(5, 16)
    assert torch.equal(layer(x), base(x))
    assert layer.down.weight.abs().sum() > 0, "down must be randomly initialised"


def test_forward_equals_formula_with_hand_picked_weights():
    """out = base(x) + multiplier * (alpha / rank) * up(down(x)), worked by hand."""
    layer = hand_picked_layer(alpha=2.0)  # scale = 2
    x = torch.tensor([[1.0, 1.0, 1.0]])
    # base: [0 + 0.1, 2.5 - 0.2]; down(x) = 6; up -> [6, -6]; scaled by 2 -> [12, -12]
    # Sums of 3 terms and the decimal literals' own rounding: a few fp32 roundings of the largest value, whatever the
    # order (equal here).
    assert_close_to_scale(layer(x), torch.tensor([[12.1, -9.7]]), rtol=1e-6)
    layer.multiplier = 0.5
    assert_close_to_scale(layer(x), torch.tensor([[6.1, -3.7]]), rtol=1e-6)


def test_alpha_doubles_the_delta():
    """Doubling alpha at fixed rank doubles the LoRA contribution."""
    x = torch.randn(4, 3)
    small, large = hand_picked_layer(alpha=1.0), hand_picked_layer(alpha=2.0)
    base_out = small.base(x)
    # base + delta rounds at the size of the sum, so the deltas taken back out are exact to that size, not their own
    # (6e-8 of it measured: a rounding or two).
    assert_close_to_scale(large(x) - base_out, 2 * (small(x) - base_out), rtol=1e-6, scale=large(x).abs().max())


def test_lora_weights_stay_fp32_on_half_base():
    """LoRA parameters are fp32 whatever the base dtype; the output keeps the base dtype."""
    layer = LoRALayer(nn.Linear(8, 8).to(torch.bfloat16), rank=2)
    assert layer.down.weight.dtype == torch.float32 and layer.up.weight.dtype == torch.float32
    assert layer(torch.randn(3, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("targets, conv_rank", [(("to_q",), 0), (("proj_in",), 0), (("to_k",), 2)],
                         ids=["linear", "conv1x1", "conv3x3"])
def test_fused_file_equals_unmerged_network_and_unfusing_restores(tiny_model_dir, unet, unet_inputs, tmp_path,
                                                                  targets, conv_rank):
    """Fusing the saved file at a multiplier folds the update with the same scale as forward (merged equals
    unmerged); fusing it again at minus that multiplier gives the base weights back."""
    from diffusers import UNet2DConditionModel

    network = inject_trainable_lora(unet, rank=2, alpha=3.0, targets=targets, conv_rank=conv_rank, conv_alpha=3.0)
    randomize_up(network)
    network.set_multiplier(0.7)
    unmerged = unet_output(unet, unet_inputs)
    path = network.save(tmp_path / LORA_FILE_NAME)
    fused = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet").eval()
    original = {name: weight.clone() for name, weight in fused.state_dict().items()}
    assert fuse_lora_file(path, fused, None, multiplier=0.7) == len(network.layers)
    merged = {name: weight.clone() for name, weight in fused.state_dict().items()}
    # x (W + s up down) against x W + s up(down x): the same sums in two orders, rounding relative to the output's
    # size on any processor (1e-7 measured); 1e-5 leaves 100x room, and a wrong scale misses by tens of percent.
    assert_close_to_scale(unet_output(fused, unet_inputs), unmerged, rtol=1e-5)
    fuse_lora_file(path, fused, None, multiplier=-0.7)
    for name, weight in fused.state_dict().items():
        # (W + D) - D: two correctly rounded operations, each within half an fp32 ulp (6e-8) of |W + D|, on any
        # processor.
        assert_close_to_scale(weight, original[name], rtol=2.5e-7, scale=merged[name].abs().max())


def test_conv_layer_rejects_grouped_convolutions():
    """A grouped convolution (no low-rank update of the same form) is refused with a message naming groups."""
    with pytest.raises(LoRAError, match=r"groups=2"):
        LoRALayer(nn.Conv2d(4, 4, 3, groups=2))


def test_injection_hits_exactly_every_attention_projection(unet):
    """Every q/k/v/out projection of every self- and cross-attention block is wrapped, and nothing else."""
    expected = sorted(
        f"{path}.{proj}" for path, module in unet.named_modules()
        if path.endswith((".attn1", ".attn2")) for proj in ATTENTION_PROJECTIONS
    )
    network = inject_trainable_lora(unet, rank=2, alpha=2.0)
    wrapped = sorted(path for path, module in unet.named_modules() if isinstance(module, LoRALayer))
    assert wrapped == expected
    assert len(network.layers) == len(expected) == 6 * 2 * 4  # 6 transformer blocks (2 down, mid, 3 up) x 2 x 4
    assert ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0") in network.layers


def test_injection_is_on_the_forward_path(unet, unet_inputs):
    """A non-zero up weight in any one injected layer changes the UNet output."""
    network = inject_trainable_lora(unet, rank=2, alpha=2.0)
    before = unet_output(unet, unet_inputs)
    assert torch.equal(before, unet_output(unet, unet_inputs))
    for name in [next(iter(network.layers)), ("unet", "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0")]:
        layer = network.layers[name]
        nn.init.normal_(layer.up.weight)
        assert not torch.allclose(unet_output(unet, unet_inputs), before), name
        nn.init.zeros_(layer.up.weight)


def test_injection_freezes_everything_else(unet, text_encoder):
    """After injection only LoRA down/up weights require grad, in the UNet and the text encoder."""
    network = inject_trainable_lora(unet, text_encoder=text_encoder)
    trainable = {id(p) for m in (unet, text_encoder) for p in m.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in network.parameters()}
    assert len(network.parameters()) == 2 * len(network.layers)


def test_injection_refuses_no_match_and_double_injection(unet):
    """No matching module, or LoRA already present, is a clear error."""
    with pytest.raises(LoRAError, match="no UNet module matches targets"):
        inject_trainable_lora(unet, targets=("to_qq",))
    inject_trainable_lora(unet)
    with pytest.raises(LoRAError, match="already has LoRA layers"):
        inject_trainable_lora(unet)


def test_text_encoder_names_follow_the_kohya_template(text_encoder):
    """Text-encoder keys are lora_te_text_model_encoder_layers_N_self_attn_X, whatever transformers calls them."""
    from sdlora.tiny_model import build_unet

    network = inject_trainable_lora(build_unet(), text_encoder=text_encoder)
    te_names = sorted(kohya_name(*key) for key in network.layers if key[0] == "text_encoder")
    expected = sorted(f"lora_te_text_model_encoder_layers_{i}_self_attn_{p}"
                      for i in range(2) for p in ("q_proj", "k_proj", "v_proj", "out_proj"))
    assert te_names == expected


def test_only_lora_weights_change_after_optimizer_steps(unet, unet_inputs):
    """Three AdamW steps move the LoRA weights and leave every base weight bitwise unchanged."""
    frozen_before = {k: v.clone() for k, v in unet.state_dict().items()}
    network = inject_trainable_lora(unet, rank=2, alpha=2.0)
    lora_before = [p.detach().clone() for p in network.parameters()]
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-2)
    latents, timesteps, embeddings = unet_inputs
    for _ in range(3):
        loss = unet(latents, timesteps, embeddings).sample.pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    state = unet.state_dict()
    for key, value in frozen_before.items():
        wrapped_key = key if key in state else key.replace(".weight", ".base.weight").replace(".bias", ".base.bias")
        assert torch.equal(state[wrapped_key], value), key
    changed = [not torch.equal(a, b) for a, b in zip(lora_before, network.parameters())]
    assert all(changed[1::2]), "every up weight must move"


def test_save_load_round_trip_reproduces_outputs(tiny_model_dir, unet, unet_inputs, tmp_path):
    """A saved LoRA loaded into a fresh model gives bitwise the same UNet output."""
    from diffusers import UNet2DConditionModel

    network = inject_trainable_lora(unet, rank=2, alpha=1.0)
    randomize_up(network)
    expected = unet_output(unet, unet_inputs)
    path = network.save(tmp_path / LORA_FILE_NAME, metadata={"base_model": "tiny"})
    fresh = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet").eval()
    metadata = inject_trainable_lora(fresh, rank=2, alpha=1.0).load(path)
    assert torch.equal(unet_output(fresh, unet_inputs), expected)
    assert metadata["rank"] == "2" and metadata["alpha"] == "1.0" and metadata["base_model"] == "tiny"
    tensors, _ = read_lora_file(path)
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in tensors)
    assert tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha"].shape == ()


def test_strict_load_names_missing_unexpected_and_misshaped_keys(unet, tmp_path):
    """Loading a file that does not fit lists the offending keys."""
    network = inject_trainable_lora(unet, rank=2, alpha=2.0)
    tensors = network.state_dict()
    dropped = "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_v.lora_up.weight"
    del tensors[dropped]
    tensors["lora_unet_mid_block_foo.lora_down.weight"] = torch.zeros(2, 2)
    reshaped = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"
    tensors[reshaped] = torch.zeros(3, 32)
    with pytest.raises(LoRAError) as error:
        network.load_state_dict(tensors, source="bad.safetensors")
    message = str(error.value)
    assert "bad.safetensors" in message and dropped in message
    assert "lora_unet_mid_block_foo.lora_down.weight" in message and reshaped in message


def test_strict_load_refuses_other_alpha(unet):
    """A file trained at another alpha is refused rather than loaded at the wrong strength."""
    network = inject_trainable_lora(unet, rank=2, alpha=2.0)
    tensors = network.state_dict()
    tensors = {k: (torch.tensor(4.0) if k.endswith(".alpha") else v) for k, v in tensors.items()}
    with pytest.raises(LoRAError, match="alpha 4.0"):
        network.load_state_dict(tensors)


def test_pickle_named_safetensors_is_refused_without_running_it(tmp_path):
    """A pickle renamed .safetensors is refused by content and never unpickled."""
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(LoRAError, match="not a readable safetensors file"):
        read_lora_file(path)
    assert not marker.exists()


def test_file_loads_in_diffusers_at_the_trained_alpha(tiny_model_dir, unet_inputs, tmp_path, caplog):
    """diffusers' load_lora_weights reads every key (UNet and text encoder) and applies alpha/rank, alpha != rank."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    ids = pipe.tokenizer(["a photo"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    network = inject_trainable_lora(pipe.unet, rank=4, alpha=1.0, text_encoder=pipe.text_encoder)
    randomize_up(network)
    expected_unet = unet_output(pipe.unet, unet_inputs)
    with torch.no_grad():
        expected_text = pipe.text_encoder(ids)[0]
    network.save(tmp_path / LORA_FILE_NAME)

    fresh = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    diffusers_logging.enable_propagation()  # so caplog sees diffusers' warnings about keys it did not use
    with caplog.at_level(logging.WARNING):
        fresh.load_lora_weights(str(tmp_path))  # a folder: diffusers finds pytorch_lora_weights.safetensors
    assert not [r for r in caplog.records if "unexpected" in r.getMessage().lower()
                or "not used" in r.getMessage().lower() or "unused" in r.getMessage().lower()]
    # The same fp32 arithmetic through PEFT's layers (equal here); another processor may round the two differently,
    # by ~1e-6 of the output through a whole model (see the fused file below): 1e-5 of the output's magnitude.
    assert_close_to_scale(unet_output(fresh.unet, unet_inputs), expected_unet, rtol=1e-5)
    with torch.no_grad():
        assert_close_to_scale(fresh.text_encoder(ids)[0], expected_text, rtol=1e-5)


def test_peft_style_file_fuses_at_its_metadata_alpha(unet, tiny_model_dir, unet_inputs, tmp_path):
    """A diffusers/PEFT file (lora_A/lora_B keys, alpha in lora_adapter_metadata) fuses to the same output."""
    import json

    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    network = inject_trainable_lora(unet, rank=4, alpha=2.0)
    randomize_up(network)
    expected = unet_output(unet, unet_inputs)
    peft = {}
    for path, module in unet.named_modules():
        if isinstance(module, LoRALayer):
            peft[f"unet.{path}.lora_A.weight"] = module.down.weight.detach().clone()
            peft[f"unet.{path}.lora_B.weight"] = module.up.weight.detach().clone()
    header = {"format": "pt", "lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 2.0})}
    save_file(peft, str(tmp_path / "peft.safetensors"), metadata=header)

    fresh = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet").eval()
    assert fuse_lora_file(tmp_path / "peft.safetensors", fresh, None) == len(network.layers)
    # Fused weights against the LoRA path through the whole UNet: 8e-7 of the output's magnitude measured (Zen 4).
    assert_close_to_scale(unet_output(fresh, unet_inputs), expected, rtol=1e-5)


def test_deltas_refuse_keys_for_another_model(unet, tmp_path):
    """A LoRA whose keys match no module (e.g. SDXL) is refused, naming the keys."""
    from safetensors.torch import save_file

    save_file({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(8, 4)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(LoRAError, match="lora_unet_input_blocks_4_1_proj_in"):
        lora_deltas(tmp_path / "x.safetensors", unet)


def test_under_autocast_the_update_equals_the_one_computed_from_an_fp32_input():
    """Under bf16 autocast the layer skips casting its input to fp32 (autocast's matmuls cast it to bf16 anyway):
    output and gradients are bitwise those of the fp32-input computation."""
    torch.manual_seed(0)
    base = nn.Linear(64, 32).to(torch.bfloat16)
    layer = LoRALayer(base, rank=4, alpha=2.0)
    nn.init.normal_(layer.up.weight)
    x = torch.randn(3, 64, dtype=torch.bfloat16, requires_grad=True)
    results = []
    for forward in (layer, lambda x: base(x) + (layer.scale * layer.up(layer.down(x.float()))).to(torch.bfloat16)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = forward(x)
        grads = torch.autograd.grad(out.float().square().sum(), [layer.down.weight, layer.up.weight, x])
        results.append((out, *grads))
    assert all(torch.equal(a, b) for a, b in zip(*results))

