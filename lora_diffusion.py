"""LoRA for Stable Diffusion 1.x: the layer, the network that owns every layer, and injection into the models.

A LoRA layer adds a low-rank update to a frozen projection (Hu et al. 2021, https://arxiv.org/abs/2106.09685):

    out = base(x) + multiplier * (alpha / rank) * up(down(dropout(x)))

The network's state is the LoRA file (lora_file.py writes and reads it, and fuses a file into the model weights
for sampling; lora_tools.py converts, merges, resizes and inspects files; interop.py checks a file against
diffusers, AUTOMATIC1111 and ComfyUI).
"""

import json
import math
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from sdlora.lora_file import (
    LORA_FORMAT_VERSION, LoRAError, LoRAModule, LoRAModules, first_few, is_lora_target, kohya_name, kohya_tensors,
    our_path, parse_lora_tensors, rank_alpha_header, read_lora_file, write_lora_file,
)

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# LoCon (kohya's conv_dim): the 3x3 convolutions of the ResNet blocks and of the down- and upsamplers.
CONV_TARGETS = ("conv1", "conv2", "downsamplers.0.conv", "upsamplers.0.conv")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


class LoRALayer(nn.Module):
    """Wraps a frozen `nn.Linear` or `nn.Conv2d` and adds a trainable low-rank update:

        out = base(x) + multiplier * scale * up(down(dropout(x))),    scale = alpha / rank

    Shapes: x is (..., in) for Linear, (B, in, H, W) for Conv2d; `down` is A (rank x in), Kaiming-uniform;
    `up` is B (out x rank), zeros, so a new layer is an exact no-op. For a k x k convolution `down` is a k x k
    convolution to `rank` channels with the base's stride and padding and `up` a 1x1 one (kohya's LoCon), so the
    update's kernel is up @ down, [out, in, k, k]. `multiplier` is the user's strength (1 as trained). The LoRA
    weights are fp32 whatever the base dtype; the update is cast to the base output's dtype.
    """

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int = 4, alpha: float = 4.0, dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise LoRAError(f"rank must be a positive integer, got {rank}")
        if isinstance(base, nn.Conv2d) and (base.groups != 1 or base.padding_mode != "zeros"):
            raise LoRAError(f"only plain convolutions can take LoRA, got groups={base.groups}, "
                            f"padding_mode={base.padding_mode!r}")
        self.base = base
        self.rank = rank
        self.alpha = float(alpha)
        self.scale = self.alpha / rank
        self.multiplier = 1.0
        if isinstance(base, nn.Linear):
            self.down = nn.Linear(base.in_features, rank, bias=False, dtype=torch.float32, device=base.weight.device)
            self.up = nn.Linear(rank, base.out_features, bias=False, dtype=torch.float32, device=base.weight.device)
        else:
            self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, base.dilation,
                                  bias=False, dtype=torch.float32, device=base.weight.device)
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False, dtype=torch.float32, device=base.weight.device)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same init as the LoRA paper's reference code: A random, B zero.
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.multiplier == 0:
            return out
        if not torch.is_autocast_enabled(x.device.type):
            # Under autocast the matmuls cast x to the autocast dtype themselves: an fp32 copy first would be
            # wasted work (and memory kept for the backward pass) with the same result.
            x = x.to(self.down.weight.dtype)
        delta = self.up(self.down(self.dropout(x)))
        return out + (self.multiplier * self.scale * delta).to(out.dtype)

    def lora_module(self) -> LoRAModule:
        """The layer's weights as a file stores them (detached fp32 CPU copies, and alpha)."""
        return LoRAModule(down=self.down.weight.detach().float().cpu().contiguous(),
                          up=self.up.weight.detach().float().cpu().contiguous(), alpha=self.alpha)


class LoRANetwork:
    """Owns every injected LoRALayer; its tensors and metadata are the LoRA file.

    `layers` maps (model, module path) to the layer living inside the model, model in {"unet", "text_encoder"}
    (text-encoder paths without transformers 4.x's `text_model.`, as in the file reader). `conv_rank` and
    `conv_alpha` are the 3x3 convolutions' (0 and None without LoCon).
    """

    def __init__(self, layers: dict[tuple[str, str], LoRALayer], rank: int, alpha: float, targets: tuple[str, ...],
                 conv_rank: int = 0, conv_alpha: float | None = None):
        self.layers = layers
        self.rank = rank
        self.alpha = alpha
        self.targets = targets
        self.conv_rank = conv_rank
        self.conv_alpha = conv_alpha
        self._parameters = [p for layer in layers.values() for p in (layer.down.weight, layer.up.weight)]

    def parameters(self) -> list[nn.Parameter]:
        """The trainable parameters, one list built once (for the optimizer and gradient clipping alike)."""
        return self._parameters

    def set_multiplier(self, multiplier: float) -> None:
        for layer in self.layers.values():
            layer.multiplier = multiplier

    def lora_modules(self) -> LoRAModules:
        """Every layer's weights as the file stores them, keyed (model, module path)."""
        return {key: layer.lora_module() for key, layer in self.layers.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The file's tensors (kohya layout): `<name>.lora_down.weight`, `<name>.lora_up.weight`, `<name>.alpha`."""
        return kohya_tensors(self.lora_modules())

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
            problems.append(f"{len(missing)} missing key(s): {first_few(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected key(s): {first_few(unexpected)}")
        if wrong_shape:
            problems.append(f"{len(wrong_shape)} shape mismatch(es) (a LoRA for another model or rank?): "
                            f"{first_few(wrong_shape)}")
        if problems:
            raise LoRAError(f"{source} does not match this network (rank {self.rank}, conv rank {self.conv_rank}, "
                            f"targets {list(self.targets)}):\n  "
                            + "\n  ".join(problems))
        modules, unparsed = parse_lora_tensors(tensors, {})
        assert not unparsed and modules.keys() == self.layers.keys(), unparsed  # the keys are the writer's own
        for key, layer in self.layers.items():
            if modules[key].alpha != layer.alpha:
                raise LoRAError(f"{source} has alpha {modules[key].alpha} for {kohya_name(*key)}, this network has "
                                f"alpha {layer.alpha}; build the network with alpha={modules[key].alpha}")
            layer.down.weight.copy_(modules[key].down)
            layer.up.weight.copy_(modules[key].up)

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
        """Write the LoRA file; `metadata` (strings) is added to rank, alpha, targets and the format version."""
        header = rank_alpha_header(self.rank, self.alpha) | {
            "targets": ",".join(self.targets), "format_version": LORA_FORMAT_VERSION,
            "ss_network_module": "networks.lora"}
        if self.conv_rank:  # kohya's network_args, which its tools read back to rebuild a LoCon network
            header |= {"conv_rank": str(self.conv_rank), "conv_alpha": str(self.conv_alpha),
                       "ss_network_args": json.dumps({"conv_dim": str(self.conv_rank),
                                                      "conv_alpha": str(self.conv_alpha)})}
        header.update(metadata or {})
        return write_lora_file(path, self.lora_modules(), header)

    def load(self, path: str | Path) -> dict[str, str]:
        """Load a LoRA file written by save() into these layers; returns the file's metadata."""
        tensors, metadata = read_lora_file(path)
        self.load_state_dict(tensors, source=str(path))
        return metadata


def matching_paths(model: nn.Module, targets: Iterable[str]) -> list[str]:
    """Paths of the Linear and Conv2d modules whose path ends with `.<target>` for one of the targets (e.g.
    `attn2.to_out.0`)."""
    suffixes = tuple("." + t for t in targets)
    return [path for path, module in model.named_modules() if path.endswith(suffixes) and is_lora_target(module)]


def _wrap(model: nn.Module, model_name: str, paths: list[str], rank: int, alpha: float,
          dropout: float) -> dict[tuple[str, str], LoRALayer]:
    """Replace each module at `paths` by a LoRALayer around it (get_submodule + setattr, so ModuleList children
    such as `to_out.0` are wrapped too)."""
    layers = {}
    for path in paths:
        parent_path, _, child = path.rpartition(".")
        layer = LoRALayer(model.get_submodule(path), rank=rank, alpha=alpha, dropout=dropout)
        setattr(model.get_submodule(parent_path), child, layer)
        layers[(model_name, our_path(model_name, path))] = layer
    return layers


def inject_trainable_lora(
    unet: nn.Module,
    rank: int = 4,
    alpha: float = 4.0,
    targets: tuple[str, ...] = UNET_TARGETS,
    dropout: float = 0.0,
    text_encoder: nn.Module | None = None,
    text_encoder_targets: tuple[str, ...] = TEXT_ENCODER_TARGETS,
    conv_rank: int = 0,
    conv_alpha: float = 1.0,
) -> LoRANetwork:
    """Wrap every UNet module whose path ends with one of `targets` (and, when `text_encoder` is given, its
    attention projections) in a LoRALayer, and with `conv_rank` > 0 the UNet's 3x3 convolutions (CONV_TARGETS) in
    LoRALayers of that rank and `conv_alpha`; freeze everything else, and return the network that owns them."""
    wanted = [("UNet", "unet", unet, targets, rank, alpha)]
    if conv_rank:
        wanted.append(("UNet", "unet", unet, CONV_TARGETS, conv_rank, conv_alpha))
    if text_encoder is not None:
        wanted.append(("text encoder", "text_encoder", text_encoder, text_encoder_targets, rank, alpha))
    for label, _, model, *_ in wanted:
        if any(isinstance(m, LoRALayer) for m in model.modules()):
            raise LoRAError(f"the {label} already has LoRA layers; build a fresh model before injecting again")
    found = [matching_paths(model, model_targets) for _, _, model, model_targets, *_ in wanted]
    for (label, _, model, model_targets, *_), paths in zip(wanted, found):
        if not paths:
            raise LoRAError(f"no {label} module matches targets {list(model_targets)}; "
                            f"target names are module path endings such as 'to_q' or 'to_out.0'")
        model.requires_grad_(False)  # every model frozen before any layer is added: the LoRA weights stay trainable
    layers: dict[tuple[str, str], LoRALayer] = {}
    for (_, model_name, model, _, model_rank, model_alpha), paths in zip(wanted, found):
        layers.update(_wrap(model, model_name, paths, model_rank, model_alpha, dropout))
    all_targets = tuple(targets) + (CONV_TARGETS if conv_rank else ()) \
        + (tuple(text_encoder_targets) if text_encoder is not None else ())
    return LoRANetwork(layers, rank=rank, alpha=alpha, targets=all_targets, conv_rank=conv_rank,
                       conv_alpha=conv_alpha if conv_rank else None)
