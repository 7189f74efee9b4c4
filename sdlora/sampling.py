"""Sample images during training, from a prompts file with per-line settings, without ever stopping the run.

Prompts file: one prompt per line; `#` starts a comment line. Options after the prompt, kohya style:
    a photo of sks dog on a beach --n blurry, lowres --d 7 --s 30 --l 6.5 --w 512 --h 768 --m 0.8
    --n negative prompt   --d seed   --s sampler steps   --l guidance scale   --w / --h size (multiples of 8)
    --m LoRA multiplier (the strength; 0 shows the base model)
"""

import logging
import re
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image

from sdlora.settings import ConfigError

log = logging.getLogger(__name__)

OPTION = re.compile(r"\s--([a-z]+)\s+")


class PromptFileError(ConfigError):
    """A prompts file (or a line of it) that cannot be used; the message names the file, the line and the fix."""


@dataclass(frozen=True)
class SamplePrompt:
    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 25
    guidance_scale: float = 7.5
    width: int = 512
    height: int = 512
    multiplier: float = 1.0  # the LoRA's strength


FIELDS = {"n": ("negative_prompt", str), "d": ("seed", int), "s": ("steps", int), "l": ("guidance_scale", float),
          "w": ("width", int), "h": ("height", int), "m": ("multiplier", float)}


def parse_prompt_line(line: str, defaults: SamplePrompt, where: str) -> SamplePrompt:
    """One line -> SamplePrompt; `where` ("prompts.txt line 3") names the line in errors."""
    parts = OPTION.split(" " + line.strip())
    prompt, pairs = parts[0].strip(), list(zip(parts[1::2], parts[2::2]))
    if not prompt:
        raise PromptFileError(f"{where}: the line has options but no prompt before them")
    values = {}
    for flag, value in pairs:
        if flag not in FIELDS:
            raise PromptFileError(f"{where}: unknown option --{flag}; use --n, --d, --s, --l, --w, --h or --m")
        name, kind = FIELDS[flag]
        try:
            values[name] = kind(value.strip())
        except ValueError:
            raise PromptFileError(f"{where}: --{flag} needs a {kind.__name__}, got {value.strip()!r}") from None
    sample = replace(defaults, prompt=prompt, **values)
    if sample.width % 8 or sample.height % 8 or min(sample.width, sample.height) < 8:
        raise PromptFileError(f"{where}: --w/--h must be positive multiples of 8, got {sample.width}x{sample.height}")
    if sample.steps < 1:
        raise PromptFileError(f"{where}: --s must be at least 1")
    return sample


def prompt_lines(path: str | Path, option: str) -> list[tuple[int, str]]:
    """(line number, text) of every prompt line of a UTF-8 file: blank lines and `#` comments left out.
    `option` (the setting that named the file) starts every error message."""
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise PromptFileError(f"{option} {path} does not exist") from None
    except UnicodeDecodeError:
        raise PromptFileError(f"{option} {path} is not UTF-8 text; re-save it as UTF-8") from None
    numbered = [(number, line.strip()) for number, line in enumerate(lines, start=1)
                if line.strip() and not line.lstrip().startswith("#")]
    if not numbered:
        raise PromptFileError(f"{option} {path} has no prompts (one per line; # starts a comment)")
    return numbered


def prompt_texts(path: str | Path, option: str) -> list[str]:
    """The prompt lines of a file as written (generate.py's and evaluate.py's --prompts_file)."""
    return [line for _, line in prompt_lines(path, option)]


def read_prompts_file(path: Path, defaults: SamplePrompt) -> list[SamplePrompt]:
    """Every prompt of the file (seed defaults to the base seed + line index), checked before training starts."""
    prompts = []
    for number, line in prompt_lines(path, "sample_prompts_file"):
        seeded = replace(defaults, seed=defaults.seed + len(prompts))
        prompts.append(parse_prompt_line(line, seeded, f"{Path(path).name} line {number}"))
    return prompts


def make_grid(images: list[Image.Image], columns: int = 4) -> Image.Image:
    """Images in rows of at most `columns`, each cell the size of the largest image."""
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    width, height = max(i.size[0] for i in images), max(i.size[1] for i in images)
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for index, image in enumerate(images):
        grid.paste(image, ((index % columns) * width, (index // columns) * height))
    return grid


def sample_images(pipeline, network, prompts: list[SamplePrompt], folder: Path, step: int, autocast) -> list[Path]:
    """Draw every prompt (its own LoRA multiplier, seed, size) and save step<step>-<i>.png plus a grid.

    Sampling must never end a run: any failure is logged with its traceback and the run goes on. The LoRA
    multiplier is put back to 1 and the UNet back in training mode whatever happens.
    """
    folder.mkdir(parents=True, exist_ok=True)
    unet = pipeline.unet
    was_training = unet.training
    paths, images = [], []
    try:
        unet.eval()
        with torch.no_grad(), autocast():
            for index, sample in enumerate(prompts):
                network.set_multiplier(sample.multiplier)
                image = pipeline(sample.prompt, negative_prompt=sample.negative_prompt or None,
                                 num_inference_steps=sample.steps, guidance_scale=sample.guidance_scale,
                                 width=sample.width, height=sample.height,
                                 generator=torch.Generator("cpu").manual_seed(sample.seed)).images[0]
                paths.append(folder / f"step{step:06d}-{index:02d}.png")
                image.save(paths[-1])
                images.append(image)
        make_grid(images).save(folder / f"step{step:06d}-grid.png")
    except Exception:  # noqa: BLE001 (a sampling failure of any kind is reported, never fatal)
        log.error(f"sampling at step {step} failed; training goes on:\n{traceback.format_exc()}")
    finally:
        network.set_multiplier(1.0)
        unet.train(was_training)
    return paths
