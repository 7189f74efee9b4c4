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
from sdlora.kohya_dataset import has_class_subsets
from sdlora.settings import ConfigError

GENERATION_BATCH = 4  # images per pipeline call


def check_prior_preservation(cfg, defaults: dict) -> None:
    """Class images: a prompt for them, a folder apart from the instance images, or no class settings at all."""
    class_names = ("class_prompt", "num_class_images") + (() if has_class_subsets(cfg.dataset_config)
                                                           else ("prior_loss_weight",))  # is_reg subsets use it
    class_settings = [f"--{name} {getattr(cfg, name)}" for name in class_names if getattr(cfg, name) != defaults[name]]
    if not cfg.class_data_path:
        if class_settings:
            raise ConfigError(f"{', '.join(class_settings)} set but class_data_path is empty: point "
                              f"--class_data_path at a folder of class images (or an empty one to fill) to train "
                              f"with prior preservation, or drop those settings")
        return
    folder, instances = Path(cfg.class_data_path).resolve(), Path(cfg.dataset_path).resolve()
    if folder == instances or instances in folder.parents or folder in instances.parents:
        raise ConfigError(f"--class_data_path {cfg.class_data_path} and --dataset_path {cfg.dataset_path} overlap: "
                          f"class images are the base model's idea of the class and must not be the subject's "
                          f"images; use a folder outside the other")
    if not cfg.class_prompt.strip():
        raise ConfigError("--class_data_path needs --class_prompt, the class's plain prompt without the trigger "
                          "word (e.g. \"a photo of a dog\")")
    if cfg.prior_loss_weight <= 0:
        raise ConfigError(f"--prior_loss_weight {cfg.prior_loss_weight}: must be positive (1.0 in DreamBooth); "
                          f"to train without class images, set class_data_path to \"\"")
    if cfg.num_class_images < 0:
        raise ConfigError(f"--num_class_images {cfg.num_class_images}: cannot be negative (0: never generate)")
    if not folder.is_dir() and cfg.num_class_images == 0:
        raise ConfigError(f"--class_data_path {cfg.class_data_path} does not exist and num_class_images is 0: "
                          f"put class images there, or set --num_class_images (e.g. 100) to have the base model "
                          f"draw them")


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
