"""Training that starts from an existing LoRA file (`network_weights`; kohya's --network_weights with
--dim_from_weights): the file is checked at minute 0, and the network is built from it, so the run's step 0 is
the base model with the file fused in, and the files it writes name the parent by its sha256."""

from pathlib import Path

from lora_diffusion import AdapterSpec, LoRANetwork, inject_from_modules
from sdlora.files import sha256_file
from sdlora.lora_file import LoRAError, read_lora_modules
from sdlora.settings import ConfigError

# Settings the file decides when network_weights is set; a value other than the default that the file contradicts
# is refused rather than silently ignored.
_FROM_THE_FILE = ("rank", "alpha", "conv_rank", "conv_alpha", "lora_targets", "lora_init")
_OTHER_BASES = ("sdxl", "sd_v2", "sd3", "flux")  # ss_base_model_version prefixes of models SD 1.x cannot take


def check_network_weights(cfg, defaults: dict) -> None:
    """Minute 0, before any model loads: the file reads as SD 1.x LoRA weights of one type, is for an SD 1.x
    base, agrees with --network_type and --train_text_encoder, and no setting it decides was changed."""
    if not cfg.network_weights:
        return
    try:
        modules, metadata = read_lora_modules(cfg.network_weights)
    except LoRAError as error:
        raise ConfigError(f"--network_weights {cfg.network_weights}: {error}") from None
    base = metadata.get("ss_base_model_version", "")
    if base.startswith(_OTHER_BASES):
        raise ConfigError(f"--network_weights {cfg.network_weights} was trained on {base}, not SD 1.x; start from "
                          f"a LoRA for SD 1.x, or set --network_weights \"\"")
    types = sorted({module.network_type for module in modules.values()})
    if cfg.network_type != defaults["network_type"] and types != [cfg.network_type]:
        raise ConfigError(f"--network_type {cfg.network_type} but --network_weights {cfg.network_weights} holds "
                          f"{', '.join(types)}: the file decides the type; drop --network_type")
    changed = [f"--{name} {getattr(cfg, name)}" for name in _FROM_THE_FILE if getattr(cfg, name) != defaults[name]]
    if changed:
        raise ConfigError(f"{', '.join(changed)} with --network_weights: the file decides the ranks, alphas, "
                          f"targets and starting weights (kohya's dim_from_weights); drop those flags, or resize the "
                          f"file first (python lora_tools.py resize FILE OUT --rank K)")
    has_text_encoder = any(model_name == "text_encoder" for model_name, _ in modules)
    if has_text_encoder != cfg.train_text_encoder:
        fix = "--train_text_encoder true" if has_text_encoder else "--train_text_encoder false"
        raise ConfigError(f"--network_weights {cfg.network_weights} {'has' if has_text_encoder else 'has no'} "
                          f"text-encoder modules and --train_text_encoder is {cfg.train_text_encoder}; set {fix}")


def network_from_file(cfg, unet, text_encoder, spec: AdapterSpec) -> LoRANetwork:
    """The network the file describes, its weights loaded, on the modules it names (all of which must exist with
    the file's shapes, or the error lists those that do not)."""
    path = Path(cfg.network_weights)
    modules, _ = read_lora_modules(path)
    network = inject_from_modules(modules, unet, text_encoder if cfg.train_text_encoder else None, spec,
                                  parent=(path.name, sha256_file(path)), source=str(path))
    print(f"network_weights: {len(network.layers)} {network.network_type} modules from {path} "
          f"(rank {network.rank}, alpha {network.alpha}, sha256 {network.parent[1][:12]})")
    return network
