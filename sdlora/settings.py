"""The constants-as-configuration convention shared by train_lora.py and generate.py.

Each script's constants at the top are its defaults; a flag of the same name overrides each one.
"""

import argparse
import json
import sys
from pathlib import Path

import diffusers
import torch
import transformers
from safetensors import SafetensorError, safe_open


# The one meaning of the `mixed_precision` setting: the dtype frozen models are loaded in.
PRECISION_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MIXED_PRECISIONS = ("auto",) + tuple(PRECISION_DTYPES)


def resolve_precision(choice: str) -> str:
    """`auto`: bf16 on a GPU that has it (fp16's range without its loss scaling), else fp16 on a GPU, no (fp32) on
    a CPU, where half precision is slower, not faster. Any other choice stands as given."""
    if choice != "auto":
        return choice
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def allow_tf32() -> None:
    """TF32 matmuls and convolutions on GPUs that have them (Ampere and later): fp32 work at tensor-core speed,
    with a 10-bit mantissa that diffusion training does not notice. No effect on a CPU."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


class ConfigError(ValueError):
    """A setting that cannot work; the message names the option and the fix."""


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


# Flags renamed in this release, old name -> new name: the old name still works, with a notice, for one release.
# Sample images and the held-out (validation) loss used to share the word "validation".
RENAMED_FLAGS = {
    "validation_prompts": "sample_prompts",
    "validation_steps": "sample_steps",
    "validation_inference_steps": "sample_inference_steps",
    "validation_guidance_scale": "sample_guidance_scale",
}


class RenamedFlag(argparse.Action):
    """An old flag name, kept for one release (add it with `dest` = the new name): says it was renamed, then sets
    the new name's value. train_lora.py's renamed constants and evaluate.py's `--scales` both use it."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"note: {self.option_strings[0]} is now --{self.dest}; the old name goes in the next release",
              file=sys.stderr)
        setattr(namespace, self.dest, values)


def build_parser(defaults: dict, description: str) -> argparse.ArgumentParser:
    """One flag per constant, typed like its default (booleans parse true/false explicitly, tuples take a list);
    a renamed constant's old flag (RENAMED_FLAGS) sets the new one, with a notice."""
    parser = argparse.ArgumentParser(description=description)
    old_names = {new: old for old, new in RENAMED_FLAGS.items()}
    for name, value in defaults.items():
        if isinstance(value, bool):  # bare `--flag` means true, as in the diffusers and kohya scripts
            kind = {"type": parse_bool, "nargs": "?", "const": True, "metavar": "true|false"}
        elif isinstance(value, tuple):
            kind = {"nargs": "*", "metavar": "VALUE", "type": type(value[0]) if value else str}
        else:
            kind = {"type": type(value)}
        parser.add_argument(f"--{name}", default=value, **kind)
        if name in old_names:
            parser.add_argument(f"--{old_names[name]}", dest=name, action=RenamedFlag,
                                default=argparse.SUPPRESS, help=f"old name of --{name}", **kind)
    return parser


def resolve_machine_settings(cfg: argparse.Namespace) -> argparse.Namespace:
    """A copy of `cfg` with `mixed_precision auto` made concrete for this machine (said once, and saved so in
    config.json and the checkpoints), and TF32 allowed where the GPU has it."""
    allow_tf32()
    precision = resolve_precision(cfg.mixed_precision)
    if precision != cfg.mixed_precision:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
        print(f"mixed precision: {cfg.mixed_precision} -> {precision} ({device})")
    return argparse.Namespace(**dict(vars(cfg), mixed_precision=precision))


def check_model_source(name_or_path: str) -> None:
    """Stop at once, with the fix, when the base model cannot be found (typo, or offline without a copy)."""
    local = Path(name_or_path).expanduser()
    if local.exists():
        check_model_folder(local)
        return
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        raise ConfigError(f"pretrained_model_name_or_path {name_or_path!r} is neither an existing folder nor a hub id "
                          f"like 'CompVis/stable-diffusion-v1-4'; check the spelling")
    from huggingface_hub import hf_hub_download
    try:
        hf_hub_download(name_or_path, "model_index.json")
    except Exception as error:  # offline, typo, gated: the hub client has many error types, all fatal here
        raise ConfigError(f"cannot fetch base model {name_or_path!r} ({type(error).__name__}: {str(error)[:200]}). "
                          f"Check the id, log in with `hf auth login` if it is gated, or download it once "
                          f"(`hf download {name_or_path}`) and pass the local folder") from None


MODEL_PARTS = {  # sub-folder: (config file, weight file patterns)
    "unet": ("config.json", ("*.safetensors", "*.bin")),
    "vae": ("config.json", ("*.safetensors", "*.bin")),
    "text_encoder": ("config.json", ("*.safetensors", "*.bin")),
    "tokenizer": ("tokenizer_config.json", ("tokenizer.json", "vocab.json")),
    "scheduler": ("scheduler_config.json", ()),
}


def check_model_folder(folder: Path) -> None:
    """Every part of a diffusers SD folder present, its config readable and its weights complete."""
    problems = []
    for part, (config_name, weight_patterns) in MODEL_PARTS.items():
        if not (folder / part).is_dir():
            problems.append(f"{part}/ is missing")
            continue
        try:
            json.loads((folder / part / config_name).read_text(encoding="utf-8"))
        except FileNotFoundError:
            problems.append(f"{part}/{config_name} is missing")
        except (ValueError, UnicodeDecodeError):
            problems.append(f"{part}/{config_name} is not valid JSON")
        weights = [p for pattern in weight_patterns for p in (folder / part).glob(pattern)]
        if weight_patterns and not weights:
            problems.append(f"{part}/ has no weights ({' or '.join(weight_patterns)})")
        for path in weights:
            if path.suffix == ".safetensors":
                try:
                    with safe_open(str(path), framework="pt"):  # checks the header against the file size
                        pass
                except (SafetensorError, OSError) as error:
                    problems.append(f"{part}/{path.name} is incomplete or corrupt ({error})")
                    continue
                if part in MODEL_CLASSES and not problems:
                    problems += config_mismatches(folder / part, part, path)
    if problems:
        raise ConfigError(f"{folder} is not a complete diffusers Stable Diffusion folder: {'; '.join(problems)}. "
                          f"{model_fix(folder)}")


MODEL_CLASSES = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel"}


def config_mismatches(part_dir: Path, part: str, weights: Path) -> list[str]:
    """Tensors whose shape in the weight file is not the one the part's config builds (an edited or wrong config).

    The model is built on the meta device, so no weights are allocated."""
    try:
        with torch.device("meta"):
            if part == "text_encoder":
                model = transformers.CLIPTextModel(transformers.CLIPTextConfig.from_pretrained(part_dir))
            else:
                model = getattr(diffusers, MODEL_CLASSES[part]).from_config(
                    json.loads((part_dir / "config.json").read_text(encoding="utf-8")))
    except Exception as error:  # noqa: BLE001 (any config the class cannot build from is the user's to fix)
        return [f"{part}/config.json does not build a {MODEL_CLASSES[part]} ({type(error).__name__}: {error})"]
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    with safe_open(str(weights), framework="pt") as f:
        wrong = [name for name in f.keys() if name in expected and tuple(f.get_slice(name).get_shape()) != expected[name]]
    if not wrong:
        return []
    return [f"{part}/config.json does not match {part}/{weights.name}: {len(wrong)} tensor(s) of another shape, "
            f"e.g. {wrong[0]}"]


def model_fix(folder: Path) -> str:
    """How to get a good copy of a model folder: the shipped tiny model is restored or rebuilt, others fetched."""
    if (folder / "training.json").is_file():  # the record pretrain_tiny.py writes beside the model it built
        return (f"Restore the shipped copy with `git checkout -- {folder}`, or rebuild it with "
                f"`python pretrain_tiny.py --output_dir {folder}` (about 52 minutes on a CPU)")
    return ("Point pretrained_model_name_or_path at the folder holding model_index.json, or download "
            "the model again")
