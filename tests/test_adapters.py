"""The adapter types (network_type lora | dora | loha | lokr), their dropouts, their files as AUTOMATIC1111 and
ComfyUI read them, and training that starts from a LoRA file (network_weights)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

import lora_tools
import train_lora
from conftest import REPO_ROOT, assert_close_to_scale
from lora_diffusion import (
    NETWORK_TYPES, AdapterSpec, DoRALayer, LoRALayer, inject_from_modules, inject_trainable_lora, make_layer,
)
from sdlora.adapter_weights import LoHaModule, LoKrModule, factorization
from sdlora.adapters import LoKrLayer
from sdlora.interop import check_interop
from sdlora.lora_file import LoRAError, LoRAModule, fuse_lora_file, read_lora_modules
from sdlora.settings import ConfigError

TYPES = NETWORK_TYPES


def perturb(parameters, seed: int = 1, std: float = 0.1) -> None:
    """Stand-in for training: every trainable tensor moved by N(0, std^2) noise from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in parameters:
            parameter.add_(torch.randn(parameter.shape, generator=generator) * std)


def bases() -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Linear(12, 20), nn.Conv2d(8, 12, 3, stride=2, padding=1)]


def inputs_for(base: nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    shape = (2, 5, 12) if isinstance(base, nn.Linear) else (2, 8, 9, 9)
    return torch.randn(shape, generator=generator)


def merged_forward(base: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if isinstance(base, nn.Linear):
        return F.linear(x, weight, base.bias)
    return F.conv2d(x, weight, base.bias, base.stride, base.padding)


@pytest.mark.parametrize("network_type", TYPES)
def test_a_new_layer_of_every_type_is_an_exact_no_op(network_type):
    """Zero-initialised, a layer of each type returns the base layer's output bit for bit (Linear and a strided
    3x3 convolution), in training mode too."""
    for base in bases():
        layer = make_layer(base, 4, 2.0, AdapterSpec(network_type, lokr_factor=4)).train()
        x = inputs_for(base)
        assert torch.equal(layer(x), base(x))
        assert torch.equal(layer.delta_weight(), torch.zeros_like(base.weight))


@pytest.mark.parametrize("network_type", TYPES)
def test_forward_equals_the_base_with_the_merged_weight(network_type):
    """Trained, every type's output is the base operation with W + delta_weight, and delta_weight is the delta the
    file's module makes (the clients' formula), for Linear and 3x3 conv."""
    for base in bases():
        layer = make_layer(base, 4, 2.0, AdapterSpec(network_type, lokr_factor=4)).eval()
        perturb(layer.trainable_parameters())
        x = inputs_for(base)
        with torch.no_grad():
            expected = merged_forward(base, base.weight + layer.delta_weight(), x)
            # fp32 sums of up to 72 terms in two orders; 1e-5 of the output's magnitude allowed
            assert_close_to_scale(layer(x), expected, rtol=1e-5)
            from_file = layer.file_module().delta(base.weight.detach()).reshape(base.weight.shape)
            assert_close_to_scale(from_file, layer.delta_weight(), rtol=1e-6)
        assert layer.delta_weight().abs().max() > 0


def test_loha_and_lokr_deltas_with_hand_picked_weights():
    """LoHa is (w1_a w1_b) * (w2_a w2_b) * alpha / rank element-wise; LoKr is the Kronecker product, scaled by
    alpha / rank while w2 is factored and by 1 when both factors are whole (alpha ignored, as the clients do)."""
    loha = LoHaModule(torch.tensor([[1.0], [2.0]]), torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0], [-1.0]]),
                      torch.tensor([[0.5, 2.0]]), alpha=2.0)
    # [[3, 4], [6, 8]] * [[0.5, 2], [-0.5, -2]] * (2 / 1)
    assert torch.equal(loha.delta(), torch.tensor([[3.0, 16.0], [-6.0, -32.0]]))
    w1 = torch.tensor([[1.0, 2.0]])
    w2 = torch.tensor([[1.0], [3.0]])
    whole = LoKrModule(w1, w2, None, None, alpha=7.0)
    assert torch.equal(whole.delta(), torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
    factored = LoKrModule(w1, None, torch.tensor([[1.0], [3.0]]), torch.tensor([[1.0]]), alpha=0.5)
    assert torch.equal(factored.delta(), torch.tensor([[0.5, 1.0], [1.5, 3.0]]))


def test_dora_delta_renormalises_each_input_column_to_its_magnitude():
    """DoRA by hand: V = W + scale * up @ down, each input column j of V scaled to norm m_j, minus W. The norm runs
    down a column (over the output axis), the axis A1111 and ComfyUI use for a [1, in] dora_scale."""
    weight = torch.tensor([[3.0, 0.0], [4.0, 1.0]])
    module = LoRAModule(down=torch.tensor([[0.0, 1.0]]), up=torch.tensor([[1.0], [0.0]]), alpha=2.0,
                        dora_scale=torch.tensor([[10.0, 2.0]]))
    merged = torch.tensor([[3.0, 2.0], [4.0, 1.0]])  # scale 2: up @ down adds 2 at (0, 1)
    expected = torch.stack([merged[:, 0] * 10 / 5, merged[:, 1] * 2 / 5 ** 0.5], dim=1) - weight
    assert_close_to_scale(module.delta(weight), expected, rtol=1e-6)
    with pytest.raises(LoRAError, match="base model"):
        module.delta()


def test_dora_magnitude_is_fp32_per_input_column_and_trains():
    """The magnitude of a bf16 layer is an fp32 [1, in] (conv: [1, in, 1, 1]) parameter equal to the base weight's
    column norms, among the trainable parameters."""
    base = nn.Linear(6, 4).to(torch.bfloat16)
    layer = DoRALayer(base, rank=2, alpha=2.0)
    assert layer.magnitude.dtype == torch.float32 and layer.magnitude.shape == (1, 6)
    assert torch.equal(layer.magnitude.detach(), base.weight.float().norm(dim=0, keepdim=True))
    assert any(p is layer.magnitude for p in layer.trainable_parameters())
    conv = DoRALayer(nn.Conv2d(3, 5, 3), rank=2, alpha=2.0)
    assert conv.magnitude.shape == (1, 3, 1, 1)


def test_lokr_splits_dimensions_by_factor_and_refuses_one_that_does_not_divide():
    """factorization gives LyCORIS's split (factor x rest, or the most balanced); a factor that does not divide a
    layer's dimension is refused naming --lokr_factor; a small w2 is whole (scale 1)."""
    assert factorization(320, -1) == (16, 20) and factorization(320, 8) == (8, 40) and factorization(7, -1) == (1, 7)
    assert factorization(320, 3) is None
    layer = LoKrLayer(nn.Linear(320, 640), rank=4, alpha=2.0, factor=8)
    assert layer.w1.shape == (8, 8) and layer.w2_a.shape == (80, 4) and layer.w2_b.shape == (4, 40)
    assert layer.scale == 0.5
    small = LoKrLayer(nn.Linear(16, 16), rank=4, alpha=2.0)
    assert small.whole_w2 and small.scale == 1.0 and small.w2.shape == (4, 4)
    with pytest.raises(LoRAError, match="--lokr_factor 3 does not divide"):
        LoKrLayer(nn.Linear(320, 640), rank=4, alpha=2.0, factor=3)


def test_a_grouped_convolution_is_refused_by_every_type():
    """An adapter type on a module it cannot wrap (a grouped convolution) is an error naming the type."""
    for network_type in TYPES:
        with pytest.raises(LoRAError, match=f"network_type {network_type}: only nn.Linear and plain nn.Conv2d"):
            make_layer(nn.Conv2d(4, 4, 3, groups=2), 2, 2.0, AdapterSpec(network_type))


@pytest.mark.parametrize("network_type, suffixes, module, algo", [
    ("lora", {"lora_down.weight", "lora_up.weight", "alpha"}, "networks.lora", None),
    ("dora", {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"}, "lycoris.kohya", "lora"),
    ("loha", {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}, "lycoris.kohya", "loha"),
    ("lokr", {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"}, "lycoris.kohya", "lokr"),
])
def test_files_use_kohya_lycoris_keys_and_metadata(sd1_layout_unet, tmp_path, network_type, suffixes, module, algo):
    """Each type's file has the kohya/LyCORIS suffixes on kohya module names, ss_network_module and (LyCORIS)
    ss_network_args' algo, and reads back to the same modules."""
    # rank 1: small enough that LoKr keeps every w2 factored at this model's widths
    network = inject_trainable_lora(sd1_layout_unet, rank=1, alpha=1.0, spec=AdapterSpec(network_type, lokr_factor=2))
    path = network.save(tmp_path / f"{network_type}.safetensors")
    with safe_open(str(path), "pt") as f:
        keys, header = list(f.keys()), f.metadata()
    assert all(key.startswith("lora_unet_") for key in keys)
    assert {key.split(".", 1)[1] for key in keys} == suffixes
    assert header["ss_network_module"] == module
    if algo:
        assert json.loads(header["ss_network_args"])["algo"] == algo and header["network_type"] == network_type
    modules, _ = read_lora_modules(path)
    assert {m.network_type for m in modules.values()} == {network_type} and len(modules) == len(network.layers)
    if network_type == "dora":
        scale = next(m.dora_scale for m in modules.values())
        assert scale.dtype == torch.float32 and scale.shape[0] == 1


@pytest.mark.parametrize("network_type", TYPES)
def test_interop_self_test_reads_every_type_in_full_at_the_trained_delta(sd1_layout_unet, tmp_path, network_type):
    """For each type (attention and LoCon convolutions), A1111 and ComfyUI leave 0 keys unmatched, the file's
    delta as they compute it equals the network's, and the base merged with the file by their rules gives the
    network's outputs; diffusers reads plain LoRA and is reported unable to read the others."""
    network = inject_trainable_lora(sd1_layout_unet, rank=2, alpha=1.0, conv_rank=2, conv_alpha=2.0,
                                    spec=AdapterSpec(network_type, lokr_factor=2))
    perturb(network.parameters())
    report = check_interop(network.save(tmp_path / "file.safetensors"), sd1_layout_unet)
    assert report["a1111_unmatched"] == report["comfyui_unmatched"] == report["file_problems"] == []
    assert report["max_delta_error"] <= 1e-4 and report["fused_output_error"]["unet"] <= 1e-4
    assert report["ok"] is True and report["network_type"] == network_type
    if network_type == "lora":
        assert report["diffusers"] in ("ok", "skipped: peft not installed (`pip install peft` enables this check)")
    else:
        assert report["diffusers"].startswith(f"not readable by diffusers ({network_type})")


def test_interop_fused_output_catches_a_wrong_dora_magnitude(sd1_layout_unet, tmp_path):
    """A DoRA file whose magnitude is changed after saving no longer reproduces the network's outputs: the
    self-test's merged-output comparison sees what the names alone cannot."""
    network = inject_trainable_lora(sd1_layout_unet, rank=2, alpha=1.0, spec=AdapterSpec("dora"))
    perturb(network.parameters())
    tensors = {k: (v * 1.5 if k.endswith("dora_scale") else v) for k, v in network.state_dict().items()}
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "bad.safetensors"))
    report = check_interop(tmp_path / "bad.safetensors", sd1_layout_unet)
    assert report["ok"] is False and report["fused_output_error"]["unet"] > 1e-2


@pytest.mark.parametrize("network_type", TYPES)
def test_fused_file_equals_the_injected_network(unet, unet_inputs, tmp_path, network_type):
    """generate.py's fusing (lora_file.fuse_lora_file) of each type's file gives the injected network's output,
    at multiplier 0.7 too (the clients scale the delta, DoRA's after its decomposition)."""
    import copy

    base = copy.deepcopy(unet)
    network = inject_trainable_lora(unet, rank=2, alpha=1.0, conv_rank=2, conv_alpha=1.0,
                                    spec=AdapterSpec(network_type, lokr_factor=2))
    perturb(network.parameters())
    path = network.save(tmp_path / "file.safetensors")
    network.set_multiplier(0.7)
    fuse_lora_file(path, base, None, multiplier=0.7)
    with torch.no_grad():
        expected, fused = unet(*unet_inputs).sample, base(*unet_inputs).sample
    assert_close_to_scale(fused, expected, rtol=1e-4)


def test_dropouts_are_off_in_eval_and_draw_nothing_when_zero():
    """With every dropout at 0.5 a layer in eval mode gives the same output as one without dropouts; in training
    it differs; with dropouts 0, a training pass draws nothing from torch's generator (runs stay as before)."""
    torch.manual_seed(0)
    base = nn.Linear(12, 20)
    plain = LoRALayer(base, rank=4, alpha=2.0)
    noisy = LoRALayer(base, rank=4, alpha=2.0, network_dropout=0.5, rank_dropout=0.5)
    nn.init.normal_(plain.up.weight)
    noisy.load_file_module(plain.file_module())
    x = inputs_for(base)
    assert torch.equal(noisy.eval()(x), plain.eval()(x))
    assert not torch.equal(noisy.train()(x), plain.train()(x))
    for network_type in TYPES:
        layer = make_layer(base, 4, 2.0, AdapterSpec(network_type, rank_dropout=0.5, module_dropout=0.5)).eval()
        perturb(layer.trainable_parameters())
        off = make_layer(base, 4, 2.0, AdapterSpec(network_type)).eval()
        for target, source in zip(off.trainable_parameters(), layer.trainable_parameters()):
            target.data.copy_(source.data)
        assert torch.equal(layer(x), off(x))
    state = torch.get_rng_state()
    plain.train()(x)
    assert torch.equal(torch.get_rng_state(), state)


def test_module_dropout_leaves_the_whole_update_out():
    """module_dropout near 1 leaves the update out of (almost) every training pass: the output is the base's."""
    base = nn.Linear(12, 20)
    for network_type in TYPES:
        layer = make_layer(base, 4, 2.0, AdapterSpec(network_type, module_dropout=0.999999)).train()
        perturb(layer.trainable_parameters())
        x = inputs_for(base)
        torch.manual_seed(0)
        out = layer(x)
        assert torch.equal(out, base(x))
        # the skipped layer's parameters stay in the graph at gradient 0 (several-GPU training needs them there)
        grads = torch.autograd.grad(out.sum(), layer.trainable_parameters())
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_rank_dropout_keeps_the_expected_update():
    """Rank dropout's survivors are scaled by 1 / (1 - p): averaged over many passes the update is the full one."""
    torch.manual_seed(0)
    base = nn.Linear(12, 20, bias=False)
    nn.init.zeros_(base.weight)
    layer = LoRALayer(base, rank=8, alpha=8.0, rank_dropout=0.5).train()
    nn.init.normal_(layer.up.weight)
    x = inputs_for(base)[:1, :1].expand(4000, 1, 12)
    with torch.no_grad():
        mean = layer(x).mean(0)
        full = layer.eval()(x[:1])[0]
    # 4000 draws of a Bernoulli(0.5) mask: the mean is within a few 1/sqrt(4000) of the full update
    assert_close_to_scale(mean, full, rtol=0.1)


def config(tiny_model_dir, output_dir, *extra: str):
    """A one-step configuration on the tiny model and the bundled example images."""
    return train_lora.parse_config([
        "--pretrained_model_name_or_path", str(tiny_model_dir), "--dataset_path", str(REPO_ROOT / "examples/dataset"),
        "--output_dir", str(output_dir), "--resolution", "64", "--max_train_steps", "1", "--checkpointing_steps",
        "0", "--learning_rate", "1e-3", "--sample_steps", "0", "--sample_prompts", "--interop_check", "false",
        "--train_batch_size", "2", *extra,
    ])


def first_loss(output_dir) -> float:
    return json.loads((output_dir / "loss_log.jsonl").read_text().splitlines()[0])["loss"]


@pytest.mark.parametrize("network_type, layout", [("loha", "kohya"), ("lora", "peft")])
def test_network_weights_starts_from_the_file(tiny_model_dir, tmp_path, network_type, layout):
    """Training from a file (a LoHa of ours; a diffusers/PEFT LoRA with alpha != rank) builds the network from it:
    its type, rank and alpha; the first step's loss equals the loss of the base model with the file fused in
    (trained from a zero LoRA, an exact no-op); the files written record the parent's sha256."""
    from diffusers import StableDiffusionPipeline

    from sdlora.files import sha256_file

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    network = inject_trainable_lora(pipe.unet, rank=3, alpha=1.5, spec=AdapterSpec(network_type))
    perturb(network.parameters(), std=0.3)
    parent = network.save(tmp_path / "parent.safetensors")
    if layout == "peft":
        parent = lora_tools.convert_lora_file(parent, tmp_path / "parent_peft.safetensors", "peft")
    fused = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    fuse_lora_file(parent, fused.unet, None)
    fused.save_pretrained(tmp_path / "fused")

    from_file = train_lora.main(config(tiny_model_dir, tmp_path / "from_file", "--network_weights", str(parent)))
    train_lora.main(config(tmp_path / "fused", tmp_path / "on_fused"))
    train_lora.main(config(tiny_model_dir, tmp_path / "on_base"))
    # the same batch, noise and timesteps through equal weights computed two ways: fp32 roundings apart
    assert first_loss(tmp_path / "from_file") == pytest.approx(first_loss(tmp_path / "on_fused"), rel=1e-5)
    assert first_loss(tmp_path / "on_base") != pytest.approx(first_loss(tmp_path / "on_fused"), rel=1e-3)
    modules, header = read_lora_modules(from_file)
    assert {m.network_type for m in modules.values()} == {network_type}
    assert {(m.rank, m.alpha) for m in modules.values()} == {(3, 1.5)}
    assert header["network_weights_sha256"] == sha256_file(parent) and header["network_weights"] == parent.name


def test_network_weights_naming_a_module_the_model_lacks_is_refused_listing_it(unet):
    """A file module with no such layer in the model (or the wrong shape) is an error that lists it; nothing is
    silently skipped."""
    missing = ("unet", "down_blocks.3.attentions.0.transformer_blocks.0.attn1.to_q")
    wrong = ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    modules = {missing: LoRAModule(torch.zeros(2, 32), torch.zeros(32, 2), 2.0),
               wrong: LoRAModule(torch.zeros(2, 7), torch.zeros(32, 2), 2.0)}
    with pytest.raises(LoRAError) as error:
        inject_from_modules(modules, unet, None, AdapterSpec(), ("f", "0"), "f.safetensors")
    message = str(error.value)
    assert "2 module(s)" in message and "down_blocks_3_attentions_0" in message and "weights for [32, 7]" in message


@pytest.mark.parametrize("flags, message", [
    (["--network_type", "lycoris"], "--network_type 'lycoris': choose one of lora, dora, loha, lokr"),
    (["--rank_dropout", "1.0"], "--rank_dropout 1.0: a probability in [0, 1)"),
    (["--module_dropout", "-0.1"], "--module_dropout -0.1"),
    (["--network_dropout", "0.1", "--network_type", "loha"], "only LoRA has a down projection"),
    (["--lokr_factor", "0"], "--lokr_factor 0"),
    (["--lora_init", "xavier"], "--lora_init 'xavier': choose one of kaiming, gaussian"),
    (["--lora_init", "gaussian", "--network_type", "lokr"], "--lora_init gaussian with --network_type lokr"),
    (["--network_weights", "missing.safetensors"], "--network_weights missing.safetensors: LoRA file not found"),
])
def test_bad_adapter_settings_are_refused_naming_option_and_fix(flags, message):
    """Each bad adapter setting is refused before any model loads, naming the option and its value."""
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        train_lora.check_config(train_lora.parse_config(flags))


def test_network_weights_refuses_settings_the_file_decides(tmp_path, unet):
    """With network_weights, a changed rank, another network_type, or a text-encoder mismatch is refused."""
    network = inject_trainable_lora(unet, rank=2, alpha=2.0)
    path = str(network.save(tmp_path / "parent.safetensors"))
    for flags, message in ((["--rank", "8"], "--rank 8 with --network_weights"),
                           (["--network_type", "loha"], "--network_type loha but --network_weights"),
                           (["--lora_init", "gaussian"], "--lora_init gaussian with --network_weights"),
                           (["--train_text_encoder", "true"], "has no text-encoder modules")):
        with pytest.raises(ConfigError, match=message):
            train_lora.check_config(train_lora.parse_config(["--network_weights", path, *flags]))


def test_lokr_factor_that_does_not_divide_the_model_is_refused_at_injection(unet):
    """A LoKr factor that does not divide a target's dimensions stops the injection, naming --lokr_factor."""
    with pytest.raises(LoRAError, match="--lokr_factor 3 does not divide"):
        inject_trainable_lora(unet, spec=AdapterSpec("lokr", lokr_factor=3))


def test_convert_makes_the_nearest_plain_lora_and_reports_the_energy(unet, tmp_path):
    """convert --to lora turns a LoHa into a plain LoRA (readable by diffusers): at full rank the delta is kept
    (energy 1), at a lower rank the energy reported is the share of the delta's squared norm kept."""
    network = inject_trainable_lora(unet, rank=2, alpha=2.0, spec=AdapterSpec("loha"))
    perturb(network.parameters())
    path = network.save(tmp_path / "loha.safetensors")
    _, full = lora_tools.convert_to_plain_lora(path, tmp_path / "full.safetensors", rank=64)
    low_energy, low = lora_tools.convert_to_plain_lora(path, tmp_path / "low.safetensors", rank=1)
    source, _ = read_lora_modules(path)
    plain, header = read_lora_modules(tmp_path / "full.safetensors")
    assert full == pytest.approx(1.0) and {m.network_type for m in plain.values()} == {"lora"}
    assert "network_type" not in header and header["ss_network_module"] == "networks.lora"
    for key, module in source.items():
        assert_close_to_scale(plain[key].delta(), module.delta(), rtol=1e-5)
    assert 0 < low < 1 and all(0 < value < 1 for value in low_energy.values())


@pytest.mark.parametrize("flags", [["--network_type", "lora", "--network_dropout", "0.3", "--rank_dropout", "0.3"],
                                   ["--network_type", "loha", "--rank_dropout", "0.3", "--module_dropout", "0.3"]])
def test_resume_with_dropouts_finishes_bitwise_identical(tiny_model_dir, tmp_path, flags):
    """With dropouts on, a run resumed from its mid-run checkpoint ends with the same tensors bitwise as the
    uninterrupted run (the dropouts draw from torch's generator, whose state the checkpoint keeps)."""
    import shutil

    from safetensors.torch import load_file

    steps = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--checkpoints_total_limit", "0"]
    whole = load_file(str(train_lora.main(config(tiny_model_dir, tmp_path / "whole", *steps, *flags))))
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    resumed = load_file(str(train_lora.main(config(tiny_model_dir, tmp_path / "resumed", *steps, *flags,
                                                   "--resume_from_checkpoint", "latest"))))
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)
    # and the dropouts did act: the same run without them ends elsewhere
    plain = load_file(str(train_lora.main(config(tiny_model_dir, tmp_path / "plain", *steps, *flags[:2]))))
    assert any(not torch.equal(plain[k], whole[k]) for k in whole)


def test_resume_with_another_network_type_is_refused(tiny_model_dir, tmp_path):
    """A resume whose network_type differs from the checkpoint's is refused, naming the setting."""
    from sdlora.checkpoints import CheckpointError

    steps = ["--max_train_steps", "2", "--checkpointing_steps", "1"]
    train_lora.main(config(tiny_model_dir, tmp_path / "run", *steps))
    with pytest.raises((ConfigError, CheckpointError), match="network_type"):
        train_lora.main(config(tiny_model_dir, tmp_path / "run", "--max_train_steps", "3", "--network_type", "loha",
                               "--resume_from_checkpoint", "latest"))


def test_dora_converts_to_plain_lora_only_with_the_base_model(tiny_model_dir, tmp_path):
    """A DoRA file's delta depends on the base weights: convert --to lora without --base_model is refused naming
    the fix; with it, at full rank, the plain LoRA merges into the base as the DoRA file does."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    network = inject_trainable_lora(unet, rank=2, alpha=2.0, spec=AdapterSpec("dora"))
    perturb(network.parameters())
    path = network.save(tmp_path / "dora.safetensors")
    assert lora_tools.cli(["convert", str(path), str(tmp_path / "x.safetensors"), "--to", "lora", "--rank", "4"]) == 1
    with pytest.raises(LoRAError, match="--base_model"):
        lora_tools.convert_to_plain_lora(path, tmp_path / "x.safetensors", rank=4)
    _, energy = lora_tools.convert_to_plain_lora(path, tmp_path / "plain.safetensors", rank=64,
                                                 base_model=tiny_model_dir)
    assert energy == pytest.approx(1.0)
    as_dora = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    as_plain = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    fuse_lora_file(path, as_dora, None)
    fuse_lora_file(tmp_path / "plain.safetensors", as_plain, None)
    for a, b in zip(as_dora.parameters(), as_plain.parameters()):
        assert_close_to_scale(b, a, rtol=1e-5)


def test_network_weights_for_another_base_model_is_refused(tmp_path, unet):
    """A file whose metadata says it was trained on SDXL is refused at start, naming the base and the fix."""
    from safetensors.torch import save_file

    network = inject_trainable_lora(unet, rank=2, alpha=2.0)
    save_file(network.state_dict(), str(tmp_path / "xl.safetensors"),
              metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    with pytest.raises(ConfigError, match="trained on sdxl_base_v1-0, not SD 1.x"):
        train_lora.check_config(train_lora.parse_config(["--network_weights", str(tmp_path / "xl.safetensors")]))


def test_a_checkpoint_from_before_the_adapter_settings_still_resumes(monkeypatch):
    """A checkpoint whose run identity predates network_type and the dropouts matches a run at their defaults,
    and not one that changes them."""
    from sdlora import checkpoints

    identity = {"rank": 4, **checkpoints.SETTINGS_ADDED_LATER}
    assert {name: getattr(train_lora, name) for name in checkpoints.SETTINGS_ADDED_LATER} == \
        checkpoints.SETTINGS_ADDED_LATER
    monkeypatch.setattr(checkpoints, "read_state",
                        lambda folder: {"run_identity": {"rank": 4}, "dataset_fingerprint": "f"})
    checkpoints.check_resume_matches(None, identity, "f", allow_changes=False)
    with pytest.raises(ConfigError, match="network_type: checkpoint 'lora', now 'loha'"):
        checkpoints.check_resume_matches(None, identity | {"network_type": "loha"}, "f", allow_changes=False)


def test_merge_and_resize_handle_loha_and_lokr(unet, tmp_path):
    """merge of a LoHa at 0.5 and a LoKr at 0.5 holds exactly the sum of their deltas at those multipliers (as plain
    LoRA); resize makes each a plain LoRA of the asked rank; inspect counts the types."""
    files = {}
    for network_type in ("loha", "lokr"):
        fresh = type(unet).from_config(unet.config)
        fresh.load_state_dict(unet.state_dict())
        network = inject_trainable_lora(fresh, rank=2, alpha=2.0, spec=AdapterSpec(network_type, lokr_factor=2))
        perturb(network.parameters(), seed=len(files) + 1)
        files[network_type] = network.save(tmp_path / f"{network_type}.safetensors")
    assert lora_tools.inspect_lora_file(files["loha"])["types"] == {"loha": len(network.layers)}
    lora_tools.merge_lora_files(tmp_path / "merged.safetensors", [(files["loha"], 0.5), (files["lokr"], 0.5)])
    merged, _ = read_lora_modules(tmp_path / "merged.safetensors")
    loha, lokr = (read_lora_modules(files[t])[0] for t in ("loha", "lokr"))
    for key, module in merged.items():
        assert module.network_type == "lora"
        assert_close_to_scale(module.delta(), 0.5 * loha[key].delta() + 0.5 * lokr[key].delta(), rtol=1e-5)
    lora_tools.resize_lora_file(files["lokr"], tmp_path / "r1.safetensors", rank=1)
    resized, header = read_lora_modules(tmp_path / "r1.safetensors")
    assert {(m.network_type, m.rank) for m in resized.values()} == {("lora", 1)} and "network_type" not in header


def test_a_lokr_file_with_factored_w1_is_read_with_the_clients_scale(tmp_path, unet):
    """A LoKr file from another trainer with lokr_w1_a/_b and a whole lokr_w2 (LyCORIS's decompose_both) is read:
    delta = kron(w1_a @ w1_b, w2) * alpha / rank of w1, as A1111 and ComfyUI take it; it fuses, and
    network_weights refuses to train it, naming the conversion."""
    from safetensors.torch import save_file

    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    generator = torch.Generator().manual_seed(0)
    w1_a, w1_b, w2 = (torch.randn(shape, generator=generator) for shape in ((4, 2), (2, 4), (8, 8)))
    save_file({f"{name}.lokr_w1_a": w1_a, f"{name}.lokr_w1_b": w1_b, f"{name}.lokr_w2": w2,
               f"{name}.alpha": torch.tensor(1.0)}, str(tmp_path / "lokr.safetensors"))
    modules, _ = read_lora_modules(tmp_path / "lokr.safetensors")
    (module,) = modules.values()
    assert module.rank == 2 and module.scale == 0.5
    assert_close_to_scale(module.delta(), torch.kron(w1_a @ w1_b, w2) * 0.5, rtol=1e-6)
    assert fuse_lora_file(tmp_path / "lokr.safetensors", unet, None) == 1
    with pytest.raises(LoRAError, match="convert the file to a plain LoRA first"):
        inject_from_modules(modules, unet, None, AdapterSpec(), ("f", "0"), "lokr.safetensors")


def test_module_dropout_trains_on_two_processes(tiny_model_dir, tmp_path):
    """Two CPU processes (torchrun, gloo; DDP all-reduces every parameter's gradient) train a LoHa with module and
    rank dropout to the end: a module skipped on one process still takes part in the reduction."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               "train_lora.py", "--pretrained_model_name_or_path", str(tiny_model_dir), "--dataset_path",
               str(REPO_ROOT / "examples" / "dataset"), "--output_dir", str(tmp_path / "run"), "--resolution", "64",
               "--max_train_steps", "3", "--checkpointing_steps", "0", "--sample_steps", "0", "--sample_prompts",
               "--interop_check", "false", "--network_type", "loha", "--module_dropout", "0.5", "--rank_dropout", "0.2"]
    done = subprocess.run(command, cwd=REPO_ROOT, env=dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    modules, _ = read_lora_modules(tmp_path / "run" / "pytorch_lora_weights.safetensors")
    assert {m.network_type for m in modules.values()} == {"loha"}


@pytest.mark.parametrize("network_type", ["lora", "dora"])
def test_lora_init_gaussian_draws_down_from_n_0_1_over_rank_and_starts_as_a_no_op(network_type):
    """lora_init gaussian: A ~ N(0, 1/rank) as PEFT's init_lora_weights="gaussian" (std within 5 % over 8 x 1280
    draws), against Kaiming-uniform's 1/sqrt(3 in); B is zero either way, so the layer starts as the base."""
    torch.manual_seed(0)
    base = nn.Linear(1280, 1280)
    x = torch.randn(3, 1280)
    for init, expected_std in (("gaussian", 1 / 8), ("kaiming", 1 / math.sqrt(3 * 1280))):
        layer = make_layer(base, 8, 8.0, AdapterSpec(network_type, lora_init=init))
        assert abs(layer.down.weight.std().item() / expected_std - 1) < 0.05
        assert torch.equal(layer(x), base(x))
