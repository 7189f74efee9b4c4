"""The class images of prior preservation: a folder topped up, once, with images the base model draws.

DreamBooth's prior preservation (Ruiz et al. 2023) trains the instance images beside images of their class
("a photo of a dog") as the base model draws them, so the class word keeps its meaning. When the folder holds
fewer than `num_class_images`, the missing ones are generated at the start of a run and written there (image and
caption), so the next run, or a resume, finds them and generates nothing.
"""

import io
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from tqdm.auto import tqdm

from sdlora.files import atomic_write, image_files

GENERATION_BATCH = 4  # images per pipeline call


def free_names(folder: Path, count: int) -> list[Path]:
    """`count` names class-00000.png, class-00001.png, ... that no file in `folder` has yet."""
    names, index = [], 0
    while len(names) < count:
        path = folder / f"class-{index:05d}.png"
        if not path.exists():
            names.append(path)
        index += 1
    return names


@torch.no_grad()
def generate_missing(folder: Path, wanted: int, prompt: str, model: str, resolution: int, seed: int, steps: int,
                     guidance_scale: float, device: torch.device, dtype: torch.dtype) -> int:
    """Top `folder` up to `wanted` images of `prompt` drawn by `model` (its own scheduler, `steps` steps), each
    written with its caption beside it. Returns how many were generated (0 when the folder holds enough)."""
    missing = wanted - len(image_files(folder))
    if missing <= 0:
        return 0
    folder.mkdir(parents=True, exist_ok=True)
    print(f"class images: {folder} holds {wanted - missing} of {wanted}; generating {missing} of {prompt!r} "
          f"with the base model (once: they are kept there for later runs)", flush=True)
    pipeline = StableDiffusionPipeline.from_pretrained(model, dtype=dtype, safety_checker=None,
                                                       requires_safety_checker=False).to(device)
    pipeline.set_progress_bar_config(disable=True)
    paths = free_names(folder, missing)
    with tqdm(total=missing, desc="generating class images") as progress:
        for start in range(0, missing, GENERATION_BATCH):
            batch = paths[start:start + GENERATION_BATCH]
            # One generator per image, seeded by its name's number: an interrupted top-up redraws the same images.
            generators = [torch.Generator().manual_seed(seed * 100_003 + int(p.stem.split("-")[1])) for p in batch]
            images = pipeline([prompt] * len(batch), num_inference_steps=steps, height=resolution,
                              width=resolution, guidance_scale=guidance_scale, generator=generators).images
            for path, image in zip(batch, images):
                path.with_suffix(".txt").write_text(prompt, encoding="utf-8")
                encoded = io.BytesIO()
                image.save(encoded, format="PNG")
                atomic_write(path, encoded.getvalue())  # the image last: a kill leaves no image without caption
                progress.update(1)
    return missing
