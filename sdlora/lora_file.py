"""The LoRA file: its layouts, kohya names <-> module paths, one reader and one writer, and fusing into a model.

A file stores, per module, delta W = (alpha / rank) * up @ down. Two layouts are read and written:
kohya / AUTOMATIC1111 (keys `lora_unet_<path>.lora_down.weight`, `.lora_up.weight` and a 0-d `.alpha`; ours,
which diffusers, A1111 and ComfyUI all load at the same strength) and diffusers / PEFT (`unet.<path>.lora_A.weight`,
alphas in the `lora_adapter_metadata` header). See FORMATS.md in the shared notes for what each consumer reads.

LoHa, LoKr and DoRA modules (adapter_weights.py) share the kohya layout's names, with their own suffixes
(`hada_w1_a`, `lokr_w1`, `dora_scale`, ...); the diffusers/PEFT layout holds plain LoRA only.

In memory, modules are keyed by (model, module path) with model in MODEL_NAMES; kohya names exist only in the
file and are made (kohya_name) and parsed (lora_module_path) here alone. Needs no LoRA layer and no training code.
"""

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from sdlora.adapter_weights import LoHaModule, LoKrModule, weight_decompose
from sdlora.files import atomic_write

LORA_FILE_NAME = "pytorch_lora_weights.safetensors"
LORA_FORMAT_VERSION = "1"  # the LoRA file's `format_version` metadata
UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIX = "lora_te_"
LAYOUTS = ("kohya", "peft")  # ours / A1111 (`lora_unet_*.lora_down.weight`), diffusers / PEFT (`unet.*.lora_A.weight`)
MODEL_NAMES = ("unet", "text_encoder")
_PEFT_HEADER_KEYS = ("format", "lora_adapter_metadata")  # header keys that belong to the diffusers/PEFT layout

# Every segment of the path of an SD 1.x module that can carry LoRA weights (the Linear and Conv2d layers of the
# diffusers UNet and the CLIP text encoder). A kohya name is the path with "." -> "_", so mapping it back means
# splitting at "_" and rejoining these, longest first; numbers are segments of their own.
_PATH_SEGMENTS = frozenset({
    "down_blocks", "mid_block", "up_blocks", "attentions", "resnets", "downsamplers", "upsamplers",
    "transformer_blocks", "attn1", "attn2", "to_q", "to_k", "to_v", "to_out", "ff", "net", "proj", "proj_in",
    "proj_out", "conv", "conv1", "conv2", "conv_in", "conv_out", "conv_shortcut", "time_emb_proj", "time_embedding",
    "linear_1", "linear_2",
    "text_model", "encoder", "layers", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "mlp", "fc1", "fc2",
})
_MOST_WORDS_IN_A_SEGMENT = 3  # time_emb_proj

_ROLE_SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha",
                  ".lora_A.weight": "down", ".lora_B.weight": "up",
                  ".lora.down.weight": "down", ".lora.up.weight": "up", ".dora_scale": "dora_scale",
                  ".hada_w1_a": "hada_w1_a", ".hada_w1_b": "hada_w1_b", ".hada_w2_a": "hada_w2_a",
                  ".hada_w2_b": "hada_w2_b", ".lokr_w1": "lokr_w1", ".lokr_w2": "lokr_w2",
                  ".lokr_w2_a": "lokr_w2_a", ".lokr_w2_b": "lokr_w2_b", ".lokr_w1_a": "lokr_w1_a",
                  ".lokr_w1_b": "lokr_w1_b"}
_LOHA_ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
# A text embedding bundled with the LoRA (pivotal tuning): `bundle_emb.<name>.string_to_param.*` [n, width], the
# keys AUTOMATIC1111 gathers into a textual-inversion embedding when the LoRA loads (extensions-builtin/Lora/
# networks.py, load_network: `bundle_emb` keys, split once at "." into name and `string_to_param.*`).
BUNDLE_PREFIX = "bundle_emb."
BUNDLE_SUFFIX = ".string_to_param.*"


class LoRAError(ValueError):
    """A LoRA file or injection request that cannot be used; the message says what and how to fix it."""


@dataclass
class LoRAModule:
    """One module's LoRA as a file stores it: delta W = (alpha / rank) * up @ down; with a DoRA magnitude
    `dora_scale` [1, in(, 1, 1)], the delta is that decomposed against the base weight (weight_decompose).

    down: [rank, in] (Linear) or [rank, in, k, k] (k x k Conv2d); up: [out, rank] or [out, rank, 1, 1].
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    dora_scale: torch.Tensor | None = None

    @property
    def network_type(self) -> str:
        return "lora" if self.dora_scale is None else "dora"

    @property
    def shape_2d(self) -> tuple[int, int]:
        return self.up.shape[0], self.down.flatten(1).shape[1]

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """(alpha / rank) * up @ down as an fp32 [out, in * k * k] matrix (a k x k kernel flattened as
        Conv2d weights are, so reshaping it to the weight's shape gives the kernel's delta). A DoRA module needs
        the base `weight` its magnitude decomposes against."""
        low_rank = self.scale * (self.up.flatten(1).float() @ self.down.flatten(1).float())
        if self.dora_scale is None:
            return low_rank
        if weight is None:
            raise LoRAError("a DoRA module's delta depends on the base model's weight; give the base model "
                            "(e.g. --base_model for lora_tools.py)")
        return weight_decompose(weight, low_rank, self.dora_scale).flatten(1)

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The kohya keys: `<name>.lora_down.weight`, `.lora_up.weight`, a 0-d fp32 `.alpha` (and `.dora_scale`)."""
        found = {f"{name}.lora_down.weight": self.down, f"{name}.lora_up.weight": self.up,
                 f"{name}.alpha": torch.tensor(self.alpha, dtype=torch.float32)}
        return found | ({f"{name}.dora_scale": self.dora_scale} if self.dora_scale is not None else {})


AdapterModule = LoRAModule | LoHaModule | LoKrModule  # what a file holds for one module; see network_type
LoRAModules = dict[tuple[str, str], AdapterModule]  # (model, module path) -> its module; model in MODEL_NAMES


# ---------------------------------------------------------------------------------------------------------------
# kohya names <-> module paths

def unet_lora_name(module_path: str) -> str:
    """kohya name of a UNet module: `down_blocks.0.attentions.0...to_out.0` -> `lora_unet_down_blocks_0_..._to_out_0`."""
    return UNET_PREFIX + module_path.replace(".", "_")


def text_encoder_lora_name(module_path: str) -> str:
    """kohya name of a CLIP text-encoder module, always with the `text_model` segment A1111 and ComfyUI need.

    transformers 4.x paths start with `text_model.`, 5.x paths do not; both give the same name.
    """
    return TEXT_ENCODER_PREFIX + "text_model_" + our_path("text_encoder", module_path).replace(".", "_")


def kohya_name(model_name: str, module_path: str) -> str:
    return unet_lora_name(module_path) if model_name == "unet" else text_encoder_lora_name(module_path)


def our_path(model_name: str, module_path: str) -> str:
    """Our spelling of a model's module path: text-encoder paths without transformers 4.x's `text_model.`."""
    return module_path.removeprefix("text_model.") if model_name == "text_encoder" else module_path


def lora_module_path(name: str) -> tuple[str, str]:
    """(model, module path) of a kohya name, without a model:
    `lora_unet_mid_block_attentions_0_proj_in` -> ("unet", "mid_block.attentions.0.proj_in"),
    `lora_te_text_model_encoder_layers_3_self_attn_q_proj` -> ("text_encoder", "encoder.layers.3.self_attn.q_proj")
    (text-encoder paths are the transformers 5.x ones, without `text_model.`)."""
    for model_name, prefix in (("unet", UNET_PREFIX), ("text_encoder", TEXT_ENCODER_PREFIX)):
        if name.startswith(prefix):
            break
    else:
        raise LoRAError(f"{name}: not a kohya LoRA name; SD 1.x names start with {UNET_PREFIX!r} or "
                        f"{TEXT_ENCODER_PREFIX!r}")
    words, segments = name.removeprefix(prefix).split("_"), []
    while words:
        for count in range(_MOST_WORDS_IN_A_SEGMENT, 0, -1):
            segment = "_".join(words[:count])
            if segment in _PATH_SEGMENTS or segment.isdigit():
                break
        else:
            raise _unknown_segment(name, words[0])
        segments.append(segment)
        words = words[count:]
    return model_name, our_path(model_name, ".".join(segments))


def _unknown_segment(name: str, segment: str) -> LoRAError:
    return LoRAError(f"{name}: {segment!r} is in no SD 1.x UNet or text-encoder module path "
                     f"(a LoRA for another model, e.g. SDXL, or a typo in the key?)")


def split_key(key: str) -> tuple[str, str] | None:
    """(module name, role) of a tensor key: `<name>.lora_down.weight` -> (name, "down"); None for other keys."""
    for suffix, role in _ROLE_SUFFIXES.items():
        if key.endswith(suffix):
            return key.removesuffix(suffix), role
    return None


def _module_key(name: str) -> tuple[str, str]:
    """(model, module path) of a module name in either layout: `lora_unet_...` or `unet.<path>`."""
    if name.startswith((UNET_PREFIX, TEXT_ENCODER_PREFIX)):
        return lora_module_path(name)
    model_name, _, module_path = name.partition(".")
    if model_name not in MODEL_NAMES or not module_path:
        raise LoRAError(f"{name}: neither a kohya name (lora_unet_..., lora_te_...) nor a diffusers one "
                        f"(unet.<path>, text_encoder.<path>)")
    module_path = our_path(model_name, module_path)
    unknown = [s for s in module_path.split(".") if s not in _PATH_SEGMENTS and not s.isdigit()]
    if unknown:  # it would get a kohya name that maps back to no path
        raise _unknown_segment(name, unknown[0])
    return model_name, module_path


# ---------------------------------------------------------------------------------------------------------------
# Bundled embeddings

def bundle_tensors(embeddings: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{name: n x D} -> {`bundle_emb.<name>.string_to_param.*`: n x D (fp32)}."""
    return {f"{BUNDLE_PREFIX}{name}{BUNDLE_SUFFIX}": vectors.detach().float() for name, vectors in embeddings.items()}


def bundled_embeddings(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The embeddings bundled in a file's tensors, {name: n x D}; a bundle key of another shape is an error."""
    found = {}
    for key, tensor in tensors.items():
        if not key.startswith(BUNDLE_PREFIX):
            continue
        name = key.removeprefix(BUNDLE_PREFIX).removesuffix(BUNDLE_SUFFIX)
        if not key.endswith(BUNDLE_SUFFIX) or "." in name or tensor.dim() != 2:
            raise LoRAError(f"{key}: a bundled embedding is `bundle_emb.<name>.string_to_param.*` holding an "
                            f"[n_vectors, width] tensor, got {tuple(tensor.shape)}")
        found[name] = tensor
    return found


def without_bundle(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LoRA tensors alone: what diffusers' load_lora_weights converts (it takes kohya names only when every key
    is one)."""
    return {key: tensor for key, tensor in tensors.items() if not key.startswith(BUNDLE_PREFIX)}


# ---------------------------------------------------------------------------------------------------------------
# Reading: one parser for both layouts

def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and string metadata of a safetensors file. Anything else (a pickle, a truncated file) is refused
    by content, whatever its name: safetensors never executes code."""
    path = Path(path)
    if not path.is_file():
        raise LoRAError(f"LoRA file not found: {path}; check the path (a .safetensors file)")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise LoRAError(f"{path} is not a readable safetensors file ({error}); "
                        f"LoRA files must be .safetensors (pickled .pt/.ckpt files are not loaded)") from None
    return tensors, metadata


def parse_lora_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[LoRAModules, list[str]]:
    """The modules of a file's tensors, and one line for each key or module that is not a usable LoRA.

    Our/kohya keys take alpha from `.alpha` (missing: alpha = rank); diffusers/PEFT keys from the
    `lora_adapter_metadata` header (PEFT's rules), else alpha = rank. Bundled embeddings are no module: see
    bundled_embeddings."""
    peft_configs = _peft_configs(metadata)
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    problems = set()
    for key, tensor in without_bundle(tensors).items():
        split = split_key(key)
        if split is None:
            problems.add(f"{key}: not a LoRA down, up or alpha tensor")
            continue
        try:
            parts.setdefault(_module_key(split[0]), {})[split[1]] = tensor
        except LoRAError as error:
            problems.add(str(error))
    modules = {}
    for (model_name, module_path), found in sorted(parts.items(), key=lambda item: module_order(item[0])):
        name = kohya_name(model_name, module_path)
        if any(role.startswith(("hada_", "lokr_")) for role in found):
            module = _lycoris_module(name, found)
            if isinstance(module, str):
                problems.add(module)
            else:
                modules[(model_name, module_path)] = module
            continue
        if "down" not in found or "up" not in found:
            problems.add(f"{name}: no {'down/lora_A' if 'down' not in found else 'up/lora_B'} weight")
            continue
        down, up = found["down"], found["up"]
        if up.shape[1] != down.shape[0]:
            problems.add(f"{name}: up has rank {up.shape[1]} but down has rank {down.shape[0]}")
            continue
        if "alpha" in found:
            alpha = float(found["alpha"])
        else:
            alpha = _peft_alpha(peft_configs.get(model_name, {}), module_path, down.shape[0])
        modules[(model_name, module_path)] = LoRAModule(down=down, up=up, alpha=alpha,
                                                        dora_scale=found.get("dora_scale"))
    return modules, sorted(problems)


def _lycoris_module(name: str, found: dict[str, torch.Tensor]) -> LoHaModule | LoKrModule | str:
    """The LoHa or LoKr module of one name's tensors, or a line saying why they are none. Missing alpha: alpha =
    rank (scale 1), as for LoRA."""
    if "dora_scale" in found:
        return f"{name}: a DoRA magnitude on a LoHa/LoKr module (only LoRA + dora_scale is read)"
    if any(role.startswith("hada_") for role in found):
        missing = [role for role in _LOHA_ROLES if role not in found]
        extra = sorted(set(found) - set(_LOHA_ROLES) - {"alpha"})
        if missing or extra:
            return f"{name}: LoHa needs exactly {', '.join(_LOHA_ROLES)} (+ alpha); missing {missing}, other {extra}"
        alpha = float(found["alpha"]) if "alpha" in found else float(found["hada_w1_b"].shape[0])
        return LoHaModule(*(found[role] for role in _LOHA_ROLES), alpha=alpha)
    one_w1 = ("lokr_w1" in found) != ("lokr_w1_a" in found and "lokr_w1_b" in found)
    one_w2 = ("lokr_w2" in found) != ("lokr_w2_a" in found and "lokr_w2_b" in found)
    extra = sorted(set(found) - {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"})
    if not (one_w1 and one_w2) or extra:
        return (f"{name}: LoKr needs lokr_w1 (or lokr_w1_a + lokr_w1_b) and lokr_w2 (or lokr_w2_a + lokr_w2_b), "
                f"+ alpha; found {sorted(found)} (CP cores lokr_t2 are not read)")
    module = LoKrModule(found.get("lokr_w1"), found.get("lokr_w2"), found.get("lokr_w2_a"), found.get("lokr_w2_b"),
                        alpha=0.0, w1_a=found.get("lokr_w1_a"), w1_b=found.get("lokr_w1_b"))
    module.alpha = float(found["alpha"]) if "alpha" in found else float(module.rank)
    return module


def _peft_configs(metadata: dict[str, str]) -> dict[str, dict]:
    """diffusers' `lora_adapter_metadata` header: a PEFT LoraConfig per model, keys like `unet.lora_alpha`."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError:
        raise LoRAError("the file's lora_adapter_metadata header is not valid JSON") from None
    configs: dict[str, dict] = {}
    for key, value in flat.items():
        model_name, _, field = key.partition(".")
        configs.setdefault(model_name, {})[field] = value
    return configs


def _peft_alpha(config: dict, module_path: str, rank: int) -> float:
    """Our alpha (scale = alpha / rank) for a module of a PEFT config. PEFT's rule (peft.utils.other.get_pattern_key):
    the first `alpha_pattern` key that regex-matches the end of the path at a `.` boundary wins, then `lora_alpha`,
    else alpha = rank. rsLoRA scales by alpha / sqrt(rank), which is our alpha * sqrt(rank)."""
    alpha = config.get("lora_alpha", rank)
    for pattern, pattern_alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module_path):
            alpha = pattern_alpha
            break
    return float(alpha) * (math.sqrt(rank) if config.get("use_rslora") else 1.0)


def module_order(key: tuple[str, str]) -> tuple:
    """UNet first, then the text encoder; numbers in natural order (layers.2 before layers.10)."""
    model_name, module_path = key
    return MODEL_NAMES.index(model_name), _natural(module_path)


def _natural(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def checked_modules(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> LoRAModules:
    modules, problems = parse_lora_tensors(tensors, metadata)
    if problems:
        raise LoRAError(f"{path}: {len(problems)} key(s) are not SD 1.x LoRA weights: {first_few(problems, 3)}")
    if not modules:
        raise LoRAError(f"{path} holds no LoRA weights")
    return modules


def read_lora_modules(path: str | Path) -> tuple[LoRAModules, dict[str, str]]:
    """The modules of a LoRA file in either layout, keyed (model, module path), and its metadata; no model needed.
    A key that is not an SD 1.x LoRA tensor is an error naming it."""
    tensors, metadata = read_lora_file(path)
    return checked_modules(path, tensors, metadata), metadata


# ---------------------------------------------------------------------------------------------------------------
# Writing: one writer per layout

def kohya_tensors(modules: LoRAModules) -> dict[str, torch.Tensor]:
    """The kohya layout of `modules`: `<name>.lora_down.weight`, `<name>.lora_up.weight` and a 0-d fp32
    `<name>.alpha` per module (LoHa, LoKr and DoRA with their own keys, see each module's `tensors`), tensors as
    they are."""
    tensors = {}
    for (model_name, module_path), module in modules.items():
        tensors |= module.tensors(kohya_name(model_name, module_path))
    return tensors


def write_lora_file(path: str | Path, modules: LoRAModules, metadata: dict[str, str], layout: str = "kohya",
                    embeddings: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `modules` (tensors as they are) with `metadata`, in one of LAYOUTS:
    kohya: `lora_unet_<path>.lora_down.weight` / `.lora_up.weight` / 0-d `.alpha` (fp32), our training format,
           with any `embeddings` {name: n x D} bundled (bundle_tensors);
    peft:  `unet.<path>.lora_A.weight` / `.lora_B.weight`, the alphas in diffusers' `lora_adapter_metadata` header,
           because PEFT keys carry none (diffusers' own convert_state_dict_to_kohya loses them the other way)."""
    if layout == "kohya":
        tensors = kohya_tensors(modules) | bundle_tensors(embeddings or {})
        header = {k: v for k, v in metadata.items() if k not in _PEFT_HEADER_KEYS}
    elif layout == "peft":
        if embeddings:
            raise LoRAError("the diffusers/PEFT layout has no place for a bundled embedding; keep the kohya layout "
                            "and give diffusers the textual-inversion file (learned_embeds.safetensors)")
        others = sorted({m.network_type for m in modules.values()} - {"lora"})
        if others:
            raise LoRAError(f"the diffusers/PEFT layout holds plain LoRA only, this file has {', '.join(others)} "
                            f"modules; keep the kohya layout (which A1111 and ComfyUI read), or make a plain LoRA "
                            f"first: python lora_tools.py convert FILE OUT --to lora --rank 16")
        tensors = {}
        for (model_name, module_path), module in modules.items():
            tensors[f"{model_name}.{module_path}.lora_A.weight"] = module.down
            tensors[f"{model_name}.{module_path}.lora_B.weight"] = module.up
        adapter_metadata = json.dumps(_peft_adapter_metadata(modules), indent=2, sort_keys=True)
        header = dict(metadata, format="pt", lora_adapter_metadata=adapter_metadata)
    else:
        raise LoRAError(f"layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    return write_safetensors(path, tensors, header)


def _peft_adapter_metadata(modules: LoRAModules) -> dict:
    """The `lora_adapter_metadata` diffusers writes (lora_base.py `_pack_dict_with_prefix`) and reads back as
    `LoraConfig(**fields)` per model: `unet.r` / `unet.lora_alpha` are the most common rank and alpha,
    `unet.rank_pattern` / `unet.alpha_pattern` map the other modules' full paths to theirs, so no alpha is lost."""
    flat = {}
    for model_name in MODEL_NAMES:
        own = {path: module for (name, path), module in modules.items() if name == model_name}
        if not own:
            continue
        rank = Counter(m.rank for m in own.values()).most_common(1)[0][0]
        alpha = Counter(m.alpha for m in own.values()).most_common(1)[0][0]
        flat |= {f"{model_name}.r": rank, f"{model_name}.lora_alpha": alpha,
                 f"{model_name}.target_modules": sorted(own),
                 f"{model_name}.rank_pattern": {p: m.rank for p, m in own.items() if m.rank != rank},
                 f"{model_name}.alpha_pattern": {p: m.alpha for p, m in own.items() if m.alpha != alpha}}
    return flat


def rank_alpha_header(rank: int | str, alpha: float | str) -> dict[str, str]:
    """`rank` / `alpha` and kohya's `ss_network_dim` / `ss_network_alpha`, which A1111 shows in its LoRA card."""
    return {"rank": str(rank), "alpha": str(alpha), "ss_network_dim": str(rank), "ss_network_alpha": str(alpha)}


def rank_alpha_metadata(modules: LoRAModules) -> dict[str, str]:
    """rank_alpha_header of the value every module shares, else "dynamic" (kohya's word for per-module ranks)."""
    ranks = {m.rank for m in modules.values()}
    alphas = {m.alpha for m in modules.values()}
    return rank_alpha_header(ranks.pop() if len(ranks) == 1 else "dynamic",
                             alphas.pop() if len(alphas) == 1 else "dynamic")


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Atomically write a safetensors file, refusing non-finite weights (a NaN LoRA would load everywhere and
    silently ruin every image)."""
    path = Path(path)
    bad = sorted(name for name, tensor in tensors.items() if not torch.isfinite(tensor).all())
    if bad:
        raise LoRAError(f"refusing to write {path}: non-finite values in {first_few(bad)}")
    atomic_write(path, safetensors_bytes({k: t.contiguous() for k, t in tensors.items()}, metadata=metadata))
    return path


def first_few(items: list[str], count: int = 5) -> str:
    shown = ", ".join(items[:count])
    return shown + (f" ... and {len(items) - count} more" if len(items) > count else "")


# ---------------------------------------------------------------------------------------------------------------
# Into a model: deltas and fusing

def is_lora_target(module: nn.Module) -> bool:
    """A Linear, or a plain convolution of any kernel (1x1, or 3x3 with LoCon)."""
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def _submodule(model: nn.Module | None, model_name: str, module_path: str) -> nn.Module | None:
    """The module at a path of ours in `model`, or None. transformers 4.x CLIP nests everything under
    `text_model.`; our text-encoder paths are the 5.x ones, without it."""
    if model is None:
        return None
    if model_name == "text_encoder" and hasattr(model, "text_model"):
        module_path = "text_model." + module_path
    try:
        return model.get_submodule(module_path)
    except AttributeError:
        return None


def lora_deltas(
    path: str | Path, unet: nn.Module, text_encoder: nn.Module | None = None
) -> dict[tuple[str, str], torch.Tensor]:
    """Read any SD 1.x LoRA file and return {(model, module path): delta weight at multiplier 1} with model in
    {"unet", "text_encoder"}, each delta shaped like the module's weight. Understands both layouts (see
    read_lora_modules). Every module must exist in the given models with the right shape, or the file is refused."""
    modules, _ = read_lora_modules(path)
    models = {"unet": unet, "text_encoder": text_encoder}
    targets = {key: _submodule(models[key[0]], *key) for key in modules}
    unmatched = sorted(kohya_name(*key) for key, module in targets.items() if not is_lora_target(module))
    if unmatched:
        raise LoRAError(f"{path}: {len(unmatched)} module(s) match no module of this SD 1.x model "
                        f"(a LoRA for another base model, e.g. SDXL?): {first_few(unmatched)}")
    deltas = {}
    for (model_name, module_path), module in modules.items():
        weight = targets[(model_name, module_path)].weight
        out_features, in_size = module.shape_2d
        if out_features * in_size != weight.numel() or out_features != weight.shape[0]:
            raise LoRAError(f"{path}: {model_name} module {module_path} has {module.network_type} weights for a "
                            f"[{out_features}, {in_size}] weight, the model's is {tuple(weight.shape)} (a LoRA for "
                            f"another base model?)")
        deltas[(model_name, module_path)] = module.delta(weight.detach().float().cpu()).reshape(weight.shape)
    return deltas


@torch.no_grad()
def fuse_lora_file(path: str | Path, unet: nn.Module, text_encoder: nn.Module | None,
                   multiplier: float = 1.0) -> int:
    """Add `multiplier` x the file's deltas into the model weights (sampling then costs what the base model costs).
    Returns the number of modules changed."""
    deltas = lora_deltas(path, unet, text_encoder)
    models = {"unet": unet, "text_encoder": text_encoder}
    for (model_name, module_path), delta in deltas.items():
        weight = _submodule(models[model_name], model_name, module_path).weight
        weight.copy_((weight.float() + multiplier * delta.to(weight.device)).to(weight.dtype))
    return len(deltas)


def parse_path_number(spec: str, default: float | None = None) -> tuple[Path, float]:
    """`PATH:NUMBER` -> (PATH, NUMBER); the last colon splits, so Windows drive letters survive. Without a finite
    number after the last colon: (spec, default), or ValueError when there is no default."""
    path, _, number = spec.rpartition(":")
    try:
        value = float(number) if path else math.nan
    except ValueError:
        value = math.nan
    if math.isfinite(value):
        return Path(path), value
    if default is None:
        raise ValueError(f"{spec!r}: expected PATH:NUMBER with a number after the last colon")
    return Path(spec), default
