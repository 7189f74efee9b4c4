"""Encode once what never changes during LoRA training: VAE latents of the images, text embeddings of the captions.

The VAE and the text encoder are frozen, so encoding every image and caption at every step (as naive trainers do)
repeats the same work. Each image is encoded once per variant it can appear in (mirrored or not); its latent
*distribution* (mean, std) is kept, and a latent is sampled from it at each step with that step's generator, so
training with the cache is exactly training without it. Random crops make the variants unbounded: then images are
encoded on the fly, and the caller says so.
"""

import hashlib
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch.utils.data import Dataset

from dataset import CustomDataset
from sdlora.files import atomic_write
from sdlora.losses import latent_mask

CACHE_VERSION = "1"


@torch.no_grad()
def latent_distribution(vae, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE posterior for images in [-1, 1], shapes B x 4 x H/8 x W/8."""
    posterior = vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist
    return posterior.mean, posterior.std


def latent_key(dataset: CustomDataset, index: int, flip: bool, model_key: str) -> str:
    """Disk-cache name: changes whenever the image bytes, training size, mirroring or VAE (path, dtype) change."""
    parts = [CACHE_VERSION, dataset.examples[index].sha256, str(dataset.sizes[index]), str(flip), model_key]
    return hashlib.sha256("|".join(parts).encode("utf-8")).hexdigest()


def encode_latent_cache(dataset: CustomDataset, vae, disk_dir: Path | None, model_key: str, progress=None,
                        shard: tuple[int, int] = (0, 1)) -> dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor]]:
    """{(example index, flip): (mean, std)} for every image and every mirroring it can be drawn with (on CPU).

    With `disk_dir`, each entry is also read from / written to `disk_dir/<key>.safetensors`; an entry whose image
    or settings changed has another key, so it is never served stale. `shard` = (process index, process count)
    encodes only every count-th entry from the index on, for processes that split the work and gather the parts.
    """
    flips = (False, True) if dataset.random_flip else (False,)
    variants = [(index, flip) for index in range(len(dataset.examples)) for flip in flips]
    process_index, process_count = shard
    cache = {}
    for index, flip in variants[process_index::process_count]:
        path = disk_dir / f"{latent_key(dataset, index, flip, model_key)}.safetensors" if disk_dir else None
        entry = read_entry(path) if path else None
        if entry is None:
            mean, std = latent_distribution(vae, dataset.pixels(index, flip)[None])
            entry = (mean[0].cpu(), std[0].cpu())
            if path:
                atomic_write(path, safetensors_bytes({"mean": entry[0].contiguous(), "std": entry[1].contiguous()}))
        cache[(index, flip)] = entry
        if progress is not None:
            progress.update(1)
    return cache


def read_entry(path: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path))
        return tensors["mean"], tensors["std"]
    except (SafetensorError, OSError, KeyError):
        return None  # a damaged entry is simply encoded again


@torch.no_grad()
def encode_text_cache(captions: list[str], tokenizer, text_encoder,
                      shard: tuple[int, int] = (0, 1)) -> dict[str, torch.Tensor]:
    """{caption: last hidden state (77 x D), on CPU} for every distinct caption (with `shard` = (process index,
    process count), every count-th from the index on)."""
    process_index, process_count = shard
    cache = {}
    for caption in sorted(set(captions))[process_index::process_count]:
        input_ids = tokenizer([caption], padding="max_length", truncation=True,
                              max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
        cache[caption] = text_encoder(input_ids.to(text_encoder.device))[0][0].cpu()
    return cache


def latent_mask_cache(dataset: CustomDataset, latents: dict) -> dict[tuple[int, bool], torch.Tensor]:
    """{(example index, flip): its loss mask on the latent grid (1 x h x w)} for every cached latent: the mask
    cropped and mirrored as the cached picture was (centre crops: the cache is off with random ones), shrunk as
    the loss step shrinks it (losses.latent_mask). Read from the mask files, never from the disk cache."""
    return {(index, flip): latent_mask(dataset.mask(index, flip)[None], mean.shape[-2:])[0]
            for (index, flip), (mean, _) in latents.items()}


class EncodedDataset(Dataset):
    """A CustomDataset whose items carry cached latent distributions (and loss masks) and/or text embeddings
    instead of pixels and captions to encode. Mirroring follows the wrapped dataset's (seed, epoch, index) draw."""

    def __init__(self, dataset: CustomDataset, latents: dict | None, embeddings: dict | None,
                 masks: dict | None = None):
        self.dataset, self.latents, self.embeddings, self.masks = dataset, latents, embeddings, masks

    def __len__(self) -> int:
        return len(self.dataset)

    def begin_epoch(self, epoch: int) -> None:
        self.dataset.begin_epoch(epoch)

    def __getitem__(self, index: int) -> dict:
        caption = self.dataset.caption(index)
        item = {"caption": caption, "index": index}
        if self.latents is not None:
            _, flip = self.dataset.augmentation(index)
            item["latent_mean"], item["latent_std"] = self.latents[(self.dataset.order[index], flip)]
            if self.masks is not None:
                item["mask"] = self.masks[(self.dataset.order[index], flip)]
        else:
            item |= {key: value for key, value in self.dataset[index].items() if key in ("pixel_values", "mask")}
        if self.embeddings is not None and caption in self.embeddings:  # one holding a trained token is not cached
            item["text_embedding"] = self.embeddings[caption]
        return item
