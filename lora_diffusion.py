"""LoRA for Stable Diffusion 1.x: the layer, the network that owns every layer, and the LoRA file.

A LoRA layer adds a low-rank update to a frozen projection (Hu et al. 2021, https://arxiv.org/abs/2106.09685):

    out = base(x) + multiplier * (alpha / rank) * up(down(dropout(x)))

The file is the kohya / AUTOMATIC1111 layout (keys `lora_unet_<path>.lora_down.weight`, `.lora_up.weight`
and a 0-d `.alpha` per module), which diffusers, A1111 and ComfyUI all load at the same strength.
See FORMATS.md in the shared notes for what each consumer reads.
"""

import json
import math
import os
from collections.abc import Iterable
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
        tensors = self.state_dict()
        bad = [name for name, tensor in tensors.items() if not torch.isfinite(tensor).all()]
        if bad:
            raise LoRAError(f"refusing to write {path}: non-finite values in {_first(bad)}")
        atomic_write(path, safetensors_bytes(tensors, metadata=header))
        return path

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
        raise LoRAError(f"LoRA file not found: {path}")
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
    {"unet", "text_encoder"}. Understands our/kohya keys (`lora_unet_*`, `lora_te_*`, with `.alpha`) and the
    diffusers/PEFT keys (`unet.<path>.lora_A/lora_B.weight` or `.lora.down/.lora.up.weight`, alpha from
    `lora_adapter_metadata`, else alpha = rank). Every key must map onto a module, or the file is refused."""
    tensors, metadata = read_lora_file(path)
    paths_by_name = {unet_lora_name(p): ("unet", p) for p, m in unet.named_modules() if _is_lora_target(m)}
    if text_encoder is not None:
        paths_by_name |= {text_encoder_lora_name(p): ("text_encoder", p)
                          for p, m in text_encoder.named_modules() if _is_lora_target(m)}
    peft_configs = _peft_configs(metadata)
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unmatched = []
    for key, tensor in tensors.items():
        target, role = _parse_key(key, paths_by_name, text_encoder)
        if target is None:
            unmatched.append(key)
            continue
        pairs.setdefault(target, {})[role] = tensor
    if unmatched:
        raise LoRAError(f"{path}: {len(unmatched)} key(s) match no module of this SD 1.x model "
                        f"(a LoRA for another base model, e.g. SDXL?): {_first(sorted(unmatched))}")
    deltas = {}
    models = {"unet": unet, "text_encoder": text_encoder}
    for (model_name, module_path), parts in pairs.items():
        if "down" not in parts or "up" not in parts:
            raise LoRAError(f"{path}: {model_name} module {module_path} has no "
                            f"{'down/lora_A' if 'down' not in parts else 'up/lora_B'} weight")
        down, up = parts["down"].float(), parts["up"].float()
        rank = down.shape[0]
        if "alpha" in parts:
            alpha = float(parts["alpha"])
        else:
            alpha = _peft_alpha(peft_configs.get(model_name, {}), module_path, rank)
        base = models[model_name].get_submodule(module_path)
        delta = (alpha / rank) * (up.flatten(1) @ down.flatten(1))
        if delta.numel() != base.weight.numel():
            raise LoRAError(f"{path}: {model_name} module {module_path} has weights for shape "
                            f"{tuple(up.shape[:1]) + tuple(down.shape[1:])}, the model has "
                            f"{tuple(base.weight.shape)} (a LoRA for another base model?)")
        deltas[(model_name, module_path)] = delta.reshape(base.weight.shape)
    return deltas


_ROLE_SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha",
                  ".lora_A.weight": "down", ".lora_B.weight": "up",
                  ".lora.down.weight": "down", ".lora.up.weight": "up"}


def _parse_key(key: str, paths_by_name: dict, text_encoder: nn.Module | None) -> tuple[tuple[str, str] | None, str]:
    for suffix, role in _ROLE_SUFFIXES.items():
        if key.endswith(suffix):
            stem = key.removesuffix(suffix)
            break
    else:
        return None, ""
    if stem.startswith((UNET_PREFIX, TEXT_ENCODER_PREFIX)):
        return paths_by_name.get(stem), role
    model_name, _, module_path = stem.partition(".")
    if model_name == "unet":
        return paths_by_name.get(unet_lora_name(module_path)), role
    if model_name == "text_encoder" and text_encoder is not None:
        return paths_by_name.get(text_encoder_lora_name(module_path)), role
    return None, role


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
    """PEFT's rule: an `alpha_pattern` entry whose key ends the module path wins, then `lora_alpha`, else rank."""
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if module_path == pattern or module_path.endswith("." + pattern):
            return float(alpha)
    return float(config.get("lora_alpha", rank))


@torch.no_grad()
def fuse_lora_file(path: str | Path, unet: nn.Module, text_encoder: nn.Module | None, scale: float = 1.0) -> int:
    """Add `scale` x the file's deltas into the model weights (sampling then costs what the base model costs).
    Returns the number of modules changed."""
    deltas = lora_deltas(path, unet, text_encoder)
    models = {"unet": unet, "text_encoder": text_encoder}
    for (model_name, module_path), delta in deltas.items():
        weight = models[model_name].get_submodule(module_path).weight
        weight.copy_((weight.float() + scale * delta.to(weight.device)).to(weight.dtype))
    return len(deltas)
