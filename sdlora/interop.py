"""Interop self-test: would diffusers, AUTOMATIC1111 and ComfyUI load this LoRA file as the network computes it?

check_interop is meant for the file a training run has just written, with the network still injected;
write_interop_report saves its answer beside the file as `<name>.interop.json`.
"""

import copy
import importlib.util
import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sdlora.files import atomic_write
from sdlora.adapters import AdapterLayer
from sdlora.lora_file import (
    MODEL_NAMES, TEXT_ENCODER_PREFIX, LoRAError, LoRAModules, bundled_embeddings, first_few, fuse_lora_file,
    kohya_name, our_path, parse_lora_tensors, read_lora_file, split_key, text_encoder_lora_name, unet_lora_name,
    without_bundle,
)

_RESNET_LDM_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                     "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_SD1_LAYERS_PER_BLOCK = 2  # the layout A1111's block numbers assume (see _a1111_name)
_COMFYUI_CLIP_TARGETS = r"layers\.\d+\.(?:self_attn\.(?:q|k|v|out)_proj|mlp\.fc1|mlp\.fc2)"
_DELTA_TOLERANCE = 1e-4  # file and network deltas are both fp32: they differ by summation order only
# What the report says when diffusers' loader cannot be tried, and how to enable it (peft is in requirements.txt).
PEFT_MISSING = "skipped: peft not installed (`pip install peft` enables this check)"
# The adapter types diffusers loads at the trained strength. It refuses LoHa and LoKr keys, and drops a DoRA file's
# `dora_scale` with a warning (loading the bare LoRA, at the wrong weights): for those the report says what
# diffusers did and the verdict does not count it; `lora_tools.py convert --to lora` makes the nearest plain LoRA.
DIFFUSERS_TYPES = ("lora",)


def _a1111_name(name: str) -> str:
    """The module name AUTOMATIC1111 (extensions-builtin/Lora, `convert_diffusers_name_to_compvis`) looks up for
    a kohya SD 1.x name. Its regexes split a UNet name at the block structure only (`down_blocks_<level>_resnets_
    <index>_<rest>`) and number the blocks for SD 1.x's layout whatever the model's: 2 layers per block and no
    attention in up level 0 (_ldm_unet_path with that layout). Other names are looked up unchanged (and miss);
    conv_in/out never carry our LoRA."""
    found = re.fullmatch(r"lora_unet_((?:down|up)_blocks_\d+|mid_block)_(attentions|resnets|downsamplers|upsamplers)"
                         r"_(\d+)_(.+)", name)
    if found:
        block, part, index, rest = found.groups()
        module_path = f"{block.replace('_blocks_', '_blocks.')}.{part}.{index}.{rest}"
    else:
        found = re.fullmatch(r"lora_unet_time_embedding_linear_(\d+)", name)
        module_path = f"time_embedding.linear_{found.group(1)}" if found else None
    if module_path is not None:
        ldm_path = _ldm_unet_path(module_path, _SD1_LAYERS_PER_BLOCK, lambda level: level > 0)
        return "diffusion_model_" + ldm_path.replace(".", "_") if ldm_path is not None else name
    found = re.fullmatch(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", name)
    if found:
        return f"transformer_text_model_encoder_layers_{found.group(1)}_{found.group(2)}"
    return name


def _ldm_rest(part: str, rest: str) -> str:
    """The path inside a CompVis block: unchanged in an attention, renamed in a resnet (conv1 -> in_layers.2)."""
    return rest if part == "attentions" else _RESNET_LDM_NAMES.get(rest, rest)


def _ldm_unet_path(module_path: str, layers_per_block: int, up_level_has_attentions: Callable[[int], bool]
                   ) -> str | None:
    """Where a diffusers UNet module sits in the original CompVis UNet (ldm openaimodel.py, what A1111 runs),
    for any number of layers per block: input block 0 is conv_in, each down level has `layers_per_block` blocks
    and a block holding its downsampler (`op`), each up level `layers_per_block + 1` blocks, the last also holding
    the upsampler after its resnet and attention (if the level has attentions); the middle block is resnet,
    attention, resnet. None for modules outside the resnets, attentions, samplers and time embedding."""
    per_level = layers_per_block + 1
    found = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", module_path)
    if found:
        return f"input_blocks.{(int(found.group(1)) + 1) * per_level}.0.op"
    found = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", module_path)
    if found:
        level = int(found.group(1))
        inside = 2 if up_level_has_attentions(level) else 1
        return f"output_blocks.{level * per_level + layers_per_block}.{inside}.conv"
    found = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(attentions|resnets)\.(\d+)\.(.+)", module_path)
    if found:
        side, level, part, index, rest = found.groups()
        block = 1 + int(level) * per_level + int(index) if side == "down" else int(level) * per_level + int(index)
        blocks = "input_blocks" if side == "down" else "output_blocks"
        return f"{blocks}.{block}.{int(part == 'attentions')}.{_ldm_rest(part, rest)}"
    found = re.fullmatch(r"mid_block\.(attentions|resnets)\.(\d+)\.(.+)", module_path)
    if found:
        part, index, rest = found.groups()
        return f"middle_block.{1 if part == 'attentions' else 2 * int(index)}.{_ldm_rest(part, rest)}"
    found = re.fullmatch(r"time_embedding\.linear_(\d+)", module_path)
    return f"time_embed.{2 * int(found.group(1)) - 2}" if found else None


def _layer_paths(model: nn.Module | None, model_name: str) -> list[str]:
    """Our paths of the modules that hold a weight, an adapter layer standing for the layer it wraps."""
    if model is None:
        return []
    wrapped = {path for path, module in model.named_modules() if isinstance(module, AdapterLayer)}
    paths = wrapped | {path for path, module in model.named_modules()
                       if isinstance(getattr(module, "weight", None), torch.Tensor)
                       and path.rpartition(".")[0] not in wrapped}
    return sorted(our_path(model_name, path) for path in paths)


def _a1111_unmatched(names: list[str], unet: nn.Module, text_encoder: nn.Module | None) -> list[str]:
    """Names A1111 would not apply to their own module: its lookup misses, or lands on another module (its fixed
    SD 1.x numbering on a UNet with another layout)."""
    own_name = {}  # A1111's name of a module of this model -> the kohya name of the same module
    for module_path in _layer_paths(unet, "unet"):
        ldm_path = _ldm_unet_path(module_path, unet.config.layers_per_block,
                                  lambda level: hasattr(unet.up_blocks[level], "attentions"))
        if ldm_path is not None:
            own_name["diffusion_model_" + ldm_path.replace(".", "_")] = unet_lora_name(module_path)
    for module_path in _layer_paths(text_encoder, "text_encoder"):
        name = text_encoder_lora_name(module_path)
        own_name["transformer_" + name.removeprefix(TEXT_ENCODER_PREFIX)] = name  # FrozenCLIPEmbedder.transformer
    return [name for name in names if own_name.get(_a1111_name(name)) != name]


def _comfyui_unmatched(names: list[str], unet: nn.Module, text_encoder: nn.Module | None) -> list[str]:
    """Names ComfyUI's SD 1.x key map (comfy/lora.py model_lora_keys_unet / model_lora_keys_clip) lacks. For every
    UNet weight it knows `lora_unet_<diffusers path>` (its diffusers map follows the model's config) and the
    diffusers spelling `unet.<path>` with `.to_q` etc. as `.processor.to_q` and `.to_out.0` as `.processor.to_out`;
    for each CLIP layer's q/k/v/out_proj and mlp fc1/fc2, `lora_te_text_model_encoder_layers_<N>_<name>` and
    `text_encoder.text_model.encoder.layers.<N>.<path>` (with `text_model.`, which transformers 5.x paths lack)."""
    known = set()
    for module_path in _layer_paths(unet, "unet"):
        processor_path = module_path.replace(".to_", ".processor.to_")
        known |= {unet_lora_name(module_path),
                  "unet." + (processor_path[:-2] if processor_path.endswith(".to_out.0") else processor_path)}
    for module_path in _layer_paths(text_encoder, "text_encoder"):
        if re.fullmatch(_COMFYUI_CLIP_TARGETS, module_path.removeprefix("encoder.")):
            known |= {text_encoder_lora_name(module_path), "text_encoder.text_model." + module_path}
    return [name for name in names if name not in known]


def _network_layers(models: dict[str, nn.Module]) -> dict[tuple[str, str], AdapterLayer]:
    return {(model_name, our_path(model_name, path)): module for model_name, model in models.items()
            for path, module in model.named_modules() if isinstance(module, AdapterLayer)}


def _delta_error(modules: LoRAModules, layers: dict[tuple[str, str], AdapterLayer]) -> float:
    """max over shared modules of |delta_file x - delta_network x| / max(1, |delta_network x|) for a fixed x:
    the delta the clients make of the file's module (adapter_weights.py, lora_file.LoRAModule.delta: alpha / rank,
    LoKr's scale rule, DoRA's decomposition against the base weight) against the network's own update. For LoRA the
    network's side is its forward path scale * up(down(x)), for the other types the update weight the layer applies.
    For a convolution x is one kernel-sized patch, taken without the layer's stride and padding."""
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for key in sorted(modules.keys() & layers.keys()):
        layer = layers[key]
        weight = layer.base.weight
        x = torch.randn(2, *weight.shape[1:], generator=generator).to(weight.device)
        with torch.no_grad():
            if layer.network_type == "lora":
                down = F.conv2d(x, layer.down.weight) if isinstance(layer.down, nn.Conv2d) else layer.down(x)
                expected = (layer.scale * layer.up(down)).flatten(1).cpu()
            else:
                expected = x.flatten(1) @ layer.delta_weight().flatten(1).T
        from_file = x.flatten(1).cpu() @ modules[key].delta(weight.detach().float().cpu()).T
        expected = expected.cpu()
        worst = max(worst, ((from_file - expected).abs().max() / expected.abs().max().clamp(min=1.0)).item())
    return worst


def _without_lora(model: nn.Module) -> nn.Module:
    """A deep copy of `model` with every adapter layer replaced by the layer it wraps: the frozen base model."""
    base = copy.deepcopy(model)
    for path in [p for p, m in base.named_modules() if isinstance(m, AdapterLayer)]:
        parent, _, child = path.rpartition(".")
        setattr(base.get_submodule(parent), child, base.get_submodule(path).base)
    return base.eval()


def _probe_outputs(unet: nn.Module, text_encoder: nn.Module | None) -> dict[str, torch.Tensor]:
    """Outputs on fixed small inputs: an 8x8 latent (SD 1.x's three downsamplings leave 1x1), 8 context and
    8 prompt tokens."""
    generator = torch.Generator().manual_seed(0)
    weight = next(unet.parameters())
    latents = torch.randn(1, unet.config.in_channels, 8, 8, generator=generator).to(weight.device, weight.dtype)
    context = torch.randn(1, 8, unet.config.cross_attention_dim, generator=generator).to(weight.device, weight.dtype)
    with torch.no_grad():
        outputs = {"unet": unet(latents, torch.tensor([500], device=weight.device), context).sample.float()}
        if text_encoder is not None:
            ids = torch.arange(8, device=next(text_encoder.parameters()).device)[None] % text_encoder.config.vocab_size
            outputs["text_encoder"] = text_encoder(ids)[0].float()
    return outputs


@contextmanager
def _at_full_strength(models: list[nn.Module], layers: list[AdapterLayer]) -> Iterator[None]:
    """Eval mode (no dropout) and multiplier 1 on every LoRA layer for the duration; restored afterwards."""
    modes = [(model, model.training) for model in models]
    multipliers = [(layer, layer.multiplier) for layer in layers]
    for model in models:
        model.eval()
    for layer in layers:
        layer.multiplier = 1.0
    try:
        yield
    finally:
        for model, training in modes:
            model.train(training)
        for layer, multiplier in multipliers:
            layer.multiplier = multiplier


def _output_tolerance(model: nn.Module) -> float:
    # fp32 models differ only by summation order; half-precision ones by their 8- or 11-bit mantissa.
    return 1e-4 if next(model.parameters()).dtype == torch.float32 else 1e-2


def _diffusers_check(path: Path, models: dict[str, nn.Module], names: list[str],
                     reference: dict[str, torch.Tensor]) -> str:
    """Load the file with diffusers' own loader into copies of the base models; "ok" when every module of the file
    got a PEFT layer, none else did, and the outputs match `reference` (the network's); else the reason."""
    if importlib.util.find_spec("peft") is None:
        return PEFT_MISSING
    from diffusers import StableDiffusionPipeline
    from peft.tuners.lora import LoraLayer

    bases = {model_name: _without_lora(model) for model_name, model in models.items()}
    try:
        tensors, _ = read_lora_file(path)
        # A bundled embedding makes diffusers take the file for its own layout (it converts kohya names only when
        # every key is one): its users load the LoRA tensors alone, and the embedding from the textual-inversion
        # file. Such a file is kohya layout, its alphas in its keys.
        source = without_bundle(tensors) if bundled_embeddings(tensors) else str(path.parent)
        state_dict, alphas, adapter_metadata = StableDiffusionPipeline.lora_state_dict(
            source, weight_name=path.name, return_lora_metadata=True)
        StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, bases["unet"], metadata=adapter_metadata)
        if "text_encoder" in bases:
            StableDiffusionPipeline.load_lora_into_text_encoder(state_dict, alphas, bases["text_encoder"],
                                                                metadata=adapter_metadata)
    except Exception as error:  # whatever diffusers raises, its refusal is the finding
        return f"diffusers refused the file: {type(error).__name__}: {str(error).strip().splitlines()[0]}"
    loaded = {kohya_name(model_name, p) for model_name, model in bases.items()
              for p, module in model.named_modules() if isinstance(module, LoraLayer)}
    unused, extra = sorted(set(names) - loaded), sorted(loaded - set(names))
    mismatches = ([f"left {len(unused)} module(s) of the file unused: {first_few(unused)}"] if unused else []) \
        + ([f"put LoRA on {len(extra)} module(s) the file does not name: {first_few(extra)}"] if extra else [])
    if mismatches:
        return "diffusers " + "; ".join(mismatches)
    outputs = _probe_outputs(bases["unet"], bases.get("text_encoder"))
    for model_name, expected in reference.items():
        error = ((outputs[model_name] - expected).abs().max() / expected.abs().max().clamp(min=1.0)).item()
        if error > _output_tolerance(models[model_name]):
            return (f"the {model_name} output with the file loaded by diffusers differs from the network's by "
                    f"{error:.2e} (relative; tolerance {_output_tolerance(models[model_name]):.0e})")
    return "ok"


def _fused_output_error(path: Path, models: dict[str, nn.Module], reference: dict[str, torch.Tensor]
                        ) -> dict[str, float]:
    """Each model's output with the file merged into copies of the base weights by the clients' rules (the deltas
    of lora_file.lora_deltas: DoRA decomposed, LoKr's scale) against the network's own, relative to max(1, |out|):
    what AUTOMATIC1111 and ComfyUI draw with the file at strength 1, against what training computed."""
    bases = {model_name: _without_lora(model) for model_name, model in models.items()}
    fuse_lora_file(path, bases["unet"], bases.get("text_encoder"))
    outputs = _probe_outputs(bases["unet"], bases.get("text_encoder"))
    return {name: ((outputs[name] - expected).abs().max() / expected.abs().max().clamp(min=1.0)).item()
            for name, expected in reference.items()}


def _module_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Every module name in a file as spelled there, unchecked (a typo stays a typo); a key that is no LoRA
    tensor stands for itself."""
    return sorted({split[0] if (split := split_key(key)) else key for key in tensors})


def _kohya_spelling(name: str) -> str:
    """`unet.<path>` -> `lora_unet_<path with _>` (`text_encoder.` likewise); other names as they are."""
    model_name, dot, module_path = name.partition(".")
    return kohya_name(model_name, module_path) if dot and model_name in MODEL_NAMES else name


def check_interop(path: str | Path, unet: nn.Module, text_encoder: nn.Module | None = None) -> dict:
    """Check that diffusers, AUTOMATIC1111 and ComfyUI load the LoRA file `path` as the network injected in `unet`
    (and `text_encoder`) computes it. Meant for the file a training run has just written, network still injected.

    (a) diffusers: the file goes through diffusers' own loader into copies of the base models (needs peft, and
        memory for a second UNet); every module must get a PEFT layer and no other, and the outputs on a fixed
        input must match the network's at multiplier 1 (relative 1e-4, 1e-2 for fp16/bf16 models).
    (b) A1111 / ComfyUI: each module name, as the file spells it, goes through the key rules they apply to
        SD 1.x (see _a1111_name, _comfyui_unmatched); names that miss, or land on another module, are listed.
        A1111 matches no diffusers/PEFT name and ComfyUI misses their attention and text-encoder modules:
        convert such files with --to kohya.
    (c) the delta: each module's delta as the clients compute it from the file (alpha / rank, LoKr's scale rule,
        DoRA's decomposition against the base weight), applied to a fixed x, against the network's own update;
        the worst difference relative to max(1, |delta x|), at most 1e-4.
    (d) the merged outputs: the file merged into copies of the base models by those rules (what A1111 and ComfyUI
        draw with at strength 1) against the network's outputs on a fixed input (the tolerance of (a)).
    LoHa, LoKr and DoRA files are beyond diffusers (DIFFUSERS_TYPES): what it did is reported, not counted.

    Returns {"file", "network_type", "diffusers": "ok" | PEFT_MISSING | reason, "fused_output_error" (per model),
    "a1111_unmatched", "comfyui_unmatched", "network_unmatched" (modules only one of file and network has),
    "file_problems" (keys that are no SD 1.x LoRA), "max_delta_error", "ok"}; write_interop_report saves it beside
    the file."""
    path = Path(path)
    tensors, metadata = read_lora_file(path)
    tensors = without_bundle(tensors)  # a bundled embedding is no module (the clients read it as an embedding)
    modules, problems = parse_lora_tensors(tensors, metadata)
    names = _module_names(tensors)
    models = {"unet": unet} | ({"text_encoder": text_encoder} if text_encoder is not None else {})
    layers = _network_layers(models)
    if not layers:
        raise LoRAError("check_interop compares the file with the LoRA network injected in the models, and they "
                        "have none; pass the UNet (and text encoder) that trained it, or inject and load the file")
    if text_encoder is None and any(model_name == "text_encoder" for model_name, _ in modules):
        raise LoRAError(f"{path} has text-encoder modules; pass text_encoder= to check them too")
    with _at_full_strength(list(models.values()), list(layers.values())):
        reference = _probe_outputs(unet, text_encoder)
        max_delta_error = _delta_error(modules, layers)
    diffusers = _diffusers_check(path, models, [_kohya_spelling(name) for name in names], reference)
    types = sorted({module.network_type for module in modules.values()})
    unreadable = [t for t in types if t not in DIFFUSERS_TYPES]
    if unreadable and diffusers != "ok":
        diffusers = (f"not readable by diffusers ({', '.join(unreadable)}): {diffusers}; the nearest plain LoRA: "
                     f"python lora_tools.py convert FILE OUT --to lora --rank 16")
    report = {
        "file": str(path),
        "network_type": ",".join(types),
        "diffusers": diffusers,
        # Only a file the clients read in full can be merged; the lists below say what stops the others.
        "fused_output_error": (_fused_output_error(path, models, reference)
                               if not problems and modules.keys() == layers.keys() else {}),
        "a1111_unmatched": _a1111_unmatched(names, unet, text_encoder),
        "comfyui_unmatched": _comfyui_unmatched(names, unet, text_encoder),
        "network_unmatched": sorted(kohya_name(*key) for key in modules.keys() ^ layers.keys()),
        "file_problems": problems,
        "max_delta_error": max_delta_error,
    }
    report["ok"] = (report["diffusers"] in ("ok", PEFT_MISSING) or bool(unreadable)) \
        and (max_delta_error <= _DELTA_TOLERANCE
             and all(error <= _output_tolerance(models[name]) for name, error in report["fused_output_error"].items())
             and not any(report[k] for k in ("a1111_unmatched", "comfyui_unmatched", "network_unmatched",
                                             "file_problems")))
    return report


def write_interop_report(lora_path: str | Path, report: dict) -> Path:
    """Write check_interop's report as JSON beside the LoRA file: `<name>.interop.json`."""
    out = Path(lora_path).with_suffix(".interop.json")
    atomic_write(out, (json.dumps(report, indent=2) + "\n").encode())
    return out
