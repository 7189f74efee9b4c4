"""LoRA for Stable Diffusion 1.x: the layer, the network that owns every layer, and the LoRA file.

A LoRA layer adds a low-rank update to a frozen projection (Hu et al. 2021, https://arxiv.org/abs/2106.09685):

    out = base(x) + multiplier * (alpha / rank) * up(down(dropout(x)))

The file is the kohya / AUTOMATIC1111 layout (keys `lora_unet_<path>.lora_down.weight`, `.lora_up.weight`
and a 0-d `.alpha` per module), which diffusers, A1111 and ComfyUI all load at the same strength.
See FORMATS.md in the shared notes for what each consumer reads.

Also the file tools, usable without a model: convert between our layout and diffusers/PEFT's, merge, resize by SVD,
inspect, and an interop self-test (check_interop) for a freshly trained file:

    python lora_diffusion.py inspect FILE
    python lora_diffusion.py convert FILE OUT --to peft|kohya
    python lora_diffusion.py merge OUT FILE:WEIGHT [FILE:WEIGHT ...]
    python lora_diffusion.py resize FILE OUT --rank K
"""

import argparse
import copy
import importlib.util
import json
import math
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

LORA_FILE_NAME = "pytorch_lora_weights.safetensors"
FORMAT_VERSION = "1"
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIX = "lora_te_"


class LoRAError(ValueError):
    """A LoRA file or injection request that cannot be used; the message says what and how to fix it."""


class LoRALayer(nn.Module):
    """Wraps a frozen `nn.Linear` (or 1x1 `nn.Conv2d`) and adds a trainable low-rank update.

    Shapes: x is (..., in_features) for Linear, (B, in, H, W) for Conv2d.
    `down` is A (rank x in), Kaiming-uniform; `up` is B (out x rank), zeros, so a new layer is an exact no-op.
    The LoRA weights are fp32 whatever the base dtype; the update is cast to the base output's dtype.
    """

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int = 4, alpha: float = 4.0, dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise LoRAError(f"rank must be a positive integer, got {rank}")
        if isinstance(base, nn.Conv2d) and base.kernel_size != (1, 1):
            raise LoRAError(f"only 1x1 convolutions can take LoRA, got kernel {base.kernel_size}")
        self.base = base
        self.rank = rank
        self.alpha = float(alpha)
        self.scale = self.alpha / rank
        self.multiplier = 1.0
        self.merged_multiplier: float | None = None  # the multiplier folded into base.weight, if merged
        if isinstance(base, nn.Linear):
            self.down = nn.Linear(base.in_features, rank, bias=False, dtype=torch.float32, device=base.weight.device)
            self.up = nn.Linear(rank, base.out_features, bias=False, dtype=torch.float32, device=base.weight.device)
        else:
            self.down = nn.Conv2d(base.in_channels, rank, 1, bias=False, dtype=torch.float32, device=base.weight.device)
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False, dtype=torch.float32, device=base.weight.device)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same init as the LoRA paper's reference code: A random, B zero.
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged_multiplier is not None or self.multiplier == 0:
            return out
        delta = self.up(self.down(self.dropout(x.to(self.down.weight.dtype))))
        return out + (self.multiplier * self.scale * delta).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """(alpha / rank) * up @ down, shaped like base.weight, in fp32."""
        delta = self.up.weight.flatten(1) @ self.down.weight.flatten(1)
        return (self.scale * delta).reshape(self.base.weight.shape)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold multiplier * delta into base.weight so the forward pass costs the same as the base layer."""
        if self.merged_multiplier is not None:
            raise LoRAError("this LoRA layer is already merged; call unmerge() first")
        weight = self.base.weight
        weight.copy_((weight.float() + self.multiplier * self.delta_weight()).to(weight.dtype))
        self.merged_multiplier = self.multiplier

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge() (exact up to the base dtype's rounding)."""
        if self.merged_multiplier is None:
            raise LoRAError("this LoRA layer is not merged")
        weight = self.base.weight
        weight.copy_((weight.float() - self.merged_multiplier * self.delta_weight()).to(weight.dtype))
        self.merged_multiplier = None


def unet_lora_name(module_path: str) -> str:
    """kohya name of a UNet module: `down_blocks.0.attentions.0...to_out.0` -> `lora_unet_down_blocks_0_..._to_out_0`."""
    return UNET_PREFIX + module_path.replace(".", "_")


def text_encoder_lora_name(module_path: str) -> str:
    """kohya name of a CLIP text-encoder module, always with the `text_model` segment A1111 and ComfyUI need.

    transformers 4.x paths start with `text_model.`, 5.x paths do not; both give the same name.
    """
    path = module_path.removeprefix("text_model.")
    return TEXT_ENCODER_PREFIX + "text_model_" + path.replace(".", "_")


def _is_lora_target(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1))


def _matching_paths(model: nn.Module, targets: Iterable[str]) -> list[str]:
    """Paths of the modules whose path ends with `.<target>` for one of the targets (e.g. `attn2.to_out.0`)."""
    suffixes = tuple("." + t for t in targets)
    return [path for path, module in model.named_modules() if path.endswith(suffixes) and _is_lora_target(module)]


class LoRANetwork:
    """Owns every injected LoRALayer; its tensors and metadata are the LoRA file.

    `layers` maps the kohya name (`lora_unet_...`, `lora_te_...`) to the layer living inside the model.
    """

    def __init__(self, layers: dict[str, LoRALayer], rank: int, alpha: float, targets: tuple[str, ...]):
        self.layers = layers
        self.rank = rank
        self.alpha = alpha
        self.targets = targets
        self._parameters = [p for layer in layers.values() for p in (layer.down.weight, layer.up.weight)]

    def parameters(self) -> list[nn.Parameter]:
        """The trainable parameters, one list built once (for the optimizer and gradient clipping alike)."""
        return self._parameters

    def set_multiplier(self, multiplier: float) -> None:
        for layer in self.layers.values():
            layer.multiplier = multiplier

    def merge(self) -> None:
        for layer in self.layers.values():
            layer.merge()

    def unmerge(self) -> None:
        for layer in self.layers.values():
            layer.unmerge()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """kohya-style tensors: `<name>.lora_down.weight`, `<name>.lora_up.weight`, `<name>.alpha` (0-d)."""
        tensors = {}
        for name, layer in self.layers.items():
            tensors[f"{name}.lora_down.weight"] = layer.down.weight.detach().float().cpu().contiguous()
            tensors[f"{name}.lora_up.weight"] = layer.up.weight.detach().float().cpu().contiguous()
            tensors[f"{name}.alpha"] = torch.tensor(layer.alpha, dtype=torch.float32)
        return tensors

    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, torch.Tensor], source: str = "the LoRA file") -> None:
        """Strict load: every expected key present, nothing unexpected, same shapes, same alpha."""
        expected = self.state_dict()
        missing = sorted(expected.keys() - tensors.keys())
        unexpected = sorted(tensors.keys() - expected.keys())
        wrong_shape = [f"{k}: file {tuple(tensors[k].shape)}, model {tuple(v.shape)}"
                       for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape]
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing key(s): {_first(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected key(s): {_first(unexpected)}")
        if wrong_shape:
            problems.append(f"{len(wrong_shape)} shape mismatch(es) (a LoRA for another model or rank?): "
                            f"{_first(wrong_shape)}")
        if problems:
            raise LoRAError(f"{source} does not match this network (rank {self.rank}, targets {list(self.targets)}):\n  "
                            + "\n  ".join(problems))
        for name, layer in self.layers.items():
            file_alpha = float(tensors[f"{name}.alpha"])
            if file_alpha != layer.alpha:
                raise LoRAError(f"{source} has alpha {file_alpha} for {name}, this network has alpha {layer.alpha}; "
                                f"build the network with alpha={file_alpha}")
            layer.down.weight.copy_(tensors[f"{name}.lora_down.weight"])
            layer.up.weight.copy_(tensors[f"{name}.lora_up.weight"])

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
        """Write the LoRA file; `metadata` (strings) is added to rank, alpha, targets and the format version."""
        path = Path(path)
        header = {"rank": str(self.rank), "alpha": str(self.alpha), "targets": ",".join(self.targets),
                  "format_version": FORMAT_VERSION, "ss_network_module": "networks.lora",
                  "ss_network_dim": str(self.rank), "ss_network_alpha": str(self.alpha)}
        header.update(metadata or {})
        return _write_safetensors(path, self.state_dict(), header)

    def load(self, path: str | Path) -> dict[str, str]:
        """Load a LoRA file written by save() into these layers; returns the file's metadata."""
        tensors, metadata = read_lora_file(path)
        self.load_state_dict(tensors, source=str(path))
        return metadata


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write `data` so that `path` is either the old file or the complete new one, never a partial file:
    write a temporary file beside it, flush it to disk, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


def _write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Atomically write a safetensors file, refusing non-finite weights (a NaN LoRA would load everywhere and
    silently ruin every image)."""
    path = Path(path)
    bad = sorted(name for name, tensor in tensors.items() if not torch.isfinite(tensor).all())
    if bad:
        raise LoRAError(f"refusing to write {path}: non-finite values in {_first(bad)}")
    atomic_write(path, safetensors_bytes({k: t.contiguous() for k, t in tensors.items()}, metadata=metadata))
    return path


def _first(items: list[str], count: int = 5) -> str:
    shown = ", ".join(items[:count])
    return shown + (f" ... and {len(items) - count} more" if len(items) > count else "")


def _wrap(model: nn.Module, paths: list[str], name_of, rank: int, alpha: float, dropout: float) -> dict[str, LoRALayer]:
    layers = {}
    for path in paths:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        layer = LoRALayer(model.get_submodule(path), rank=rank, alpha=alpha, dropout=dropout)
        setattr(parent, child, layer)  # works for ModuleList children ("0") too
        layers[name_of(path)] = layer
    return layers


def inject_trainable_lora(
    unet: nn.Module,
    rank: int = 4,
    alpha: float = 4.0,
    targets: tuple[str, ...] = UNET_TARGETS,
    dropout: float = 0.0,
    text_encoder: nn.Module | None = None,
    text_encoder_targets: tuple[str, ...] = TEXT_ENCODER_TARGETS,
) -> LoRANetwork:
    """Wrap every UNet module whose path ends with one of `targets` (and, when `text_encoder` is given, its
    attention projections) in a LoRALayer, freeze everything else, and return the network that owns them."""
    models = [("UNet", unet, targets, unet_lora_name)]
    if text_encoder is not None:
        models.append(("text encoder", text_encoder, text_encoder_targets, text_encoder_lora_name))
    layers: dict[str, LoRALayer] = {}
    for label, model, model_targets, name_of in models:
        if any(isinstance(m, LoRALayer) for m in model.modules()):
            raise LoRAError(f"the {label} already has LoRA layers; build a fresh model before injecting again")
        paths = _matching_paths(model, model_targets)
        if not paths:
            raise LoRAError(f"no {label} module matches targets {list(model_targets)}; "
                            f"target names are module path endings such as 'to_q' or 'to_out.0'")
        model.requires_grad_(False)
        layers.update(_wrap(model, paths, name_of, rank, alpha, dropout))
    all_targets = tuple(targets) + (tuple(text_encoder_targets) if text_encoder is not None else ())
    return LoRANetwork(layers, rank=rank, alpha=alpha, targets=all_targets)


# ---------------------------------------------------------------------------------------------------------------
# Reading LoRA files (ours and others') for inference

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


def lora_deltas(
    path: str | Path, unet: nn.Module, text_encoder: nn.Module | None = None
) -> dict[tuple[str, str], torch.Tensor]:
    """Read any SD 1.x LoRA file and return {(model, module path): delta weight at scale 1} with model in
    {"unet", "text_encoder"}, each delta shaped like the module's weight. Understands both layouts (see
    read_lora_modules). Every module must exist in the given models with the right shape, or the file is refused."""
    modules, _ = read_lora_modules(path)
    models = {"unet": unet, "text_encoder": text_encoder}
    targets = {key: _submodule(models[key[0]], *key) for key in modules}
    unmatched = sorted(_kohya_name(*key) for key, module in targets.items() if not _is_lora_target(module))
    if unmatched:
        raise LoRAError(f"{path}: {len(unmatched)} module(s) match no module of this SD 1.x model "
                        f"(a LoRA for another base model, e.g. SDXL?): {_first(unmatched)}")
    deltas = {}
    for (model_name, module_path), module in modules.items():
        weight = targets[(model_name, module_path)].weight
        delta = module.delta()
        if delta.numel() != weight.numel():
            raise LoRAError(f"{path}: {model_name} module {module_path} has weights for shape "
                            f"{tuple(module.up.shape[:1]) + tuple(module.down.shape[1:])}, the model has "
                            f"{tuple(weight.shape)} (a LoRA for another base model?)")
        deltas[(model_name, module_path)] = delta.reshape(weight.shape)
    return deltas


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


@torch.no_grad()
def fuse_lora_file(path: str | Path, unet: nn.Module, text_encoder: nn.Module | None, scale: float = 1.0) -> int:
    """Add `scale` x the file's deltas into the model weights (sampling then costs what the base model costs).
    Returns the number of modules changed."""
    deltas = lora_deltas(path, unet, text_encoder)
    models = {"unet": unet, "text_encoder": text_encoder}
    for (model_name, module_path), delta in deltas.items():
        weight = _submodule(models[model_name], model_name, module_path).weight
        weight.copy_((weight.float() + scale * delta.to(weight.device)).to(weight.dtype))
    return len(deltas)


# ---------------------------------------------------------------------------------------------------------------
# LoRA files as modules, without a model: kohya names <-> module paths, one reader for both layouts, one writer

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
                  ".lora.down.weight": "down", ".lora.up.weight": "up"}


@dataclass
class LoRAModule:
    """One module's LoRA as a file stores it: delta W = (alpha / rank) * up @ down.

    down: [rank, in] (Linear) or [rank, in, 1, 1] (1x1 Conv2d); up: [out, rank] or [out, rank, 1, 1].
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """(alpha / rank) * up @ down as an fp32 [out, in] matrix (a 1x1 kernel flattened)."""
        return self.scale * (self.up.flatten(1).float() @ self.down.flatten(1).float())


LoRAModules = dict[tuple[str, str], LoRAModule]  # (model, module path) -> LoRAModule; model in MODEL_NAMES


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
            raise LoRAError(f"{name}: {words[0]!r} is in no SD 1.x UNet or text-encoder module path "
                            f"(a LoRA for another model, e.g. SDXL, or a typo in the key?)")
        segments.append(segment)
        words = words[count:]
    return model_name, ".".join(segments).removeprefix("text_model.")


def _kohya_name(model_name: str, module_path: str) -> str:
    return unet_lora_name(module_path) if model_name == "unet" else text_encoder_lora_name(module_path)


def _split_key(key: str) -> tuple[str, str] | None:
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
    module_path = module_path.removeprefix("text_model.")
    unknown = [s for s in module_path.split(".") if s not in _PATH_SEGMENTS and not s.isdigit()]
    if unknown:  # it would get a kohya name that maps back to no path
        raise LoRAError(f"{name}: {unknown[0]!r} is in no SD 1.x UNet or text-encoder module path "
                        f"(a LoRA for another model, e.g. SDXL, or a typo in the key?)")
    return model_name, module_path


def _parse_lora_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[LoRAModules, list[str]]:
    """The modules of a file's tensors, and one line for each key or module that is not a usable LoRA.

    Our/kohya keys take alpha from `.alpha` (missing: alpha = rank); diffusers/PEFT keys from the
    `lora_adapter_metadata` header (PEFT's rules), else alpha = rank."""
    peft_configs = _peft_configs(metadata)
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    problems = set()
    for key, tensor in tensors.items():
        split = _split_key(key)
        if split is None:
            problems.add(f"{key}: not a LoRA down, up or alpha tensor")
            continue
        try:
            parts.setdefault(_module_key(split[0]), {})[split[1]] = tensor
        except LoRAError as error:
            problems.add(str(error))
    modules = {}
    for (model_name, module_path), found in sorted(parts.items(), key=lambda item: _module_order(item[0])):
        name = _kohya_name(model_name, module_path)
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
        modules[(model_name, module_path)] = LoRAModule(down=down, up=up, alpha=alpha)
    return modules, sorted(problems)


def _module_order(key: tuple[str, str]) -> tuple:
    """UNet first, then the text encoder; numbers in natural order (layers.2 before layers.10)."""
    model_name, module_path = key
    return MODEL_NAMES.index(model_name), _natural(module_path)


def _natural(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _checked_modules(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> LoRAModules:
    modules, problems = _parse_lora_tensors(tensors, metadata)
    if problems:
        raise LoRAError(f"{path}: {len(problems)} key(s) are not SD 1.x LoRA weights: {_first(problems, 3)}")
    if not modules:
        raise LoRAError(f"{path} holds no LoRA weights")
    return modules


def read_lora_modules(path: str | Path) -> tuple[LoRAModules, dict[str, str]]:
    """The modules of a LoRA file in either layout, keyed (model, module path), and its metadata; no model needed.
    A key that is not an SD 1.x LoRA tensor is an error naming it."""
    tensors, metadata = read_lora_file(path)
    return _checked_modules(path, tensors, metadata), metadata


def write_lora_file(path: str | Path, modules: LoRAModules, metadata: dict[str, str], layout: str = "kohya") -> Path:
    """Write `modules` (tensors as they are) with `metadata`, in one of LAYOUTS:
    kohya: `lora_unet_<path>.lora_down.weight` / `.lora_up.weight` / 0-d `.alpha` (fp32), our training format;
    peft:  `unet.<path>.lora_A.weight` / `.lora_B.weight`, the alphas in diffusers' `lora_adapter_metadata` header,
           because PEFT keys carry none (diffusers' own convert_state_dict_to_kohya loses them the other way)."""
    if layout == "kohya":
        tensors = {}
        for (model_name, module_path), module in modules.items():
            name = _kohya_name(model_name, module_path)
            tensors[f"{name}.lora_down.weight"] = module.down
            tensors[f"{name}.lora_up.weight"] = module.up
            tensors[f"{name}.alpha"] = torch.tensor(module.alpha, dtype=torch.float32)
        header = {k: v for k, v in metadata.items() if k not in _PEFT_HEADER_KEYS}
    elif layout == "peft":
        tensors = {}
        for (model_name, module_path), module in modules.items():
            tensors[f"{model_name}.{module_path}.lora_A.weight"] = module.down
            tensors[f"{model_name}.{module_path}.lora_B.weight"] = module.up
        adapter_metadata = json.dumps(_peft_adapter_metadata(modules), indent=2, sort_keys=True)
        header = dict(metadata, format="pt", lora_adapter_metadata=adapter_metadata)
    else:
        raise LoRAError(f"layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    return _write_safetensors(path, tensors, header)


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


def _rank_alpha_metadata(modules: LoRAModules) -> dict[str, str]:
    """`rank` / `alpha` and kohya's `ss_network_dim` / `ss_network_alpha`: the value every module shares, else
    "dynamic" (kohya's word for per-module ranks)."""
    ranks = {m.rank for m in modules.values()}
    alphas = {m.alpha for m in modules.values()}
    rank = str(ranks.pop()) if len(ranks) == 1 else "dynamic"
    alpha = str(alphas.pop()) if len(alphas) == 1 else "dynamic"
    return {"rank": rank, "alpha": alpha, "ss_network_dim": rank, "ss_network_alpha": alpha}


# ---------------------------------------------------------------------------------------------------------------
# LoRA file tools: convert, merge, resize, inspect

def convert_lora_file(path: str | Path, out: str | Path, layout: str) -> Path:
    """Rewrite a LoRA file in `layout` ("kohya" or "peft"): the same tensors bit for bit, the same alphas and
    metadata, so kohya -> peft -> kohya gives the file back."""
    if layout not in LAYOUTS:
        raise LoRAError(f"--to {layout}: expected one of {', '.join(LAYOUTS)}")
    modules, metadata = read_lora_modules(path)
    return write_lora_file(out, modules, metadata, layout)


def merge_lora_modules(sources: list[tuple[LoRAModules, float]]) -> LoRAModules:
    """Exact weighted sum of LoRAs by concatenating ranks. For a module present in files i (others add nothing):

        down = cat_i(down_i)                      [sum r_i, in]
        up   = cat_i(w_i * (alpha_i / r_i) * up_i) [out, sum r_i]     alpha = sum r_i (scale 1)

    so up @ down = sum_i w_i * (alpha_i / r_i) * up_i @ down_i."""
    pieces: dict[tuple[str, str], list[tuple[LoRAModule, float]]] = {}
    for modules, weight in sources:
        for key, module in modules.items():
            pieces.setdefault(key, []).append((module, weight))
    merged = {}
    for key, found in sorted(pieces.items(), key=lambda item: _module_order(item[0])):
        shapes = {(tuple(m.down.shape[1:]), tuple(m.up.shape[:1]) + tuple(m.up.shape[2:])) for m, _ in found}
        if len(shapes) > 1:
            raise LoRAError(f"{_kohya_name(*key)} has different shapes in the files to merge ({sorted(shapes)}); "
                            f"only LoRAs for the same base model can be merged")
        down = torch.cat([m.down.float() for m, _ in found])
        up = torch.cat([weight * m.scale * m.up.float() for m, weight in found], dim=1)
        merged[key] = LoRAModule(down=down, up=up, alpha=float(down.shape[0]))
    return merged


def merge_lora_files(out: str | Path, inputs: list[tuple[str | Path, float]]) -> Path:
    """Merge LoRA files, each at its weight, into one kohya-layout file (see merge_lora_modules). Metadata all
    inputs agree on is kept; rank and alpha are the merged ones; `merged_from` lists the inputs and weights."""
    if not inputs:
        raise LoRAError("merge needs at least one FILE:WEIGHT")
    read = [read_lora_modules(path) for path, _ in inputs]
    merged = merge_lora_modules([(modules, weight) for (modules, _), (_, weight) in zip(read, inputs)])
    first, *others = [metadata for _, metadata in read]
    header = {k: v for k, v in first.items() if all(m.get(k) == v for m in others)}
    header |= _rank_alpha_metadata(merged) | {"format_version": FORMAT_VERSION,
                                              "merged_from": json.dumps([[str(p), w] for p, w in inputs])}
    return write_lora_file(out, merged, header)


def _delta_svd(module: LoRAModule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD (U [out, k], S [k], Vh [k, in], fp64) of the module's delta, through its rank-r factors: with
    up = Qu Ru and down^T = Qd Rd, delta = Qu (scale * Ru Rd^T) Qd^T, so the SVD of the r x r core gives the
    delta's exactly, in O((out + in) r^2) instead of O(out * in * min(out, in))."""
    q_up, r_up = torch.linalg.qr(module.up.flatten(1).double())
    q_down, r_down = torch.linalg.qr(module.down.flatten(1).double().T)
    u, s, vh = torch.linalg.svd(module.scale * r_up @ r_down.T, full_matrices=False)
    return q_up @ u, s, vh @ q_down.T


def resize_lora_modules(modules: LoRAModules, rank: int) -> tuple[LoRAModules, dict[tuple[str, str], float], float]:
    """Reduce every module of rank above `rank` to the best rank-`rank` approximation of its delta (Eckart-Young:
    the truncated SVD U_k S_k Vh_k), stored as up = U_k sqrt(S_k), down = sqrt(S_k) Vh_k, alpha = k (scale 1).
    Modules already at or below `rank` are kept as they are (nothing to lose).

    Returns the modules, the energy kept per module, sum_{i<k} s_i^2 / sum_i s_i^2 (1 for a zero delta), and
    overall (the same sums over all modules: the fraction of the squared Frobenius norm kept)."""
    if rank < 1:
        raise LoRAError(f"rank {rank}: a LoRA rank must be at least 1, e.g. --rank 8")
    resized, energy = {}, {}
    all_kept, all_total = 0.0, 0.0
    for key, module in modules.items():
        u, s, vh = _delta_svd(module)
        kept, total = s[:rank].square().sum().item(), s.square().sum().item()
        all_kept, all_total = all_kept + kept, all_total + total
        energy[key] = kept / total if total > 0 else 1.0
        if module.rank <= rank:
            resized[key] = module
            continue
        k = min(rank, s.numel())  # a delta has at most min(out, in) singular values
        root = s[:k].sqrt()
        up = (u[:, :k] * root).float().reshape(module.up.shape[0], k, *module.up.shape[2:])
        down = (root[:, None] * vh[:k]).float().reshape(k, *module.down.shape[1:])
        resized[key] = LoRAModule(down=down.contiguous(), up=up.contiguous(), alpha=float(k))
    return resized, energy, (all_kept / all_total if all_total > 0 else 1.0)


def resize_lora_file(path: str | Path, out: str | Path, rank: int) -> tuple[dict[tuple[str, str], float], float]:
    """Resize a LoRA file to `rank` (see resize_lora_modules) and write it in the kohya layout; returns the energy
    kept per module and overall, which the file's metadata also records (`resize_energy_kept`)."""
    modules, metadata = read_lora_modules(path)
    resized, energy, overall = resize_lora_modules(modules, rank)
    header = metadata | _rank_alpha_metadata(resized) | {"resize_energy_kept": f"{overall:.6f}"}
    write_lora_file(out, resized, header)
    return energy, overall


def _target_name(module_path: str) -> str:
    """The projection a path ends in, inside its block: `...transformer_blocks.0.attn1.to_q` -> `attn1.to_q`,
    `...attentions.0.proj_in` -> `proj_in`, `encoder.layers.3.self_attn.q_proj` -> `self_attn.q_proj`."""
    return re.sub(r"^.*\.(?:transformer_blocks|attentions|resnets|layers)\.\d+\.", "", module_path)


def _block_name(model_name: str, module_path: str) -> str:
    """`unet down_blocks.0`, `unet mid_block`, `unet up_blocks.1`, `text_encoder layers.3` (else the first segment)."""
    found = re.match(r"(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.", module_path) if model_name == "unet" \
        else re.search(r"(layers\.\d+)\.", module_path)
    return f"{model_name} {found.group(1) if found else module_path.split('.')[0]}"


def inspect_lora_file(path: str | Path) -> dict:
    """What a LoRA file holds: layout, module counts per model, targets (projection -> count), ranks and alphas
    (value -> count), metadata, and the Frobenius norm of the delta (alpha / rank) up @ down per block
    (sqrt of the sum of its modules' squared norms) and overall."""
    tensors, metadata = read_lora_file(path)
    modules = _checked_modules(path, tensors, metadata)
    squared: dict[str, float] = {}
    for (model_name, module_path), module in modules.items():
        block = _block_name(model_name, module_path)
        squared[block] = squared.get(block, 0.0) + module.delta().square().sum().item()
    return {
        "file": str(path),
        "layout": "peft" if any(k.startswith(tuple(f"{m}." for m in MODEL_NAMES)) for k in tensors) else "kohya",
        "modules": dict(Counter(model_name for model_name, _ in modules)),
        "targets": dict(Counter(_target_name(module_path) for _, module_path in modules)),
        "ranks": dict(sorted(Counter(m.rank for m in modules.values()).items())),
        "alphas": dict(sorted(Counter(m.alpha for m in modules.values()).items())),
        "metadata": metadata,
        "block_norms": {block: math.sqrt(value) for block, value in squared.items()},  # modules come in order
        "total_norm": math.sqrt(sum(squared.values())),
    }


def format_inspection(info: dict) -> str:
    """inspect_lora_file's result as a short report (long metadata values cut to one line)."""
    def counted(counts: dict) -> str:
        return ", ".join(f"{value} x{count}" for value, count in counts.items())

    width = max(len(block) for block in info["block_norms"])
    lines = [f"{info['file']}: {info['layout']} layout, "
             + ", ".join(f"{count} {model_name} modules" for model_name, count in info["modules"].items()),
             f"targets: {counted(info['targets'])}",
             f"rank: {counted(info['ranks'])}",
             f"alpha: {counted(info['alphas'])}",
             "delta norm ||(alpha / rank) up @ down||_F per block:"]
    lines += [f"  {block:<{width}}  {norm:.6g}" for block, norm in info["block_norms"].items()]
    lines += [f"  {'total':<{width}}  {info['total_norm']:.6g}", f"metadata ({len(info['metadata'])} keys):"]
    for key, value in sorted(info["metadata"].items()):
        value = " ".join(value.split())
        lines.append(f"  {key}: {value[:70] + ' ...' if len(value) > 70 else value}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Interop self-test: would diffusers, AUTOMATIC1111 and ComfyUI load this file as the network computes it?

_RESNET_LDM_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                     "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_COMFYUI_CLIP_TARGETS = r"layers\.\d+\.(?:self_attn\.(?:q|k|v|out)_proj|mlp\.fc1|mlp\.fc2)"
_DELTA_TOLERANCE = 1e-4  # file and network deltas are both fp32: they differ by summation order only


def _a1111_name(name: str) -> str:
    """The module name AUTOMATIC1111 (extensions-builtin/Lora, `convert_diffusers_name_to_compvis`) looks up for
    a kohya SD 1.x name. Its block numbers are fixed to SD 1.x's layout: 3 input and 3 output blocks per level.
    Other names are looked up unchanged (and miss); conv_in/out and samplers are 3x3 and never carry our LoRA."""
    found = re.fullmatch(r"lora_unet_(down|up)_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", name)
    if found:
        side, level, part, index, rest = found.groups()
        block = 1 + int(level) * 3 + int(index) if side == "down" else int(level) * 3 + int(index)
        blocks = "input_blocks" if side == "down" else "output_blocks"
        return f"diffusion_model_{blocks}_{block}_{int(part == 'attentions')}_{_ldm_rest(part, rest, '_')}"
    found = re.fullmatch(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", name)
    if found:
        part, index, rest = found.groups()
        block = 1 if part == "attentions" else 2 * int(index)
        return f"diffusion_model_middle_block_{block}_{_ldm_rest(part, rest, '_')}"
    found = re.fullmatch(r"lora_unet_time_embedding_linear_(\d+)", name)
    if found:
        return f"diffusion_model_time_embed_{2 * int(found.group(1)) - 2}"
    found = re.fullmatch(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", name)
    if found:
        return f"transformer_text_model_encoder_layers_{found.group(1)}_{found.group(2)}"
    return name


def _ldm_rest(part: str, rest: str, separator: str) -> str:
    """The path inside a CompVis block: unchanged in an attention, renamed in a resnet (conv1 -> in_layers.2)."""
    return rest if part == "attentions" else _RESNET_LDM_NAMES.get(rest, rest).replace(".", separator)


def _ldm_unet_path(module_path: str, layers_per_block: int) -> str | None:
    """Where a diffusers UNet module sits in the original CompVis UNet (ldm openaimodel.py, what A1111 runs),
    for any number of layers per block: input block 0 is conv_in, each down level has `layers_per_block` blocks
    and a downsampler, each up level `layers_per_block + 1` blocks, the middle block is resnet, attention, resnet.
    None for modules outside the resnets, attentions and time embedding."""
    found = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(attentions|resnets)\.(\d+)\.(.+)", module_path)
    if found:
        side, level, part, index, rest = found.groups()
        per_level = layers_per_block + 1
        block = 1 + int(level) * per_level + int(index) if side == "down" else int(level) * per_level + int(index)
        blocks = "input_blocks" if side == "down" else "output_blocks"
        return f"{blocks}.{block}.{int(part == 'attentions')}.{_ldm_rest(part, rest, '.')}"
    found = re.fullmatch(r"mid_block\.(attentions|resnets)\.(\d+)\.(.+)", module_path)
    if found:
        part, index, rest = found.groups()
        return f"middle_block.{1 if part == 'attentions' else 2 * int(index)}.{_ldm_rest(part, rest, '.')}"
    found = re.fullmatch(r"time_embedding\.linear_(\d+)", module_path)
    return f"time_embed.{2 * int(found.group(1)) - 2}" if found else None


def _our_path(model_name: str, module_path: str) -> str:
    """Our spelling of a model's module path: text-encoder paths without transformers 4.x's `text_model.`."""
    return module_path.removeprefix("text_model.") if model_name == "text_encoder" else module_path


def _layer_paths(model: nn.Module | None, model_name: str) -> list[str]:
    """Our paths of the modules that hold a weight, a LoRALayer standing for the layer it wraps."""
    if model is None:
        return []
    wrapped = {path for path, module in model.named_modules() if isinstance(module, LoRALayer)}
    paths = wrapped | {path for path, module in model.named_modules()
                       if isinstance(getattr(module, "weight", None), torch.Tensor)
                       and path.rpartition(".")[0] not in wrapped}
    return sorted(_our_path(model_name, path) for path in paths)


def _a1111_unmatched(names: list[str], unet: nn.Module, text_encoder: nn.Module | None) -> list[str]:
    """Names A1111 would not apply to their own module: its lookup misses, or lands on another module (its fixed
    SD 1.x numbering on a UNet with another layout)."""
    own_name = {}  # A1111's name of a module of this model -> the kohya name of the same module
    for module_path in _layer_paths(unet, "unet"):
        ldm_path = _ldm_unet_path(module_path, unet.config.layers_per_block)
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


def _network_layers(models: dict[str, nn.Module]) -> dict[tuple[str, str], LoRALayer]:
    return {(model_name, _our_path(model_name, path)): module for model_name, model in models.items()
            for path, module in model.named_modules() if isinstance(module, LoRALayer)}


def _delta_error(modules: LoRAModules, layers: dict[tuple[str, str], LoRALayer]) -> float:
    """max over shared modules of |delta_file x - delta_network x| / max(1, |delta_network x|) for a fixed x:
    the file's (alpha / rank) up @ down against the network's own scale * up(down(x))."""
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for key in sorted(modules.keys() & layers.keys()):
        layer = layers[key]
        x = torch.randn(2, *layer.down.weight.shape[1:], generator=generator).to(layer.down.weight.device)
        with torch.no_grad():
            expected = (layer.scale * layer.up(layer.down(x))).flatten(1).cpu()
        from_file = x.flatten(1).cpu() @ modules[key].delta().T
        worst = max(worst, ((from_file - expected).abs().max() / expected.abs().max().clamp(min=1.0)).item())
    return worst


def _without_lora(model: nn.Module) -> nn.Module:
    """A deep copy of `model` with every LoRALayer replaced by the layer it wraps: the frozen base model."""
    base = copy.deepcopy(model)
    for path in [p for p, m in base.named_modules() if isinstance(m, LoRALayer)]:
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
def _at_full_strength(models: list[nn.Module], layers: list[LoRALayer]) -> Iterator[None]:
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
        return "skipped: peft not installed"
    from diffusers import StableDiffusionPipeline
    from peft.tuners.lora import LoraLayer

    bases = {model_name: _without_lora(model) for model_name, model in models.items()}
    try:
        state_dict, alphas, adapter_metadata = StableDiffusionPipeline.lora_state_dict(
            str(path.parent), weight_name=path.name, return_lora_metadata=True)
        StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, bases["unet"], metadata=adapter_metadata)
        if "text_encoder" in bases:
            StableDiffusionPipeline.load_lora_into_text_encoder(state_dict, alphas, bases["text_encoder"],
                                                                metadata=adapter_metadata)
    except Exception as error:  # whatever diffusers raises, its refusal is the finding
        return f"diffusers refused the file: {type(error).__name__}: {str(error).strip().splitlines()[0]}"
    loaded = {_kohya_name(model_name, _our_path(model_name, p)) for model_name, model in bases.items()
              for p, module in model.named_modules() if isinstance(module, LoraLayer)}
    unused, extra = sorted(set(names) - loaded), sorted(loaded - set(names))
    mismatches = ([f"left {len(unused)} module(s) of the file unused: {_first(unused)}"] if unused else []) \
        + ([f"put LoRA on {len(extra)} module(s) the file does not name: {_first(extra)}"] if extra else [])
    if mismatches:
        return "diffusers " + "; ".join(mismatches)
    outputs = _probe_outputs(bases["unet"], bases.get("text_encoder"))
    for model_name, expected in reference.items():
        error = ((outputs[model_name] - expected).abs().max() / expected.abs().max().clamp(min=1.0)).item()
        if error > _output_tolerance(models[model_name]):
            return (f"the {model_name} output with the file loaded by diffusers differs from the network's by "
                    f"{error:.2e} (relative; tolerance {_output_tolerance(models[model_name]):.0e})")
    return "ok"


def _module_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Every module name in a file as spelled there, unchecked (a typo stays a typo); a key that is no LoRA
    tensor stands for itself."""
    return sorted({split[0] if (split := _split_key(key)) else key for key in tensors})


def _kohya_spelling(name: str) -> str:
    """`unet.<path>` -> `lora_unet_<path with _>` (`text_encoder.` likewise); other names as they are."""
    model_name, dot, module_path = name.partition(".")
    return _kohya_name(model_name, _our_path(model_name, module_path)) if dot and model_name in MODEL_NAMES else name


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
    (c) the delta: each module's (alpha / rank) up @ down from the file, applied to a fixed x, against the
        network's own scale * up(down(x)); the worst difference relative to max(1, |delta x|), at most 1e-4.

    Returns {"file", "diffusers": "ok" | "skipped: peft not installed" | reason, "a1111_unmatched",
    "comfyui_unmatched", "network_unmatched" (modules only one of file and network has), "file_problems" (keys
    that are no SD 1.x LoRA), "max_delta_error", "ok"}; write_interop_report saves it beside the file."""
    path = Path(path)
    tensors, metadata = read_lora_file(path)
    modules, problems = _parse_lora_tensors(tensors, metadata)
    names = _module_names(tensors)
    models = {"unet": unet} | ({"text_encoder": text_encoder} if text_encoder is not None else {})
    layers = _network_layers(models)
    if not layers:
        raise LoRAError("check_interop compares the file with the LoRA network injected in the models, and they "
                        "have none; pass the UNet (and text encoder) that trained it, or inject and load the file")
    if any(layer.merged_multiplier is not None for layer in layers.values()):
        raise LoRAError("the network is merged into the model weights; call network.unmerge() before check_interop")
    if text_encoder is None and any(model_name == "text_encoder" for model_name, _ in modules):
        raise LoRAError(f"{path} has text-encoder modules; pass text_encoder= to check them too")
    with _at_full_strength(list(models.values()), list(layers.values())):
        reference = _probe_outputs(unet, text_encoder)
        max_delta_error = _delta_error(modules, layers)
    report = {
        "file": str(path),
        "diffusers": _diffusers_check(path, models, [_kohya_spelling(name) for name in names], reference),
        "a1111_unmatched": _a1111_unmatched(names, unet, text_encoder),
        "comfyui_unmatched": _comfyui_unmatched(names, unet, text_encoder),
        "network_unmatched": sorted(_kohya_name(*key) for key in modules.keys() ^ layers.keys()),
        "file_problems": problems,
        "max_delta_error": max_delta_error,
    }
    report["ok"] = (report["diffusers"] in ("ok", "skipped: peft not installed")
                    and max_delta_error <= _DELTA_TOLERANCE
                    and not any(report[k] for k in ("a1111_unmatched", "comfyui_unmatched", "network_unmatched",
                                                    "file_problems")))
    return report


def write_interop_report(lora_path: str | Path, report: dict) -> Path:
    """Write check_interop's report as JSON beside the LoRA file: `<name>.interop.json`."""
    out = Path(lora_path).with_suffix(".interop.json")
    atomic_write(out, (json.dumps(report, indent=2) + "\n").encode())
    return out


# ---------------------------------------------------------------------------------------------------------------
# Command line: python lora_diffusion.py inspect|convert|merge|resize ...

def _merge_input(spec: str) -> tuple[Path, float]:
    """`FILE:WEIGHT` (the last colon splits, so Windows drive letters survive)."""
    path, _, weight = spec.rpartition(":")
    try:
        value = float(weight)
    except ValueError:
        value = math.nan
    if not path or not math.isfinite(value):
        raise LoRAError(f"merge input {spec!r}: expected FILE:WEIGHT with a number after the last colon, "
                        f"e.g. style.safetensors:0.7")
    return Path(path), value


def _run_tool(args: argparse.Namespace) -> str:
    if args.tool == "inspect":
        return format_inspection(inspect_lora_file(args.file))
    if args.tool == "convert":
        convert_lora_file(args.file, args.out, args.to)
        return f"wrote {args.out} in the {args.to} layout"
    if args.tool == "merge":
        inputs = [_merge_input(spec) for spec in args.inputs]
        merge_lora_files(args.out, inputs)
        ranks = ", ".join(f"{r} x{n}" for r, n in inspect_lora_file(args.out)["ranks"].items())
        return f"wrote {args.out}: {len(inputs)} file(s) merged, rank {ranks}"
    energy, overall = resize_lora_file(args.file, args.out, args.rank)
    lowest = sorted(energy.items(), key=lambda item: item[1])[:5]
    return "\n".join([f"wrote {args.out} at rank {args.rank}: {100 * overall:.2f}% of the delta energy kept overall; "
                      "lowest modules:"] + [f"  {100 * kept:6.2f}%  {_kohya_name(*key)}" for key, kept in lowest])


def cli(argv: list[str] | None = None) -> int:
    """`python lora_diffusion.py TOOL ...`; a user mistake prints one `error: ...` line and returns 1."""
    parser = argparse.ArgumentParser(prog="python lora_diffusion.py", description="LoRA file tools for SD 1.x.")
    tools = parser.add_subparsers(dest="tool", required=True)
    inspect = tools.add_parser("inspect", help="targets, ranks, alphas, metadata and per-block delta norms")
    inspect.add_argument("file", type=Path)
    convert = tools.add_parser("convert", help="rewrite in the kohya/A1111 or the diffusers/PEFT layout, alphas kept")
    convert.add_argument("file", type=Path)
    convert.add_argument("out", type=Path)
    convert.add_argument("--to", choices=LAYOUTS, required=True, help="kohya: ours, A1111, ComfyUI; peft: diffusers")
    merge = tools.add_parser("merge", help="one file holding the weighted sum of LoRAs (exact: ranks add up)")
    merge.add_argument("out", type=Path)
    merge.add_argument("inputs", nargs="+", metavar="FILE:WEIGHT")
    resize = tools.add_parser("resize", help="lower the rank by truncated SVD, reporting the energy kept")
    resize.add_argument("file", type=Path)
    resize.add_argument("out", type=Path)
    resize.add_argument("--rank", type=int, required=True, help="the new rank, at least 1")
    args = parser.parse_args(argv)
    try:
        print(_run_tool(args))
    except LoRAError as error:
        print("error: " + " ".join(str(error).split()), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
