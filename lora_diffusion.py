"""LoRA for Stable Diffusion 1.x: the layer, the network that owns every layer, and injection into the models.

A LoRA layer adds a low-rank update to a frozen projection (Hu et al. 2021, https://arxiv.org/abs/2106.09685):

    out = base(x) + multiplier * (alpha / rank) * up(down(dropout(x)))

Beside it, by `network_type` (NETWORK_TYPES): DoRA (below, a LoRA with a learned magnitude per input column),
LoHa and LoKr (sdlora/adapters.py), each a layer of its own over the shared AdapterLayer.

The network's state is the LoRA file (lora_file.py writes and reads it, and fuses a file into the model weights
for sampling; lora_tools.py converts, merges, resizes and inspects files; interop.py checks a file against
diffusers, AUTOMATIC1111 and ComfyUI).
"""

import json
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sdlora.adapter_weights import LoHaModule, LoKrModule, column_norm
from sdlora.adapters import AdapterLayer, LoHaLayer, LoKrLayer
from sdlora.lora_file import (
    LORA_FORMAT_VERSION, LoRAError, LoRAModule, LoRAModules, bundle_tensors, bundled_embeddings, first_few,
    is_lora_target, kohya_name, kohya_tensors, our_path, parse_lora_tensors, rank_alpha_header, read_lora_file,
    without_bundle, write_lora_file,
)

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# LoCon (kohya's conv_dim): the 3x3 convolutions of the ResNet blocks and of the down- and upsamplers.
CONV_TARGETS = ("conv1", "conv2", "downsamplers.0.conv", "upsamplers.0.conv")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
NETWORK_TYPES = ("lora", "dora", "loha", "lokr")
LORA_INITS = ("kaiming", "gaussian")  # how a LoRA's down projection starts (LoRALayer)
# kohya's ss_network_module and LyCORIS's `algo` in ss_network_args, which their tools read to rebuild the network
# (LyCORIS spells DoRA as algo lora with dora_wd; kohya's own networks.lora is plain LoRA / LoCon).
_NETWORK_MODULES = {"lora": ("networks.lora", None), "dora": ("lycoris.kohya", "lora"),
                    "loha": ("lycoris.kohya", "loha"), "lokr": ("lycoris.kohya", "lokr")}


@dataclass(frozen=True)
class AdapterSpec:
    """Which adapter every injected layer is, and its options: `lora_dropout` on the LoRA input; `network_dropout`
    on the down projection's output (kohya's meaning; LoRA only: the other types have no such activation);
    `rank_dropout` and `module_dropout` (see AdapterLayer); `lokr_factor` (see LoKrLayer); `lora_init`, how LoRA's
    and DoRA's down projection starts (see LoRALayer)."""

    network_type: str = "lora"
    lora_dropout: float = 0.0
    network_dropout: float = 0.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    lokr_factor: int = -1
    lora_init: str = "kaiming"


class LoRALayer(AdapterLayer):
    """Wraps a frozen `nn.Linear` or `nn.Conv2d` and adds a trainable low-rank update:

        out = base(x) + multiplier * scale * up(down(dropout(x))),    scale = alpha / rank

    Shapes: x is (..., in) for Linear, (B, in, H, W) for Conv2d; `down` is A (rank x in), Kaiming-uniform (`init`
    "kaiming", std 1/sqrt(3 in)) or N(0, 1/rank) ("gaussian", PEFT's, as the diffusers example trains); `up` is B
    (out x rank), zeros, so a new layer is an exact no-op. For a k x k convolution `down` is a k x k
    convolution to `rank` channels with the base's stride and padding and `up` a 1x1 one (kohya's LoCon), so the
    update's kernel is up @ down, [out, in, k, k]. `multiplier` is the user's strength (1 as trained). The LoRA
    weights are fp32 whatever the base dtype; the update is cast to the base output's dtype.

    In training only: `dropout` on the input x; `network_dropout` on down's output (kohya); `rank_dropout` drops
    each sample's ranks of down's output with probability p and scales the update by 1 / (1 - p) (kohya);
    `module_dropout` leaves the whole update out of a pass (see AdapterLayer).
    """

    network_type = "lora"

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int = 4, alpha: float = 4.0, dropout: float = 0.0,
                 network_dropout: float = 0.0, rank_dropout: float = 0.0, module_dropout: float = 0.0,
                 init: str = "kaiming"):
        super().__init__(base, rank, alpha, module_dropout, rank_dropout)
        if init not in LORA_INITS:
            raise LoRAError(f"lora_init {init!r}: choose one of {', '.join(LORA_INITS)}")
        self.init = init
        if isinstance(base, nn.Linear):
            self.down = nn.Linear(base.in_features, rank, bias=False, dtype=torch.float32, device=base.weight.device)
            self.up = nn.Linear(rank, base.out_features, bias=False, dtype=torch.float32, device=base.weight.device)
        else:
            self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, base.dilation,
                                  bias=False, dtype=torch.float32, device=base.weight.device)
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False, dtype=torch.float32, device=base.weight.device)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.network_dropout = nn.Dropout(network_dropout) if network_dropout > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # A random, B zero. Kaiming-uniform is the LoRA paper's reference code's and kohya's; the gaussian is PEFT's
        # (init_lora_weights="gaussian"). On SD 1.4's 320-1280 wide projections at rank 4 the gaussian A is about
        # 12x larger, so the update grows that much faster at the same learning rate.
        if self.init == "gaussian":
            nn.init.normal_(self.down.weight, std=1 / self.rank)
        else:
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """multiplier x scale x up(down(x)), with the dropouts in training (AdapterLayer.forward around it)."""
        hidden = self.network_dropout(self.down(self.dropout(x)))
        scale = self.scale
        if self.training and self.rank_dropout > 0:
            # One draw per sample and rank, as kohya; the survivors carry the update's expected size.
            kept = (torch.rand(hidden.shape[0], self.rank, device=hidden.device) >= self.rank_dropout)
            shape = (hidden.shape[0], self.rank, 1, 1) if isinstance(self.down, nn.Conv2d) else \
                (hidden.shape[0], *[1] * (hidden.dim() - 2), self.rank)
            hidden = hidden * kept.reshape(shape).to(hidden.dtype)
            scale = scale / (1 - self.rank_dropout)
        return self.multiplier * scale * self.up(hidden)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self.down.weight, self.up.weight]

    def delta_weight(self) -> torch.Tensor:
        """scale * up @ down shaped like the base weight (fp32)."""
        return (self.scale * self.up.weight.flatten(1) @ self.down.weight.flatten(1)).reshape(self.base.weight.shape)

    def file_module(self) -> LoRAModule:
        """The layer's weights as a file stores them (detached fp32 CPU copies, and alpha)."""
        return LoRAModule(down=self.down.weight.detach().float().cpu().contiguous(),
                          up=self.up.weight.detach().float().cpu().contiguous(), alpha=self.alpha)

    @torch.no_grad()
    def load_file_module(self, module: LoRAModule) -> None:
        # reshaped: some trainers store a 1x1 convolution's factors 2-D
        self.down.weight.copy_(module.down.reshape(self.down.weight.shape))
        self.up.weight.copy_(module.up.reshape(self.up.weight.shape))


class DoRALayer(LoRALayer):
    """DoRA (weight-decomposed LoRA, Liu et al. 2024, arXiv:2402.09353): a LoRA whose merged weight is rescaled to a
    learned magnitude per input column,

        W' = magnitude * V / ||V||_c,   V = W + scale * up @ down,   out = base(x) + multiplier * F(x, W' - W)

    W: the frozen weight [out, in(, k, k)] in fp32; ||V||_c: the norm over every axis but the input one, [1, in(, 1,
    1)]; magnitude: an fp32 parameter of that shape, initialised to ||W||_c so the layer starts as an exact no-op
    (m / ||W||_c is exactly 1). That axis is the one AUTOMATIC1111 and ComfyUI decompose a file's `dora_scale` along
    (see adapter_weights.weight_decompose, which cites their code); PEFT's DoRA keeps it per output row and its files
    would load wrongly in A1111. ||V||_c is treated as a constant in the backward pass, as the paper proposes
    (section 4.3) to save memory; the forward value is the merged weight's exactly. Rank dropout drops ranks of the
    update (one draw per pass); `network_dropout` is not offered, since the update is applied as a weight."""

    network_type = "dora"

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int = 4, alpha: float = 4.0, rank_dropout: float = 0.0,
                 module_dropout: float = 0.0, init: str = "kaiming"):
        super().__init__(base, rank, alpha, rank_dropout=rank_dropout, module_dropout=module_dropout, init=init)
        self.magnitude = nn.Parameter(column_norm(base.weight.detach().float()))

    def update(self, x: torch.Tensor) -> torch.Tensor:
        return AdapterLayer.update(self, x)  # the decomposed weight applied, not LoRA's two projections

    def delta_weight(self, kept: torch.Tensor | None = None) -> torch.Tensor:
        """W' - W (fp32, shaped like the base weight); `kept` scales the ranks (rank dropout's mask)."""
        weight = self.base.weight.detach().float()
        up = self.up.weight.flatten(1) if kept is None else self.up.weight.flatten(1) * kept
        merged = weight + (self.scale * up @ self.down.weight.flatten(1)).reshape(weight.shape)
        return merged * (self.magnitude / column_norm(merged).detach()) - weight

    def training_delta(self) -> torch.Tensor:
        return self.delta_weight(self.kept_share(self.rank, self.up.weight.device))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self.down.weight, self.up.weight, self.magnitude]

    def file_module(self) -> LoRAModule:
        module = super().file_module()
        module.dora_scale = self.magnitude.detach().float().cpu().contiguous()
        return module

    @torch.no_grad()
    def load_file_module(self, module: LoRAModule) -> None:
        super().load_file_module(module)
        if module.dora_scale is None or module.dora_scale.numel() != self.magnitude.numel():
            found = None if module.dora_scale is None else tuple(module.dora_scale.shape)
            raise LoRAError(f"a DoRA layer needs a dora_scale of {self.magnitude.numel()} values (one per input "
                            f"column, the kohya/LyCORIS convention), the file has {found}")
        self.magnitude.copy_(module.dora_scale.reshape(self.magnitude.shape))


def make_layer(base: nn.Linear | nn.Conv2d, rank: int, alpha: float, spec: AdapterSpec) -> AdapterLayer:
    """The layer of `spec.network_type` around `base`, with the spec's dropouts."""
    if spec.network_type == "lora":
        return LoRALayer(base, rank, alpha, spec.lora_dropout, spec.network_dropout, spec.rank_dropout,
                         spec.module_dropout, spec.lora_init)
    if spec.network_type == "dora":
        return DoRALayer(base, rank, alpha, spec.rank_dropout, spec.module_dropout, spec.lora_init)
    if spec.network_type == "loha":
        return LoHaLayer(base, rank, alpha, spec.module_dropout, spec.rank_dropout)
    if spec.network_type == "lokr":
        return LoKrLayer(base, rank, alpha, spec.lokr_factor, spec.module_dropout, spec.rank_dropout)
    raise LoRAError(f"network_type {spec.network_type!r}: choose one of {', '.join(NETWORK_TYPES)}")


class LoRANetwork:
    """Owns every injected adapter layer; its tensors and metadata are the LoRA file.

    `layers` maps (model, module path) to the layer living inside the model, model in {"unet", "text_encoder"}
    (text-encoder paths without transformers 4.x's `text_model.`, as in the file reader). `conv_rank` and
    `conv_alpha` are the 3x3 convolutions' (0 and None without LoCon). `spec` is the adapter type and options
    every layer was made with; `parent` the (name, sha256) of the file training started from (network_weights).
    A token embedding trained beside the layers (pivotal tuning, add_token) is part of the state and the file too.
    """

    def __init__(self, layers: dict[tuple[str, str], AdapterLayer], rank: int, alpha: float,
                 targets: tuple[str, ...], conv_rank: int = 0, conv_alpha: float | None = None,
                 spec: AdapterSpec = AdapterSpec(), parent: tuple[str, str] | None = None):
        self.layers = layers
        self.rank = rank
        self.alpha = alpha
        self.targets = targets
        self.conv_rank = conv_rank
        self.conv_alpha = conv_alpha
        self.spec = spec
        self.parent = parent
        self._parameters = [p for layer in layers.values() for p in layer.trainable_parameters()]
        self.token = None  # the TokenEmbedding (sdlora/pivotal.py) trained beside the layers, if any

    def add_token(self, token) -> None:
        """Train a TokenEmbedding's vectors with the layers: in parameters() (last) and in the file's bundle."""
        self.token = token
        self._parameters.append(token.vectors)

    def embeddings(self) -> dict[str, torch.Tensor]:
        """{token: its vectors n x D} for the file's bundle: empty without pivotal tuning."""
        return {self.token.token: self.token.vectors} if self.token is not None else {}

    @property
    def network_type(self) -> str:
        return self.spec.network_type

    def parameters(self) -> list[nn.Parameter]:
        """The trainable parameters, one list built once (for the optimizer and gradient clipping alike)."""
        return self._parameters

    def set_multiplier(self, multiplier: float) -> None:
        for layer in self.layers.values():
            layer.multiplier = multiplier

    def lora_modules(self) -> LoRAModules:
        """Every layer's weights as the file stores them, keyed (model, module path)."""
        return {key: layer.file_module() for key, layer in self.layers.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The file's tensors (kohya layout): `<name>.lora_down.weight`, `<name>.lora_up.weight`, `<name>.alpha`
        for LoRA; LoHa, LoKr and DoRA with their own keys (see adapter_weights.py); a trained token's bundle."""
        return kohya_tensors(self.lora_modules()) | bundle_tensors(self.embeddings())

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
            raise LoRAError(f"{source} does not match this network ({self.network_type}, rank {self.rank}, conv "
                            f"rank {self.conv_rank}, targets {list(self.targets)}):\n  " + "\n  ".join(problems))
        modules, unparsed = parse_lora_tensors(without_bundle(tensors), {})
        assert not unparsed and modules.keys() == self.layers.keys(), unparsed  # the keys are the writer's own
        for key, layer in self.layers.items():
            if modules[key].alpha != layer.alpha:
                raise LoRAError(f"{source} has alpha {modules[key].alpha} for {kohya_name(*key)}, this network has "
                                f"alpha {layer.alpha}; build the network with alpha={modules[key].alpha}")
            layer.load_file_module(modules[key])
        if self.token is not None:  # the strict check above found its bundle key
            self.token.vectors.copy_(bundled_embeddings(tensors)[self.token.token])

    def header(self) -> dict[str, str]:
        """The file's own metadata: rank, alpha, targets, format version, and kohya's `ss_network_module` /
        `ss_network_args` (LyCORIS's `algo`, `conv_dim`, `factor`, dropouts), which kohya's and LyCORIS's tools
        read back to rebuild the network; plain LoRA keeps kohya's networks.lora."""
        module, algo = _NETWORK_MODULES[self.network_type]
        header = rank_alpha_header(self.rank, self.alpha) | {
            "targets": ",".join(self.targets), "format_version": LORA_FORMAT_VERSION, "ss_network_module": module}
        args = {"algo": algo} if algo else {}
        if self.network_type == "dora":
            args["dora_wd"] = "True"
        if self.network_type == "lokr":
            args["factor"] = str(self.spec.lokr_factor)
        if self.conv_rank:  # kohya's network_args, which its tools read back to rebuild a LoCon network
            header |= {"conv_rank": str(self.conv_rank), "conv_alpha": str(self.conv_alpha)}
            args |= {"conv_dim": str(self.conv_rank), "conv_alpha": str(self.conv_alpha)}
        args |= {name: str(value) for name, value in (("rank_dropout", self.spec.rank_dropout),
                                                      ("module_dropout", self.spec.module_dropout)) if value}
        if args:
            header["ss_network_args"] = json.dumps(args)
        if self.network_type != "lora":
            header["network_type"] = self.network_type
        if self.token is not None:
            header["train_token"] = self.token.token
        if self.parent:
            header |= {"network_weights": self.parent[0], "network_weights_sha256": self.parent[1]}
        return header

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
        """Write the LoRA file; `metadata` (strings) is added to the network's own header."""
        return write_lora_file(path, self.lora_modules(), self.header() | (metadata or {}),
                               embeddings=self.embeddings())

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
          spec: AdapterSpec) -> dict[tuple[str, str], AdapterLayer]:
    """Replace each module at `paths` by a layer of spec's type around it (get_submodule + setattr, so ModuleList
    children such as `to_out.0` are wrapped too)."""
    layers = {}
    for path in paths:
        layers[(model_name, our_path(model_name, path))] = _put(model, path, make_layer(model.get_submodule(path),
                                                                                        rank, alpha, spec))
    return layers


def _put(model: nn.Module, path: str, layer: AdapterLayer) -> AdapterLayer:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path), child, layer)
    return layer


def _refuse_second_injection(models: list[tuple[str, nn.Module]]) -> None:
    for label, model in models:
        if any(isinstance(m, AdapterLayer) for m in model.modules()):
            raise LoRAError(f"the {label} already has LoRA layers; build a fresh model before injecting again")


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
    spec: AdapterSpec | None = None,
) -> LoRANetwork:
    """Wrap every UNet module whose path ends with one of `targets` (and, when `text_encoder` is given, its
    attention projections) in a layer of `spec`'s type (LoRA by default, with `dropout` on its input), and with
    `conv_rank` > 0 the UNet's 3x3 convolutions (CONV_TARGETS) in layers of that rank and `conv_alpha`; freeze
    everything else, and return the network that owns them."""
    spec = spec or AdapterSpec(lora_dropout=dropout)
    wanted = [("UNet", "unet", unet, targets, rank, alpha)]
    if conv_rank:
        wanted.append(("UNet", "unet", unet, CONV_TARGETS, conv_rank, conv_alpha))
    if text_encoder is not None:
        wanted.append(("text encoder", "text_encoder", text_encoder, text_encoder_targets, rank, alpha))
    _refuse_second_injection([(label, model) for label, _, model, *_ in wanted])
    found = [matching_paths(model, model_targets) for _, _, model, model_targets, *_ in wanted]
    for (label, _, model, model_targets, *_), paths in zip(wanted, found):
        if not paths:
            raise LoRAError(f"no {label} module matches targets {list(model_targets)}; "
                            f"target names are module path endings such as 'to_q' or 'to_out.0'")
        model.requires_grad_(False)  # every model frozen before any layer is added: the LoRA weights stay trainable
    layers: dict[tuple[str, str], AdapterLayer] = {}
    for (_, model_name, model, _, model_rank, model_alpha), paths in zip(wanted, found):
        layers.update(_wrap(model, model_name, paths, model_rank, model_alpha, spec))
    all_targets = tuple(targets) + (CONV_TARGETS if conv_rank else ()) \
        + (tuple(text_encoder_targets) if text_encoder is not None else ())
    return LoRANetwork(layers, rank=rank, alpha=alpha, targets=all_targets, conv_rank=conv_rank,
                       conv_alpha=conv_alpha if conv_rank else None, spec=spec)


def _layer_for(base: nn.Module, module: LoRAModule | LoHaModule | LoKrModule, spec: AdapterSpec) -> AdapterLayer:
    """A layer shaped as a file's module (its type, rank, alpha; LoKr's split and whole factors), weights loaded."""
    if isinstance(module, LoHaModule):
        layer = LoHaLayer(base, module.rank, module.alpha, spec.module_dropout, spec.rank_dropout)
    elif isinstance(module, LoKrModule):
        if module.w1 is None:
            raise LoRAError("its LoKr w1 is factored (lokr_w1_a/_b), which training keeps whole; convert the file to "
                            "a plain LoRA first (python lora_tools.py convert FILE OUT --to lora --rank 16)")
        layer = LoKrLayer(base, module.rank, module.alpha, module_dropout=spec.module_dropout,
                          rank_dropout=spec.rank_dropout, w1_shape=tuple(module.w1.shape),
                          whole_w2=module.w2 is not None)
    elif module.dora_scale is not None:
        layer = DoRALayer(base, module.rank, module.alpha, spec.rank_dropout, spec.module_dropout)
    else:
        layer = LoRALayer(base, module.rank, module.alpha, spec.lora_dropout, spec.network_dropout,
                          spec.rank_dropout, spec.module_dropout)
        if module.down.dim() == 4 and isinstance(base, nn.Conv2d) and module.down.shape[2:] != base.kernel_size:
            raise LoRAError(f"a {tuple(module.down.shape[2:])} down kernel for a {base.kernel_size} convolution")
    layer.load_file_module(module)
    return layer


def _target_of(module_path: str) -> str:
    """The path ending a target name stands for: `...attn1.to_out.0` -> `to_out.0`, `...resnets.0.conv1` -> `conv1`."""
    *_, parent, last = module_path.split(".")
    return f"{parent}.{last}" if last.isdigit() or parent in ("downsamplers", "upsamplers", "net") else last


def inject_from_modules(modules: LoRAModules, unet: nn.Module, text_encoder: nn.Module | None, spec: AdapterSpec,
                        parent: tuple[str, str], source: str) -> LoRANetwork:
    """Wrap exactly the modules a file names, each in a layer of the file's type, rank and alpha holding the
    file's weights (kohya's --network_weights with --dim_from_weights): the network starts as the file. Every
    module must exist in the models with the file's shape; all that do not are listed in one error."""
    types = sorted({module.network_type for module in modules.values()})
    if len(types) > 1:
        raise LoRAError(f"{source} mixes adapter types ({', '.join(types)}); start from a file of one type")
    models = {"unet": ("UNet", unet), "text_encoder": ("text encoder", text_encoder)}
    _refuse_second_injection([(label, model) for label, model in models.values() if model is not None])
    for _, model in models.values():
        if model is not None:
            model.requires_grad_(False)
    layers, problems = {}, []
    for (model_name, module_path), module in modules.items():
        model = models[model_name][1]
        prefix = "text_model." if model_name == "text_encoder" and hasattr(model, "text_model") else ""
        try:
            base = model.get_submodule(prefix + module_path) if model is not None else None
        except AttributeError:
            base = None
        if base is None or not is_lora_target(base):
            problems.append(f"{kohya_name(model_name, module_path)}: no such layer in the "
                            f"{models[model_name][0]}{'' if model is not None else ' (not loaded)'}")
            continue
        if module.shape_2d != (base.weight.shape[0], base.weight[0].numel()):
            problems.append(f"{kohya_name(model_name, module_path)}: weights for {list(module.shape_2d)}, the model's "
                            f"layer is {list(base.weight.shape)}")
            continue
        try:
            layers[(model_name, module_path)] = _put(model, prefix + module_path, _layer_for(base, module, spec))
        except LoRAError as error:
            problems.append(f"{kohya_name(model_name, module_path)}: {error}")
    if problems:
        raise LoRAError(f"--network_weights {source} does not fit this base model ({len(problems)} module(s); a file "
                        f"for another base model or targets?):\n  " + "\n  ".join(problems[:10])
                        + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""))
    convs = [layer for layer in layers.values()
             if isinstance(layer.base, nn.Conv2d) and layer.base.kernel_size != (1, 1)]
    others = [layer for layer in layers.values() if layer not in convs] or convs
    rank = Counter(layer.rank for layer in others).most_common(1)[0][0]
    alpha = Counter(layer.alpha for layer in others).most_common(1)[0][0]
    targets = tuple(sorted({_target_of(path) for _, path in layers}))
    return LoRANetwork(layers, rank=rank, alpha=alpha, targets=targets,
                       conv_rank=convs[0].rank if convs else 0, conv_alpha=convs[0].alpha if convs else None,
                       spec=AdapterSpec(types[0], spec.lora_dropout, spec.network_dropout, spec.rank_dropout,
                                        spec.module_dropout, spec.lokr_factor, spec.lora_init), parent=parent)
