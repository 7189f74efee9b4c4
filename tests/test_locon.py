"""LoCon: LoRA on the UNet's 3x3 convolutions (conv_rank / conv_alpha), from the layer to a trained file that
diffusers, AUTOMATIC1111, ComfyUI and generate.py load."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import train_lora
from sdlora import loading
from conftest import REPO_ROOT, assert_close_to_scale, randomize_up
from sdlora.interop import _a1111_name, check_interop
from lora_diffusion import CONV_TARGETS, LoRALayer, inject_trainable_lora
from sdlora.lora_file import fuse_lora_file
from lora_tools import inspect_lora_file, resize_lora_file
from sdlora.settings import ConfigError


def resnet_and_sampler_convs(unet: nn.Module) -> list[str]:
    """The paths LoCon must wrap: every 3x3 convolution inside a ResNet block or a down/up sampler."""
    return sorted(path for path, module in unet.named_modules()
                  if isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3)
                  and (".resnets." in path or "samplers." in path))


def test_conv_layer_computes_the_convolution_with_kernel_up_at_down():
    """A 3x3, stride-2 LoRA conv layer: zero-initialised it is an exact no-op; trained, its output is the base
    convolution with kernel W + scale * (up @ down) reshaped to [out, in, 3, 3], same stride and padding."""
    torch.manual_seed(0)
    base = nn.Conv2d(6, 10, 3, stride=2, padding=1)
    layer = LoRALayer(base, rank=3, alpha=6.0)
    x = torch.randn(2, 6, 9, 9)
    assert torch.equal(layer(x), base(x))
    nn.init.normal_(layer.up.weight)
    delta = (layer.up.weight.flatten(1) @ layer.down.weight.flatten(1)).reshape(base.weight.shape)
    expected = nn.functional.conv2d(x, base.weight + 2.0 * delta, base.bias, stride=2, padding=1)
    # A 54-term fp32 sum (6 channels x 3 x 3) in two orders: 1.7e-7 of the output's magnitude measured, 1e-5 allowed.
    assert_close_to_scale(layer(x), expected, rtol=1e-5)
    assert layer.down.weight.shape == (3, 6, 3, 3) and layer.up.weight.shape == (10, 3, 1, 1)


def test_conv_rank_wraps_every_resnet_and_sampler_conv_at_its_own_rank(sd1_layout_unet):
    """conv_rank wraps exactly the 3x3 convs of ResNet blocks and samplers (50 in SD 1.x's layout) at conv_rank
    and conv_alpha, beside the attention projections at rank and alpha."""
    expected = resnet_and_sampler_convs(sd1_layout_unet)
    network = inject_trainable_lora(sd1_layout_unet, rank=4, alpha=4.0, conv_rank=8, conv_alpha=2.0)
    conv_layers = {path: layer for (_, path), layer in network.layers.items() if isinstance(layer.base, nn.Conv2d)
                   and layer.base.kernel_size == (3, 3)}
    assert sorted(conv_layers) == expected and len(expected) == 16 + 4 + 24 + 3 + 3
    assert {(layer.rank, layer.alpha) for layer in conv_layers.values()} == {(8, 2.0)}
    others = [layer for (_, path), layer in network.layers.items() if path not in conv_layers]
    assert len(others) == 16 * 4 * 2 and {(layer.rank, layer.alpha) for layer in others} == {(4, 4.0)}
    trainable = {id(p) for p in sd1_layout_unet.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in network.parameters()}, "every LoRA weight, attention and conv, trains"


def test_a1111_names_of_sampler_and_resnet_convs_follow_its_compvis_numbering():
    """The names A1111 looks the LoCon modules up by (its convert_diffusers_name_to_compvis): samplers become
    `op` / `conv` of the CompVis blocks; up level 0 has no attention, so its upsampler is the block's module 1."""
    assert _a1111_name("lora_unet_down_blocks_1_downsamplers_0_conv") == "diffusion_model_input_blocks_6_0_op"
    assert _a1111_name("lora_unet_up_blocks_0_upsamplers_0_conv") == "diffusion_model_output_blocks_2_1_conv"
    assert _a1111_name("lora_unet_up_blocks_2_upsamplers_0_conv") == "diffusion_model_output_blocks_8_2_conv"
    assert _a1111_name("lora_unet_mid_block_resnets_1_conv2") == "diffusion_model_middle_block_2_out_layers_3"
    assert _a1111_name("lora_unet_up_blocks_3_resnets_2_conv1") == "diffusion_model_output_blocks_11_0_in_layers_2"


def test_locon_file_loads_in_diffusers_a1111_and_comfyui_as_the_network_computes(sd1_layout_unet, tmp_path):
    """A LoCon file in SD 1.x's layout: kohya keys with 4-D down [r, in, 3, 3] and up [out, r, 1, 1] and their own
    alpha; diffusers' loader gives the network's outputs, and A1111's and ComfyUI's key rules match every module."""
    network = inject_trainable_lora(sd1_layout_unet, rank=4, alpha=4.0, conv_rank=8, conv_alpha=2.0)
    randomize_up(network)
    path = network.save(tmp_path / "locon.safetensors")
    tensors = load_file(str(path))
    name = "lora_unet_down_blocks_1_downsamplers_0_conv"
    assert tensors[f"{name}.lora_down.weight"].shape == (8, 8, 3, 3)
    assert tensors[f"{name}.lora_up.weight"].shape == (8, 8, 1, 1) and tensors[f"{name}.alpha"].item() == 2.0

    report = check_interop(path, sd1_layout_unet)
    # max_delta_error is relative to max(1, |delta x|) already: rank-8 products summed in two orders, 9e-8 measured.
    assert report["diffusers"] == "ok" and report["max_delta_error"] < 1e-6
    assert report["a1111_unmatched"] == report["comfyui_unmatched"] == report["network_unmatched"] == []
    assert report["ok"] is True


def test_training_with_conv_rank_writes_a_locon_file_that_generate_fuses(tiny_model_dir, tmp_path):
    """train_lora.py --conv_rank 4: the conv layers train, the file says conv_dim in kohya's network args, its own
    interop check passes, resize keeps its kernels 3x3 and fusing it (generate.py's path) changes every module it holds."""
    cfg = train_lora.parse_config([
        "--pretrained_model_name_or_path", str(tiny_model_dir), "--dataset_path", str(REPO_ROOT / "examples/dataset"),
        "--output_dir", str(tmp_path / "out"), "--resolution", "64", "--max_train_steps", "3",
        "--learning_rate", "1e-3", "--sample_steps", "0", "--sample_prompts",
        "--conv_rank", "4", "--conv_alpha", "2"])
    path = train_lora.main(cfg)
    tensors = load_file(str(path))
    conv_ups = {k: t for k, t in tensors.items() if k.endswith(("conv1.lora_up.weight", "conv2.lora_up.weight",
                                                                "samplers_0_conv.lora_up.weight"))}
    assert len(conv_ups) == 2 * 2 * 2 + 2 * 2 + 2 * 3 * 2 + 2
    assert all(t.abs().sum() > 0 for k, t in tensors.items() if k.endswith("lora_up.weight")), "conv and attention"
    info = inspect_lora_file(path)
    assert json.loads(info["metadata"]["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "2.0"}
    assert info["targets"]["conv1"] == 2 * 2 + 2 + 2 * 3 and info["targets"]["downsamplers.conv"] == 1
    assert json.loads(path.with_suffix(".interop.json").read_text())["ok"] is True

    _, energy_kept = resize_lora_file(path, tmp_path / "resized.safetensors", rank=2)
    resized = load_file(str(tmp_path / "resized.safetensors"))
    assert resized["lora_unet_up_blocks_0_upsamplers_0_conv.lora_down.weight"].shape == (2, 64, 3, 3)
    assert resized["lora_unet_up_blocks_0_upsamplers_0_conv.lora_up.weight"].shape == (64, 2, 1, 1)
    assert 0 < energy_kept < 1
    from sdlora.tiny_model import build_unet

    unet = build_unet()
    before = {name: p.clone() for name, p in unet.named_parameters()}
    changed = fuse_lora_file(path, unet, None)
    assert changed == sum(info["modules"].values())
    moved = {name.removesuffix(".weight") for name, p in unet.named_parameters() if not torch.equal(p, before[name])}
    assert {"down_blocks.0.resnets.0.conv1", "up_blocks.0.upsamplers.0.conv"} <= moved


@pytest.mark.parametrize("flags, message", [
    (["--conv_rank", "-1"], "--conv_rank -1: cannot be negative"),
    (["--conv_rank", "4", "--conv_alpha", "0"], "--conv_alpha 0.0: must be positive"),
])
def test_bad_conv_settings_are_refused(tiny_model_dir, tmp_path, flags, message):
    """A negative conv rank or a non-positive conv alpha is refused before anything is written."""
    cfg = train_lora.parse_config(["--pretrained_model_name_or_path", str(tiny_model_dir),
                                   "--output_dir", str(tmp_path / "out"), *flags])
    with pytest.raises(ConfigError, match=message):
        train_lora.main(cfg)
    assert not (tmp_path / "out").exists()


def test_conv_rank_on_a_unet_without_such_convolutions_is_refused(tiny_model_dir, tmp_path, monkeypatch):
    """A UNet with none of the LoCon convolutions (stood in for by targets it lacks) is refused at start, naming
    --conv_rank and the fix, before training."""
    monkeypatch.setattr(loading, "CONV_TARGETS", ("conv_in_a_unet_this_is_not",))
    cfg = train_lora.parse_config(["--pretrained_model_name_or_path", str(tiny_model_dir),
                                   "--dataset_path", str(REPO_ROOT / "examples/dataset"), "--resolution", "64",
                                   "--output_dir", str(tmp_path / "out"), "--conv_rank", "4"])
    with pytest.raises(ConfigError, match="--conv_rank 4: the UNet of .* has no ResNet or sampler convolutions"):
        train_lora.main(cfg)
    assert not list((tmp_path / "out").glob("checkpoint-*"))
    assert CONV_TARGETS == ("conv1", "conv2", "downsamplers.0.conv", "upsamplers.0.conv")
