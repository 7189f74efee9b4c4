"""LoRA file tools: kohya names <-> module paths, convert, merge, resize, inspect, the interop check and the CLI."""

import importlib.util
import json
import logging
import math
import subprocess
import sys

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file
from torch import nn

from conftest import REPO_ROOT, assert_close_to_scale, randomize_up
from sdlora.interop import check_interop, write_interop_report
from lora_diffusion import UNET_TARGETS, inject_trainable_lora
from sdlora.lora_file import (
    LoRAError, LoRAModule, kohya_name, lora_deltas, lora_module_path, read_lora_file, read_lora_modules,
    text_encoder_lora_name, unet_lora_name, write_lora_file,
)
from lora_tools import cli, convert_lora_file, format_inspection, inspect_lora_file, merge_lora_files, resize_lora_file

CONV_TARGETS = UNET_TARGETS + ("proj_in",)  # proj_in is a 1x1 Conv2d in SD 1.x: 4-D LoRA weights


def random_modules(model: nn.Module, suffixes: tuple[str, ...], rank: int, alpha: float, seed: int) -> dict:
    """Random LoRA modules for every UNet Linear / 1x1 Conv2d whose path ends with one of `suffixes`."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for path, module in model.named_modules():
        if path.endswith(tuple("." + s for s in suffixes)) and isinstance(module, (nn.Linear, nn.Conv2d)):
            shape = module.weight.shape
            modules[("unet", path)] = LoRAModule(down=torch.randn(rank, *shape[1:], generator=g),
                                                 up=torch.randn(shape[0], rank, *shape[2:], generator=g), alpha=alpha)
    return modules


def set_alpha(layer, alpha: float) -> None:
    layer.alpha, layer.scale = alpha, alpha / layer.rank


def unet_output(unet, inputs) -> torch.Tensor:
    latents, timesteps, embeddings = inputs
    with torch.no_grad():
        return unet(latents, timesteps, embeddings).sample


# ---------------------------------------------------------------------------------------------------------------
# kohya names <-> module paths

def test_every_lora_target_path_survives_its_kohya_name(unet, text_encoder):
    """Every Linear / Conv2d path of the UNet and text encoder maps back from its kohya name without a model."""
    for model_name, model, name_of in (("unet", unet, unet_lora_name), ("text_encoder", text_encoder,
                                                                         text_encoder_lora_name)):
        paths = [p for p, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        assert len(paths) > 10
        assert [lora_module_path(name_of(p)) for p in paths] == [(model_name, p) for p in paths]


def test_unknown_name_is_an_error_naming_the_key(tmp_path):
    """A name outside SD 1.x's module paths (here SDXL-style input_blocks) is refused, naming the key."""
    with pytest.raises(LoRAError, match="lora_unet_input_blocks_4_1_proj_in: 'input'"):
        lora_module_path("lora_unet_input_blocks_4_1_proj_in")
    path = tmp_path / "x.safetensors"
    save_file({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 8)}, str(path))
    with pytest.raises(LoRAError, match="x.safetensors: 1 key.*lora_unet_input_blocks_4_1_proj_in"):
        read_lora_modules(path)


# ---------------------------------------------------------------------------------------------------------------
# Convert

def test_kohya_to_peft_to_kohya_is_bitwise_and_keeps_every_alpha(unet, text_encoder, tmp_path):
    """ours -> PEFT -> ours gives the same keys, bitwise the same tensors (alphas included) and metadata."""
    network = inject_trainable_lora(unet, rank=4, alpha=1.0, text_encoder=text_encoder, targets=CONV_TARGETS)
    randomize_up(network)
    set_alpha(network.layers[("unet", "mid_block.attentions.0.proj_in")], 3.0)  # alpha != rank, and != the rest
    original = network.save(tmp_path / "ours.safetensors", metadata={"base_model": "tiny"})
    convert_lora_file(original, tmp_path / "peft.safetensors", "peft")
    convert_lora_file(tmp_path / "peft.safetensors", tmp_path / "back.safetensors", "kohya")

    peft_tensors, peft_metadata = read_lora_file(tmp_path / "peft.safetensors")
    assert all(k.startswith(("unet.", "text_encoder.encoder.layers.")) for k in peft_tensors)
    config = json.loads(peft_metadata["lora_adapter_metadata"])
    assert (config["unet.r"], config["unet.lora_alpha"], config["text_encoder.lora_alpha"]) == (4, 1.0, 1.0)
    assert config["unet.alpha_pattern"] == {"mid_block.attentions.0.proj_in": 3.0}
    before, before_metadata = read_lora_file(original)
    after, after_metadata = read_lora_file(tmp_path / "back.safetensors")
    assert sorted(after) == sorted(before)
    assert all(torch.equal(after[k], before[k]) and after[k].dtype == before[k].dtype for k in before)
    assert after_metadata == before_metadata


def test_converted_peft_file_loads_in_diffusers_at_the_trained_strength(tiny_model_dir, unet_inputs, tmp_path,
                                                                         caplog):
    """diffusers' load_lora_weights reads the PEFT file we write, every key used, at each module's own alpha."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    ids = pipe.tokenizer(["a photo"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    network = inject_trainable_lora(pipe.unet, rank=4, alpha=1.0, text_encoder=pipe.text_encoder,
                                    targets=CONV_TARGETS)
    randomize_up(network)
    set_alpha(network.layers[("unet", "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v")], 6.0)
    set_alpha(network.layers[("text_encoder", "encoder.layers.1.self_attn.out_proj")], 0.5)
    expected_unet = unet_output(pipe.unet, unet_inputs)
    with torch.no_grad():
        expected_text = pipe.text_encoder(ids)[0]
    convert_lora_file(network.save(tmp_path / "ours.safetensors"), tmp_path / "peft.safetensors", "peft")

    fresh = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    diffusers_logging.enable_propagation()  # so caplog sees diffusers' warnings about keys it did not use
    with caplog.at_level(logging.WARNING):
        fresh.load_lora_weights(str(tmp_path), weight_name="peft.safetensors")
    assert not [r for r in caplog.records if any(word in r.getMessage().lower()
                                                 for word in ("unexpected", "not used", "unused", "missing"))]
    # The same fp32 arithmetic through PEFT's layers (equal here); another processor may round the two differently,
    # by ~1e-6 of the output through a whole model: 1e-5 of the output's magnitude.
    assert_close_to_scale(unet_output(fresh.unet, unet_inputs), expected_unet, rtol=1e-5)
    with torch.no_grad():
        assert_close_to_scale(fresh.text_encoder(ids)[0], expected_text, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Merge

def test_merged_delta_is_the_sum_of_deltas_at_their_multipliers(unet, tmp_path):
    """merge(A:0.7, B:-0.3) has delta 0.7 dA + (-0.3) dB per module (B covers only to_q), alpha = rank."""
    first = write_lora_file(tmp_path / "a.safetensors", random_modules(unet, CONV_TARGETS, 4, 1.0, seed=0), {})
    second = write_lora_file(tmp_path / "b.safetensors", random_modules(unet, ("to_q",), 2, 3.0, seed=1), {})
    merged = merge_lora_files(tmp_path / "merged.safetensors", [(first, 0.7), (second, -0.3)])

    deltas_a, deltas_b, deltas = (lora_deltas(p, unet) for p in (first, second, merged))
    assert deltas.keys() == deltas_a.keys() and deltas_b.keys() < deltas_a.keys()
    for key, delta in deltas.items():
        expected = 0.7 * deltas_a[key] - 0.3 * deltas_b.get(key, torch.zeros_like(delta))
        # fp32 rounding of the two products and the sum only: 2e-7 of the delta's magnitude measured, 1e-5 allowed.
        assert_close_to_scale(delta, expected, rtol=1e-5)
    modules, metadata = read_lora_modules(merged)
    assert {m.rank for k, m in modules.items() if k in deltas_b} == {6}
    assert {m.rank for k, m in modules.items() if k not in deltas_b} == {4}
    assert all(m.alpha == m.rank for m in modules.values()) and metadata["rank"] == "dynamic"


# ---------------------------------------------------------------------------------------------------------------
# Resize

def test_resize_to_the_rank_or_above_is_lossless(unet, tmp_path):
    """Resizing a rank-4 LoRA to 4 or 8 writes bitwise the same tensors and reports all energy kept."""
    original = write_lora_file(tmp_path / "r4.safetensors", random_modules(unet, CONV_TARGETS, 4, 2.0, seed=0), {})
    before, _ = read_lora_file(original)
    for rank in (4, 8):
        energy, overall = resize_lora_file(original, tmp_path / f"to{rank}.safetensors", rank)
        after, _ = read_lora_file(tmp_path / f"to{rank}.safetensors")
        assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
        assert set(energy.values()) == {1.0} and overall == pytest.approx(1.0, rel=1e-12)  # fp64 sums of ratios


def test_resize_to_the_true_rank_of_the_delta_is_lossless(unet, tmp_path):
    """A rank-4 LoRA whose deltas have rank 2 (repeated down rows) resized to 2 keeps its deltas and all energy."""
    modules = random_modules(unet, CONV_TARGETS, 4, 4.0, seed=0)
    for module in modules.values():
        module.down[2:] = module.down[:2]
    original = write_lora_file(tmp_path / "r4.safetensors", modules, {})
    energy, overall = resize_lora_file(original, tmp_path / "r2.safetensors", 2)
    resized = lora_deltas(tmp_path / "r2.safetensors", unet)
    for key, delta in lora_deltas(original, unet).items():
        # fp32 factors of an fp64 SVD: 1.6e-7 of the delta's magnitude measured, 1e-5 allowed.
        assert_close_to_scale(resized[key], delta, rtol=1e-5)
    # The null singular values of an fp64 SVD are ~1e-16 of the largest, so the energy kept is 1 within ~1e-12.
    assert min(energy.values()) == pytest.approx(1.0, rel=1e-9) and overall == pytest.approx(1.0, rel=1e-9)


def test_resize_lower_is_the_best_rank_k_approximation(unet, tmp_path):
    """Rank 4 -> 2 gives each module U_2 S_2 Vh_2 of its delta's SVD and energy sum(S_2^2) / sum(S^2)."""
    modules = random_modules(unet, CONV_TARGETS, 4, 1.0, seed=0)
    original = write_lora_file(tmp_path / "r4.safetensors", modules, {"base_model": "tiny"})
    energy, overall = resize_lora_file(original, tmp_path / "r2.safetensors", 2)
    resized, metadata = read_lora_modules(tmp_path / "r2.safetensors")

    kept_sum, total_sum = 0.0, 0.0
    for key, module in modules.items():
        delta = module.scale * module.up.flatten(1).double() @ module.down.flatten(1).double()
        u, s, vh = torch.linalg.svd(delta)
        best = (u[:, :2] * s[:2]) @ vh[:2]
        # fp32 factors of an fp64 SVD: 1.4e-7 of the delta's magnitude measured, 1e-5 allowed; the energies are fp64.
        assert_close_to_scale(resized[key].delta().double(), best, rtol=1e-5)
        assert energy[key] == pytest.approx((s[:2].square().sum() / s.square().sum()).item(), rel=1e-9)
        kept_sum, total_sum = kept_sum + s[:2].square().sum().item(), total_sum + s.square().sum().item()
        assert (resized[key].rank, resized[key].alpha, resized[key].down.dim()) == (2, 2.0, module.down.dim())
    assert overall == pytest.approx(kept_sum / total_sum, rel=1e-9) and 0.5 < overall < 1.0
    assert (metadata["rank"], metadata["base_model"], float(metadata["resize_energy_kept"])) == \
        ("2", "tiny", pytest.approx(overall, abs=1e-6))  # the metadata's 6 decimals (half a unit: 5e-7)


# ---------------------------------------------------------------------------------------------------------------
# Inspect

def test_inspect_reports_counts_and_block_norms_of_a_hand_made_file(tmp_path):
    """Targets, ranks, alphas and per-block delta norms of a hand-made file, worked by hand."""
    attention = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0"
    tensors = {  # |delta|_F: 2 * |[3, 4]| = 10; 0.5 * 2 = 1; (no alpha: scale 1) 2 * |ones(4)| = 4; |[1, 1]| = sqrt 2
        f"{attention}_attn1_to_q.lora_down.weight": torch.tensor([[1.0, 0, 0, 0]]),
        f"{attention}_attn1_to_q.lora_up.weight": torch.tensor([[3.0], [4.0]]),
        f"{attention}_attn1_to_q.alpha": torch.tensor(2.0),
        f"{attention}_attn2_to_k.lora_down.weight": torch.tensor([[0, 2.0, 0, 0], [0, 0, 0, 0]]),
        f"{attention}_attn2_to_k.lora_up.weight": torch.tensor([[1.0, 0], [0, 0]]),
        f"{attention}_attn2_to_k.alpha": torch.tensor(1.0),
        "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.ones(1, 4, 1, 1),
        "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.full((1, 1, 1, 1), 2.0),
        "lora_te_text_model_encoder_layers_1_self_attn_q_proj.lora_down.weight": torch.tensor([[1.0, 0]]),
        "lora_te_text_model_encoder_layers_1_self_attn_q_proj.lora_up.weight": torch.tensor([[1.0], [1.0]]),
        "lora_te_text_model_encoder_layers_1_self_attn_q_proj.alpha": torch.tensor(1.0),
    }
    save_file(tensors, str(tmp_path / "hand.safetensors"), metadata={"ss_output_name": "hand"})
    info = inspect_lora_file(tmp_path / "hand.safetensors")

    assert (info["layout"], info["modules"]) == ("kohya", {"unet": 3, "text_encoder": 1})
    assert info["targets"] == {"attn1.to_q": 1, "attn2.to_k": 1, "proj_in": 1, "self_attn.q_proj": 1}
    assert (info["ranks"], info["alphas"]) == ({1: 3, 2: 1}, {1.0: 3, 2.0: 1})
    assert info["block_norms"] == pytest.approx({"unet down_blocks.0": math.sqrt(101), "unet mid_block": 4.0,
                                                 "text_encoder layers.1": math.sqrt(2)})
    assert info["total_norm"] == pytest.approx(math.sqrt(119))
    report = format_inspection(info)
    assert "unet down_blocks.0     10.0499" in report and "ss_output_name: hand" in report
    assert "rank: 1 x3, 2 x1" in report


# ---------------------------------------------------------------------------------------------------------------
# Interop self-test

def test_interop_check_passes_on_a_good_file(sd1_layout_unet, text_encoder, tmp_path):
    """A freshly saved file loads in diffusers as the network computes it, matches A1111's and ComfyUI's SD 1.x
    key rules, and the network's multiplier survives the check."""
    resnets_and_time = ("time_emb_proj", "conv_shortcut", "linear_1")  # A1111 renames these (emb_layers.1, ...)
    network = inject_trainable_lora(sd1_layout_unet, rank=4, alpha=1.0, text_encoder=text_encoder,
                                    targets=CONV_TARGETS + resnets_and_time)
    randomize_up(network)
    set_alpha(network.layers[("unet", "down_blocks.2.attentions.1.proj_in")], 3.0)
    network.set_multiplier(0.5)  # the check compares at full strength, whatever the network is set to
    path = network.save(tmp_path / "final.safetensors")
    report = check_interop(path, sd1_layout_unet, text_encoder)

    # max_delta_error is relative to max(1, |delta x|) already: a rank-4 product summed in two orders, 3e-8 measured.
    assert report["diffusers"] == "ok" and report["max_delta_error"] < 1e-6 and report["ok"] is True
    assert report["a1111_unmatched"] == report["comfyui_unmatched"] == report["network_unmatched"] == []
    assert {layer.multiplier for layer in network.layers.values()} == {0.5}
    written = write_interop_report(path, report)
    assert written == tmp_path / "final.interop.json" and json.loads(written.read_text()) == report


def test_interop_check_without_peft_says_skipped_and_how_to_enable_it(sd1_layout_unet, tmp_path, monkeypatch):
    """Without peft the diffusers check is reported as skipped, with `pip install peft` as the way to run it, and
    the other checks still decide `ok`."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else find_spec(name, *a))
    network = inject_trainable_lora(sd1_layout_unet, rank=4, alpha=1.0)
    randomize_up(network)
    report = check_interop(network.save(tmp_path / "final.safetensors"), sd1_layout_unet)
    assert report["diffusers"] == "skipped: peft not installed (`pip install peft` enables this check)"
    assert report["ok"] is True


def test_interop_check_lists_a_key_with_a_typo(sd1_layout_unet, tmp_path):
    """A module name with a typo (attn1 -> atn1) is unmatched for A1111 and ComfyUI, and diffusers is not ok."""
    network = inject_trainable_lora(sd1_layout_unet, rank=4, alpha=1.0)
    randomize_up(network)
    right = "lora_unet_up_blocks_2_attentions_0_transformer_blocks_0_attn1_to_k"
    typo = right.replace("attn1", "atn1")
    tensors = {k.replace(right, typo): v for k, v in network.state_dict().items()}
    save_file(tensors, str(tmp_path / "typo.safetensors"))
    report = check_interop(tmp_path / "typo.safetensors", sd1_layout_unet)

    assert report["a1111_unmatched"] == report["comfyui_unmatched"] == [typo]
    assert report["network_unmatched"] == [right] and typo in report["file_problems"][0]
    assert report["diffusers"] != "ok" and report["ok"] is False


def test_a1111_numbering_misplaces_the_up_blocks_of_a_one_layer_per_block_unet(tmp_path):
    """A1111's fixed SD 1.x numbering (3 blocks per level) lands the up-block keys of a UNet with one layer per
    block on the wrong modules, while ComfyUI (config-driven) and diffusers match them all."""
    from sdlora.tiny_model import build_unet

    unet = build_unet(layers_per_block=1).eval()
    network = inject_trainable_lora(unet, rank=2, alpha=2.0)
    randomize_up(network)
    report = check_interop(network.save(tmp_path / "tiny.safetensors"), unet)

    assert report["a1111_unmatched"] == sorted(kohya_name(*key) for key in network.layers if key[1].startswith("up_"))
    assert len(report["a1111_unmatched"]) == 16
    assert report["comfyui_unmatched"] == [] and report["diffusers"] == "ok"


# ---------------------------------------------------------------------------------------------------------------
# Command line

def test_cli_resizes_in_a_subprocess_and_answers_a_bad_multiplier_with_one_line(unet, tmp_path):
    """`resize` writes the lower-rank file and reports the energy; a bad FILE:MULTIPLIER is one `error:` line,
    exit 1."""
    source = write_lora_file(tmp_path / "a.safetensors", random_modules(unet, UNET_TARGETS, 4, 1.0, seed=0), {})

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "lora_tools.py", *args], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=120)

    done = run("resize", str(source), str(tmp_path / "r1.safetensors"), "--rank", "1")
    assert done.returncode == 0 and "of the delta energy kept overall" in done.stdout
    assert {m.rank for m in read_lora_modules(tmp_path / "r1.safetensors")[0].values()} == {1}
    refused = run("merge", str(tmp_path / "m.safetensors"), f"{source}:abc")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines() == [f"error: merge input '{source}:abc': expected FILE:MULTIPLIER "
                                                   f"with a number after the last colon, e.g. style.safetensors:0.7"]


@pytest.mark.parametrize("argv, named", [
    (["inspect", "missing.safetensors"], "LoRA file not found: missing.safetensors; check the path"),
    (["merge", "out.safetensors", "a.safetensors"], "merge input 'a.safetensors': expected FILE:MULTIPLIER"),
    (["resize", "{source}", "out.safetensors", "--rank", "0"], "rank 0: a LoRA rank must be at least 1"),
], ids=["missing-file", "no-multiplier", "rank-0"])
def test_cli_mistakes_are_one_error_line_naming_the_fix(argv, named, unet, tmp_path, capsys):
    """Each user mistake returns 1 with one `error:` line that names the file or option and the fix."""
    source = write_lora_file(tmp_path / "a.safetensors", random_modules(unet, ("to_q",), 2, 1.0, seed=0), {})
    assert cli([arg.format(source=source) for arg in argv]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0]
    assert not (tmp_path / "out.safetensors").exists()
