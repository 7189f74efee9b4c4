"""Sample images from Stable Diffusion 1.x with one or more LoRA files fused into the weights.

Edit the constants below and run `python generate.py`, or override any with a same-named flag:
    python generate.py --lora output/pytorch_lora_weights.safetensors:0.8 --prompt "a photo of sks dog"
Images are PNGs named <run time>-<index>.png (never from the prompt text) with the generation settings in a
PNG text chunk, plus one grid per run.
"""

# --- model ---
pretrained_model_name_or_path = "CompVis/stable-diffusion-v1-4"  # hub id or local diffusers folder
lora = ("output/pytorch_lora_weights.safetensors",)  # PATH or PATH:MULTIPLIER, several allowed; empty: base model
# --- what to draw ---
prompt = "a photo of an astronaut"  # what to draw
prompts_file = ""  # a text file with one prompt per line; replaces `prompt` when set
negative_prompt = ""  # what to steer away from
num_images = 4  # per prompt; image i of the run uses seed + i
seed = 0  # seed of the first image; the same seed gives the same image on any device
# --- sampler ---
scheduler = "pndm"  # pndm (the SD 1.4 default), ddim, euler, euler_a, dpm++
num_inference_steps = 25  # sampler steps
guidance_scale = 7.5  # classifier-free guidance strength
height = 512  # px, a multiple of 8
width = 512  # px, a multiple of 8
mixed_precision = "auto"  # auto: bf16 on a GPU that has it, else fp16 on a GPU, no on a CPU; or no, fp16, bf16
output_dir = "samples"  # where the PNGs and the grid go

# Everything above is configuration: collected here, before any import adds names of its own.
DEFAULTS = {name: value for name, value in list(globals().items())
            if not name.startswith("_") and isinstance(value, (bool, int, float, str, tuple))}
CONFIG_NAMES = list(DEFAULTS)

import argparse  # noqa: E402  (imports after the config block: the constants are the first thing to read)
import sys  # noqa: E402
from datetime import datetime  # noqa: E402
from pathlib import Path  # noqa: E402

import diffusers  # noqa: E402
import torch  # noqa: E402
from PIL.PngImagePlugin import PngInfo  # noqa: E402

from sdlora.lora_file import (  # noqa: E402
    LoRAError, bundled_embeddings, fuse_lora_file, parse_path_number, read_lora_file,
)
from sdlora.sampling import make_grid, prompt_texts  # noqa: E402
from sdlora.settings import (  # noqa: E402
    MIXED_PRECISIONS, PRECISION_DTYPES, ConfigError, allow_tf32, build_parser, check_model_source, resolve_precision,
)

SCHEDULERS = {"pndm": "PNDMScheduler", "ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
              "euler_a": "EulerAncestralDiscreteScheduler", "dpm++": "DPMSolverMultistepScheduler"}


def parse_config(argv: list[str] | None = None) -> argparse.Namespace:
    cfg = build_parser(DEFAULTS, __doc__.splitlines()[0]).parse_args(argv)
    cfg.lora = tuple(cfg.lora)
    return cfg


def parse_lora_spec(spec: str) -> tuple[Path, float]:
    """`PATH` or `PATH:MULTIPLIER` (see lora_file.parse_path_number); the multiplier defaults to 1, as trained."""
    return parse_path_number(spec, default=1.0)


def read_prompts(cfg) -> list[str]:
    if not cfg.prompts_file:
        if not cfg.prompt.strip():
            raise ConfigError("--prompt is empty; give a prompt or a --prompts_file")
        return [cfg.prompt]
    return prompt_texts(cfg.prompts_file, "--prompts_file")


def check_config(cfg) -> list[tuple[Path, float]]:
    """Refuse settings that cannot work; returns the parsed LoRA list."""

    if cfg.scheduler not in SCHEDULERS:
        raise ConfigError(f"--scheduler {cfg.scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
    if cfg.mixed_precision not in MIXED_PRECISIONS:
        raise ConfigError(f"--mixed_precision {cfg.mixed_precision!r}: choose one of {', '.join(MIXED_PRECISIONS)}")
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("--mixed_precision fp16 needs a CUDA GPU; use no or bf16 on this machine")
    for name in ("height", "width"):
        value = getattr(cfg, name)
        if value < 8 or value % 8:
            raise ConfigError(f"--{name} {value}: must be a positive multiple of 8, e.g. 512")
    if cfg.num_images < 1 or cfg.num_inference_steps < 1:
        raise ConfigError("--num_images and --num_inference_steps must be at least 1")
    loras = [parse_lora_spec(spec) for spec in cfg.lora]
    for path, _ in loras:
        if not path.is_file():
            hint = "; train one first (python train_lora.py) or pass --lora with no value for the base model"
            raise ConfigError(f"--lora {path}: file not found{hint}")
        read_lora_file(path)  # a bad file is refused now, not after the model has loaded
    return loras


def parameters_text(cfg, prompt: str, seed: int, loras: list[tuple[Path, float]]) -> str:
    """The settings of one image, in the `parameters` layout AUTOMATIC1111 writes and reads."""
    lines = [prompt]
    if cfg.negative_prompt:
        lines.append(f"Negative prompt: {cfg.negative_prompt}")
    settings = [f"Steps: {cfg.num_inference_steps}", f"Sampler: {cfg.scheduler}", f"CFG scale: {cfg.guidance_scale}",
                f"Seed: {seed}", f"Size: {cfg.width}x{cfg.height}", f"Model: {cfg.pretrained_model_name_or_path}"]
    settings += [f"Lora: {path.name}:{multiplier}" for path, multiplier in loras]
    return "\n".join(lines + [", ".join(settings)])


def load_pipeline(cfg, loras: list[tuple[Path, float]]):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    allow_tf32()
    dtype = PRECISION_DTYPES[resolve_precision(cfg.mixed_precision)]
    pipeline = diffusers.StableDiffusionPipeline.from_pretrained(
        cfg.pretrained_model_name_or_path, dtype=dtype, safety_checker=None, requires_safety_checker=False)
    scheduler_class = getattr(diffusers, SCHEDULERS[cfg.scheduler])
    pipeline.scheduler = scheduler_class.from_config(pipeline.scheduler.config)
    # Fused: W += multiplier * the file's delta ((alpha / rank) * up @ down for LoRA; DoRA, LoHa and LoKr as A1111
    # and ComfyUI merge them), so sampling costs exactly what the base model costs.
    for path, multiplier in loras:
        changed = fuse_lora_file(path, pipeline.unet, pipeline.text_encoder, multiplier)
        print(f"LoRA {path} fused at multiplier {multiplier} into {changed} modules")
        load_bundled_embeddings(pipeline, path)
    pipeline.set_progress_bar_config(leave=False)
    return pipeline.to(device)


def load_bundled_embeddings(pipeline, path: Path) -> None:
    """A token trained beside the LoRA (pivotal tuning; `bundle_emb.<token>.string_to_param.*` in the file) is
    given to the pipeline as a textual-inversion embedding, at full strength whatever the LoRA's multiplier (as
    AUTOMATIC1111 does): prompts then name the token."""
    for token, vectors in bundled_embeddings(read_lora_file(path)[0]).items():
        try:
            pipeline.load_textual_inversion({token: vectors}, token=token)
        except ValueError as error:  # diffusers refuses a token its tokenizer already has
            raise LoRAError(f"{path}: its embedding for {token!r} cannot be added ({error}); load one LoRA with "
                            f"that token at a time") from None
        print(f"embedding {token!r} ({vectors.shape[0]} vector(s)) from {path}")


def main(cfg: argparse.Namespace) -> list[Path]:
    """Generate and return the paths of the images written (the grid last)."""
    loras = check_config(cfg)
    prompts = read_prompts(cfg)
    check_model_source(cfg.pretrained_model_name_or_path)


    pipeline = load_pipeline(cfg, loras)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    run = datetime.now().strftime("%Y%m%d-%H%M%S")
    images, paths = [], []
    for prompt_index, prompt in enumerate(prompts):
        for image_index in range(cfg.num_images):
            index = prompt_index * cfg.num_images + image_index
            image_seed = cfg.seed + index
            # A CPU generator gives the same image for a seed on any device (diffusers' reproducibility advice).
            generator = torch.Generator("cpu").manual_seed(image_seed)
            image = pipeline(prompt, negative_prompt=cfg.negative_prompt or None, generator=generator,
                             num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                             height=cfg.height, width=cfg.width).images[0]
            info = PngInfo()
            info.add_text("parameters", parameters_text(cfg, prompt, image_seed, loras))
            paths.append(output_dir / f"{run}-{index:03d}.png")
            image.save(paths[-1], pnginfo=info)
            images.append(image)
            print(f"{paths[-1]}  (seed {image_seed}) {prompt[:60]}")
    paths.append(output_dir / f"{run}-grid.png")
    make_grid(images).save(paths[-1])
    print(f"{len(images)} image(s) and a grid in {output_dir}")
    return paths


if __name__ == "__main__":
    try:
        main(parse_config())
    except (ConfigError, LoRAError) as error:
        sys.exit(f"error: {error}")
