"""A folder of images and captions, checked once at start, served as training tensors.

Captions come from `metadata.jsonl` / `metadata.csv` (the Hugging Face imagefolder convention: `file_name` and
`text` columns), else from a same-stem text file (`photo.jpg` + `photo.txt`), else the fallback caption.
Every image is fully decoded at start: a file that cannot be used is skipped with one warning naming it and a
reason, and listed in `skipped`; a folder with nothing usable is an error that lists what it holds.
"""

import copy
import csv
import hashlib
import json
import logging
import math
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from sdlora.files import IMAGE_EXTENSIONS, atomic_write, data_files, image_files, is_ignored, sha256_file
from sdlora.masks import read_mask, scan_masks

CAPTION_EXTENSIONS = {".txt", ".caption", ".tags"}
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
BACKGROUND = (255, 255, 255)  # transparent pixels are composited onto white
MIN_SIDE_FRACTION = 4  # images whose short side is under resolution / 4 would be upscaled past usefulness
BUCKET_STEP = 64  # bucket sides are multiples of 64 px (8 latent pixels)
MAX_ASPECT = 4.0
REPEATS_FOLDER = re.compile(r"^(\d+)_(.+)$")


log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """The dataset cannot be used at all; the message says what was found and what to do."""


@dataclass(frozen=True)
class Subset:
    """One image folder of a kohya dataset config with its own rules (sdlora/kohya_dataset.py reads them)."""

    image_dir: Path
    num_repeats: int = 1
    caption_extension: str = ".txt"
    class_tokens: str = ""  # the caption of a picture without a caption file
    is_reg: bool = False  # class images (prior preservation)
    keep_tokens: int = 1  # tags kept in place when shuffling
    shuffle_caption: bool = False
    resolution: int = 512
    enable_bucket: bool = False


@dataclass
class Example:
    path: Path
    caption: str
    sha256: str  # of the file's bytes, for the dataset fingerprint
    size: tuple[int, int] = (0, 0)  # (width, height) as displayed, after EXIF rotation
    repeats: int = 1  # times per epoch, from a kohya-style `<N>_<name>` folder
    prior: bool = False  # a class (regularisation) image for prior preservation, from class_data_path
    mask: Path | None = None  # with masked_loss: the file holding its loss mask (a mask image, or itself for alpha)
    mask_sha256: str = ""  # of a mask image's bytes, for the dataset fingerprint
    subset: Subset | None = None  # from a dataset config: its folder's resolution, buckets and caption rules


@dataclass
class ScanResult:
    examples: list[Example] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"file": relative path, "reason": ...}
    notes: Counter = field(default_factory=Counter)  # kinds of odd-but-usable inputs -> count


def load_image(path: Path) -> tuple[Image.Image, list[str]]:
    """Fully decode an image to 8-bit RGB, the right way for each mode. Returns (image, notes).

    EXIF orientation is applied; transparency is composited onto white; 16/32-bit integer images are scaled
    (not clipped) to 8 bits. Raises ValueError with a readable reason when the file cannot be used.
    """
    notes = []
    try:
        with Image.open(path) as opened:
            opened.load()  # a truncated file opens fine and fails only here, on full decode
            if opened.getexif().get(0x0112, 1) != 1:
                notes.append("EXIF rotation applied")
            image = ImageOps.exif_transpose(opened)
    except UnidentifiedImageError:
        raise ValueError("not an image (content not recognised)") from None
    except Image.DecompressionBombError as error:
        raise ValueError(f"too many pixels to decode safely ({error})") from None
    except OSError as error:
        text = str(error)
        reason = "truncated or corrupt" if "truncated" in text or "broken" in text else f"cannot be decoded: {text}"
        raise ValueError(reason) from None
    return to_rgb8(image, notes), notes


def to_rgb8(image: Image.Image, notes: list[str]) -> Image.Image:
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit PNG/TIFF greyscale: PIL's convert("L") clips everything above 255 to white; scale instead.
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 or image.mode.startswith("I;16") else 255.0
        if image.mode == "F":
            peak = 1.0 if array.max() <= 1.0 else peak
        notes.append(f"high bit depth ({image.mode}) scaled to 8 bits")
        array = np.clip(np.round(array / peak * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        notes.append("transparency composited onto white")
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode != "RGB":
        notes.append(f"{image.mode} converted to RGB")
    return image.convert("RGB")


def read_caption_file(path: Path) -> str:
    """UTF-8 text (a BOM is allowed), whitespace collapsed. Raises ValueError naming the bad byte."""
    try:
        return " ".join(path.read_bytes().decode("utf-8-sig").split())
    except UnicodeDecodeError as error:
        raise ValueError(f"caption {path.name} is not UTF-8 (byte {error.object[error.start]:#04x} at offset "
                         f"{error.start}); re-save it as UTF-8") from None


def read_metadata(root: Path) -> dict[Path, str] | None:
    """Captions from metadata.jsonl / metadata.csv (`file_name`, `text`), keyed by resolved image path."""
    for name in METADATA_FILES:
        path = root / name
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:
            raise DatasetError(f"{path} is not UTF-8 text; re-save it as UTF-8") from None
        if name.endswith(".jsonl"):
            rows = []
            for number, line in enumerate(text.splitlines(), start=1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as error:
                        raise DatasetError(f"{path} line {number} is not valid JSON ({error.msg})") from None
        else:
            rows = list(csv.DictReader(text.splitlines()))
        captions = {}
        for number, row in enumerate(rows, start=1):
            if not isinstance(row, dict) or "file_name" not in row or "text" not in row:
                raise DatasetError(f"{path} row {number} needs the fields 'file_name' and 'text', got {row!r:.120}")
            captions[(root / row["file_name"]).resolve()] = " ".join(str(row["text"]).split())
        return captions
    return None


def check_image(path: Path, cache: dict) -> dict:
    """Decode `path` fully once and describe it: {size, mtime_ns, sha256, width, height, notes, error}.

    `cache` holds earlier descriptions by path; one whose size and modification time still match is reused,
    so a rerun on an unchanged folder starts without decoding everything again.
    """
    stat = path.stat()
    cached = cache.get(str(path))
    if cached and cached["size"] == stat.st_size and cached["mtime_ns"] == stat.st_mtime_ns:
        return cached
    record = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256_file(path),
              "width": 0, "height": 0, "notes": [], "error": None}
    try:
        image, record["notes"] = load_image(path)
        record["width"], record["height"] = image.size
    except ValueError as error:
        record["error"] = str(error)
    cache[str(path)] = record
    return record


def too_small_message(width: int, height: int, resolution: int) -> str:
    """Why an image under a quarter of the resolution is skipped, and the two ways to keep it."""
    min_side = max(1, resolution // MIN_SIDE_FRACTION)
    usable = (min(width, height) * MIN_SIDE_FRACTION) // 8 * 8  # the largest resolution this image passes at
    lower = f"--resolution {usable} or lower" if usable >= 8 else "a lower --resolution"
    return (f"too small ({width}x{height}; at least {min_side} px on the short side for --resolution {resolution}): "
            f"train at {lower}, or upscale the file itself (to {resolution} px on the short side for the best "
            f"result)")


def scan_folder(root: Path, caption_extension: str, fallback_caption: str, resolution: int,
                cache: dict | None = None, option: str = "dataset_path") -> ScanResult:
    """Find, fully decode and caption every image under `root` (sub-folders included); `option` names the
    setting that points at it, for the messages."""
    if not root.is_dir():
        kind = "dataset" if option == "dataset_path" else "class"
        raise DatasetError(f"{kind} folder {root} does not exist; set {option} to a folder of images")
    files = data_files(root)
    images = image_files(root)
    if not images:
        found = Counter(p.suffix.lower() or "(no extension)" for p in files)
        listing = ", ".join(f"{n} {ext}" for ext, n in found.most_common()) or "nothing"
        raise DatasetError(f"no images in {root} (found: {listing}); expected files ending in "
                           f"{', '.join(sorted(IMAGE_EXTENSIONS))}")
    metadata = read_metadata(root)
    if metadata is None:
        check_caption_extension(files, images, caption_extension, root)

    cache = {} if cache is None else cache
    result = ScanResult()
    min_side = max(1, resolution // MIN_SIDE_FRACTION)
    for path in images:
        relative = str(path.relative_to(root))
        record = check_image(path, cache)
        notes = list(record["notes"])
        try:
            if record["error"]:
                raise ValueError(record["error"])
            if min(record["width"], record["height"]) < min_side:
                raise ValueError(too_small_message(record["width"], record["height"], resolution))
            caption = caption_for(path, metadata, caption_extension)
        except ValueError as error:
            log.warning(f"skipping {relative}: {error}")
            result.skipped.append({"file": relative, "reason": str(error)})
            continue
        if not caption:
            caption = fallback_caption
            notes.append("no caption: fallback caption used")
        if max(record["width"], record["height"]) > 4 * min(record["width"], record["height"]):
            notes.append("extreme aspect ratio (over 4:1): the crop keeps a small part")
        result.notes.update(notes)
        result.examples.append(Example(path, caption, record["sha256"], (record["width"], record["height"]),
                                       folder_repeats(path.relative_to(root))))
    if not result.examples:
        reasons = "; ".join(f"{s['file']}: {s['reason']}" for s in result.skipped[:5])
        raise DatasetError(f"none of the {len(images)} images in {root} can be used ({reasons})")
    return result


def scan_subsets(subsets: list[Subset], cache: dict) -> ScanResult:
    """scan_folder of every subset's folder with its caption rules and resolution; its examples take the subset's
    repeats and class-image flag (a folder's `<N>_name` is not read then, as in kohya's config format)."""
    result = ScanResult()
    for number, subset in enumerate(subsets, start=1):
        scan = scan_folder(subset.image_dir, subset.caption_extension, subset.class_tokens, subset.resolution, cache,
                           f"dataset_config subset {number} image_dir")
        result.examples += [replace(e, repeats=subset.num_repeats, prior=subset.is_reg, subset=subset)
                            for e in scan.examples]
        result.skipped += [dict(s, file=str(subset.image_dir / s["file"])) for s in scan.skipped]
        result.notes.update(scan.notes)
    return result


def subset_rules(example: Example) -> tuple:
    """What a dataset config's subset changes in how its pictures train (for the fingerprint); () without one."""
    s = example.subset
    return () if s is None else (s.num_repeats, s.caption_extension, s.class_tokens, s.is_reg, s.keep_tokens,
                                 s.shuffle_caption, s.resolution, s.enable_bucket)


def common_folder(folders: list[Path]) -> Path:
    """The deepest folder holding every one of `folders` (their file names are written relative to it)."""
    return Path(os.path.commonpath([str(Path(folder).resolve()) for folder in folders]))


def folder_repeats(relative: Path) -> int:
    """kohya's convention: images under a folder named `<N>_<name>` are seen N times per epoch."""
    repeats = 1
    for part in relative.parts[:-1]:
        match = REPEATS_FOLDER.match(part)
        if match:
            repeats = int(match.group(1))
    return max(repeats, 1)


def bucket_size(width: int, height: int, resolution: int, upscale: bool) -> tuple[int, int]:
    """The training size that keeps an image's aspect ratio: about resolution² pixels (never more than the image
    has, unless `upscale`), both sides multiples of 64, aspect ratio limited to 4:1."""
    ratio = min(max(width / height, 1 / MAX_ASPECT), MAX_ASPECT)
    area = resolution * resolution if upscale else min(resolution * resolution, width * height)
    bucket_w = max(BUCKET_STEP, int(math.sqrt(area * ratio)) // BUCKET_STEP * BUCKET_STEP)
    bucket_h = max(BUCKET_STEP, int(math.sqrt(area / ratio)) // BUCKET_STEP * BUCKET_STEP)
    return bucket_w, bucket_h


class Draw(NamedTuple):
    """One entry of a batch: the item, and its share of the step's loss (0 for padding)."""
    index: int
    weight: float


class BucketBatchSampler:
    """Global batches of items that share a training size, shuffled with permutations derived from (seed, epoch)
    alone, so a resumed run replays the same batches.

    Each bucket's items are shuffled and cut into global batches of `processes` x `batch_size`; the batches are
    shuffled. Every entry is a Draw whose weight is `processes` / (items in its batch), so the weighted sum over a
    process's share, averaged over processes as distributed training averages gradients, is the global batch's mean
    loss. On several processes a short global batch (a bucket's last) is padded to full size with weight-0 draws,
    and accelerate (split_batches) hands each process its `batch_size` slice: N processes with batch B take, step
    by step, the same samples and the same loss as one process with batch N x B.

    With prior preservation (`prior[i]` marks the class items), each instance batch is followed by a batch of class
    items, taken in turn from an endless shuffled stream of them; the pair is one step's two micro-batches, each
    weighted 2x (accelerate averages micro-batches), the class one also by `prior_loss_weight`, so the step's loss
    is the instance loss plus prior_loss_weight x the class loss (Ruiz et al. 2023).
    """

    def __init__(self, sizes: list[tuple[int, int]], batch_size: int, seed: int, processes: int = 1,
                 prior: list[bool] | None = None, prior_loss_weight: float = 1.0):
        self.sizes, self.seed, self.processes, self.epoch = sizes, seed, processes, 0
        self.batch_size = batch_size * processes  # accelerate splits each global batch into per-process slices
        self.prior_loss_weight = prior_loss_weight
        prior = prior or [False] * len(sizes)
        self.instances = [i for i in range(len(sizes)) if not prior[i]]
        self.classes = [i for i in range(len(sizes)) if prior[i]]  # empty: no prior preservation

    def begin_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self, items: list[int], generator: torch.Generator) -> list[list[int]]:
        """`items` shuffled within their buckets, cut into global batches, the batches shuffled."""
        batches = []
        for size in sorted({self.sizes[i] for i in items}):
            bucket = [i for i in items if self.sizes[i] == size]
            shuffled = [bucket[i] for i in torch.randperm(len(bucket), generator=generator).tolist()]
            batches += [shuffled[i:i + self.batch_size] for i in range(0, len(shuffled), self.batch_size)]
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

    def draws(self, batch: list[int], weight: float) -> list[Draw]:
        draws = [Draw(item, weight * self.processes / len(batch)) for item in batch]
        if self.processes > 1:
            draws += [Draw(batch[0], 0.0)] * (self.batch_size - len(draws))
        return draws

    def class_batches(self, start: int, count: int) -> list[list[int]]:
        """Batches start .. start + count of the class stream: pass k is the class items shuffled by (seed, k)."""
        passes: dict[int, list[list[int]]] = {}

        def class_pass(k: int) -> list[list[int]]:
            if k not in passes:
                passes[k] = self.batches(self.classes, torch.Generator().manual_seed(self.seed * 100_003 + 50_000 + k))
            return passes[k]
        per_pass = len(class_pass(0))
        return [class_pass(position // per_pass)[position % per_pass] for position in range(start, start + count)]

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        instance_batches = self.batches(self.instances, generator)
        if not self.classes:
            for batch in instance_batches:
                yield self.draws(batch, 1.0)
            return
        classes = self.class_batches(self.epoch * len(instance_batches), len(instance_batches))
        for batch, class_batch in zip(instance_batches, classes):
            yield self.draws(batch, 2.0)
            yield self.draws(class_batch, 2.0 * self.prior_loss_weight)

    def __len__(self) -> int:
        batches = sum(math.ceil(n / self.batch_size) for n in Counter(self.sizes[i] for i in self.instances).values())
        return 2 * batches if self.classes else batches


class WeightedItems(Dataset):
    """A dataset read through Draws: each item also carries its draw's loss weight."""

    def __init__(self, items: Dataset):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def begin_epoch(self, epoch: int) -> None:
        self.items.begin_epoch(epoch)

    def __getitem__(self, draw: Draw) -> dict:
        return dict(self.items[draw.index], loss_weight=draw.weight)


def check_caption_extension(files: list[Path], images: list[Path], caption_extension: str, root: Path) -> None:
    """Refuse a run whose captions would all be silently ignored because they use another extension."""
    stems = {p.with_suffix("") for p in images}
    configured = sum(1 for p in files if p.suffix == caption_extension and p.with_suffix("") in stems)
    others = Counter(p.suffix for p in files
                     if p.suffix.lower() in CAPTION_EXTENSIONS and p.suffix != caption_extension
                     and p.with_suffix("") in stems)
    if configured == 0 and others:
        found, count = others.most_common(1)[0]
        raise DatasetError(f"{root} has {count} caption file(s) ending in '{found}' but caption_extension is "
                           f"'{caption_extension}'; set caption_extension to '{found}'")


def caption_for(path: Path, metadata: dict[Path, str] | None, caption_extension: str) -> str:
    if metadata is not None:
        return metadata.get(path.resolve(), "")
    caption_path = path.with_suffix(caption_extension)
    return read_caption_file(caption_path) if caption_path.is_file() else ""


def read_check_cache(path: str | Path | None) -> dict:
    """Earlier image checks (see check_image); an unreadable cache is simply rebuilt."""
    if path is None or not Path(path).is_file():
        return {}
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return {}


def write_check_cache(path: str | Path, cache: dict) -> None:
    atomic_write(path, json.dumps(cache).encode("utf-8"))


def resize_and_crop(image: Image.Image, size: tuple[int, int], center_crop: bool, flip: bool,
                    rng: random.Random) -> Image.Image:
    """Resize so the image covers `size` (width, height), crop it (centre or random), optionally mirror."""
    width, height = image.size
    target_w, target_h = size
    scale = max(target_w / width, target_h / height)
    new_size = (max(target_w, round(width * scale)), max(target_h, round(height * scale)))
    image = image.resize(new_size, Image.BICUBIC, reducing_gap=3.0)
    if center_crop:
        left, top = (new_size[0] - target_w) // 2, (new_size[1] - target_h) // 2
    else:
        left, top = rng.randint(0, new_size[0] - target_w), rng.randint(0, new_size[1] - target_h)
    image = image.crop((left, top, left + target_w, top + target_h))
    return image.transpose(Image.FLIP_LEFT_RIGHT) if flip else image


def to_tensor(image: Image.Image) -> torch.Tensor:
    """8-bit RGB image -> float tensor 3 x H x W in [-1, 1]."""
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return array.permute(2, 0, 1).float().div(127.5).sub(1.0)


class CustomDataset(Dataset):
    """Images (and captions) under `dataset_path` as training items
    {"pixel_values": 3 x H x W in [-1, 1], "caption": str, "index": int}; H = W = resolution, or the image's
    aspect-ratio bucket with `buckets`.

    Item i is example `order[i]` (examples in `<N>_name` folders appear N times). Crops, flips, tag shuffles and
    caption dropout derive from (seed, epoch, item), so an epoch replays identically; call `begin_epoch(epoch)`
    at the start of each epoch. (Not named `set_epoch`: accelerate calls that with its own pass counter, which
    restarts at 0 on resume.)
    """

    def __init__(self, dataset_path: str | Path, resolution: int = 512, center_crop: bool = True,
                 random_flip: bool = False, caption_extension: str = ".txt", fallback_caption: str = "",
                 seed: int = 0, strict: bool = False, cache_path: str | Path | None = None,
                 buckets: bool = False, bucket_upscale: bool = False, trigger_phrase: str = "",
                 shuffle_tags: bool = False, keep_tags: int = 1, caption_dropout: float = 0.0,
                 class_data_path: str | Path | None = None, class_prompt: str = "", masked_loss: bool = False,
                 mask_path: str = "", subsets: list[Subset] | None = None):
        self.root = Path(dataset_path) if not subsets else common_folder([s.image_dir for s in subsets])
        self.class_root = Path(class_data_path) if class_data_path else None
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed
        self.epoch = 0
        self.trigger_phrase = trigger_phrase.strip()
        self.shuffle_tags, self.keep_tags, self.caption_dropout = shuffle_tags, keep_tags, caption_dropout
        cache = read_check_cache(cache_path)
        cached = dict(cache)
        scan = scan_subsets(subsets, cache) if subsets else scan_folder(self.root, caption_extension, fallback_caption,
                                                                        resolution, cache)
        if subsets and any(s.is_reg for s in subsets):  # class images' names are relative to the common folder
            self.class_root = self.root
        self.masked, self.mask_from_alpha = masked_loss, not mask_path
        if masked_loss:
            scan.examples = self.with_masks(scan, mask_path)
        if class_data_path:  # class images without a caption train with the class prompt
            classes = scan_folder(self.class_root, caption_extension, class_prompt, resolution, cache, "class_data_path")
            scan.examples += [replace(e, prior=True) for e in classes.examples]
            scan.skipped += [dict(s, file=f"class: {s['file']}") for s in classes.skipped]
            scan.notes.update(classes.notes)
        if cache_path is not None and cache != cached:  # unchanged: leave the file alone (other processes read it)
            write_check_cache(cache_path, cache)
        if strict and scan.skipped:
            listing = "\n  ".join(f"{s['file']}: {s['reason']}" for s in scan.skipped)
            raise DatasetError(f"{len(scan.skipped)} unusable file(s) in {self.root} and strict checking is on; "
                               f"fix or remove them, or turn strict off to skip them:\n  {listing}")
        self.skipped = scan.skipped
        self.notes = scan.notes
        self.buckets, self.bucket_upscale = buckets, bucket_upscale
        self.use_examples(scan.examples)

    def with_masks(self, scan: ScanResult, mask_path: str) -> list[Example]:
        """The scanned examples with their loss masks; a mask that cannot be used, or no mask at all, is an error.
        Pictures without one train on every pixel (a note in the summary)."""
        masks = scan_masks([(e.path, e.size) for e in scan.examples], self.root, mask_path)
        where = f"mask_path {mask_path}" if mask_path else "the pictures' alpha channels"
        if masks.problems:
            raise DatasetError(f"{len(masks.problems)} mask(s) in {where} cannot be used; fix or remove them "
                               f"(a mask is a greyscale image of its picture's size, white = learn):\n  "
                               + "\n  ".join(masks.problems))
        if not masks.found:
            raise DatasetError(f"masked_loss is on but none of the {len(scan.examples)} pictures in {self.root} has "
                               f"a mask in {where}; put same-stem mask images in a folder and set mask_path to it, "
                               f"or turn masked_loss off")
        if masks.missing:
            scan.notes["no mask: trained on every pixel"] += len(masks.missing)
        return [replace(e, mask=masks.found[i][0], mask_sha256=masks.found[i][1]) if i in masks.found else e
                for i, e in enumerate(scan.examples)]

    def use_examples(self, examples: list[Example]) -> None:
        """Train on `examples`: index their repeats (`order`) and training sizes (`sizes`)."""
        self.examples = examples
        self.order = [index for index, example in enumerate(examples) for _ in range(example.repeats)]
        self.sizes = [self.training_size(e) for e in examples]

    def training_size(self, example: Example) -> tuple[int, int]:
        """(width, height) an example trains at: its bucket, or the square crop; a dataset config's subset has its
        own resolution and bucket setting."""
        resolution = example.subset.resolution if example.subset else self.resolution
        buckets = example.subset.enable_bucket if example.subset else self.buckets
        if buckets:
            return bucket_size(*example.size, resolution, self.bucket_upscale)
        return resolution, resolution

    def split_off(self, fraction: float) -> "CustomDataset":
        """Hold out `fraction` of the images (at least one, never all; chosen by the seed) for validation:
        they leave this dataset and come back as a dataset with fixed captions and no mirroring."""
        instances = [i for i, e in enumerate(self.examples) if not e.prior]  # class images are never held out
        count = min(max(1, round(fraction * len(instances))), len(instances) - 1)
        if count < 1:
            raise DatasetError(f"validation_split needs at least 2 usable images in {self.root}, found "
                               f"{len(instances)}")
        chosen = set(random.Random(f"{self.seed}-validation").sample(instances, count))
        held_out = self.fixed_copy()
        held_out.use_examples([e for i, e in enumerate(self.examples) if i in chosen])
        self.use_examples([e for i, e in enumerate(self.examples) if i not in chosen])
        return held_out

    def fixed_copy(self) -> "CustomDataset":
        """The same images with deterministic items: centre crop, no mirroring, no tag shuffle or caption dropout
        (each image counted once), for a validation loss that is comparable across steps and runs."""
        fixed = copy.copy(self)
        fixed.center_crop, fixed.random_flip, fixed.shuffle_tags, fixed.caption_dropout = True, False, False, 0.0
        fixed.use_examples([replace(e, repeats=1) for e in self.examples])
        return fixed

    def __len__(self) -> int:
        return len(self.order)

    def begin_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def augmentation(self, item: int) -> tuple[random.Random, bool]:
        """(rng for the crop, whether to flip) of `item` in the current epoch."""
        rng = random.Random(f"{self.seed}-{self.epoch}-{item}")
        return rng, self.random_flip and rng.random() < 0.5

    def pixels(self, example: int, flip: bool, rng: random.Random | None = None) -> torch.Tensor:
        """Example `example` decoded, resized to cover its training size, cropped (centre, or randomly with
        `rng`) and optionally mirrored: 3 x H x W in [-1, 1]."""
        image, _ = load_image(self.examples[example].path)
        center = self.center_crop or rng is None
        return to_tensor(resize_and_crop(image, self.sizes[example], center, flip, rng or random.Random(0)))

    def mask(self, example: int, flip: bool, rng: random.Random | None = None) -> torch.Tensor:
        """Example `example`'s loss mask cropped and mirrored as pixels() crops and mirrors the picture (give it a
        generator in the same state): 1 x H x W in [0, 1]; all ones for a picture without a mask."""
        width, height = self.sizes[example]
        path = self.examples[example].mask
        if path is None:
            return torch.ones(1, height, width)
        mask = read_mask(path, from_alpha=self.mask_from_alpha)
        center = self.center_crop or rng is None
        cropped = resize_and_crop(mask, self.sizes[example], center, flip, rng or random.Random(0))
        return torch.from_numpy(np.asarray(cropped, dtype=np.float32) / 255.0)[None]

    def caption(self, item: int) -> str:
        """The caption `item` trains with this epoch: trigger phrase first, tags shuffled (the first `keep_tags`
        stay put), or the empty caption with probability `caption_dropout`."""
        rng = random.Random(f"{self.seed}-{self.epoch}-{item}-caption")
        example = self.examples[self.order[item]]
        text = example.caption
        if example.prior:  # the class prompt keeps its plain meaning: no trigger, shuffling or dropout
            return text
        shuffle, keep = ((example.subset.shuffle_caption, example.subset.keep_tokens) if example.subset
                         else (self.shuffle_tags, self.keep_tags))
        if shuffle:
            tags = [tag.strip() for tag in text.split(",") if tag.strip()]
            kept, rest = tags[:keep], tags[keep:]
            rng.shuffle(rest)
            text = ", ".join(kept + rest)
        if self.trigger_phrase and not text.startswith(self.trigger_phrase):
            text = f"{self.trigger_phrase}, {text}" if text else self.trigger_phrase
        if self.caption_dropout and rng.random() < self.caption_dropout:
            text = ""
        return text

    def possible_captions(self) -> set[str] | None:
        """Every caption an item can train with, or None when tag shuffling makes them too many to list."""
        if self.shuffle_tags or any(e.subset and e.subset.shuffle_caption for e in self.examples):
            return None
        saved, self.caption_dropout = self.caption_dropout, 0.0
        captions = {self.caption(item) for item in range(len(self))}
        self.caption_dropout = saved
        return captions | ({""} if saved else set())

    def __getitem__(self, item: int) -> dict:
        rng, flip = self.augmentation(item)
        entry = {"pixel_values": self.pixels(self.order[item], flip, rng), "caption": self.caption(item),
                 "index": item}
        if self.masked:  # the augmentation's generator afresh: the mask gets the picture's crop
            entry["mask"] = self.mask(self.order[item], flip, self.augmentation(item)[0])
        return entry

    def fingerprint(self) -> str:
        """sha256 over every used file's path, content and caption: changes when the training data changes."""
        rows = [(f"class: {e.path.relative_to(self.class_root)}" if e.prior else str(e.path.relative_to(self.root)),
                 e.sha256, e.caption) + ((e.mask_sha256,) if e.mask_sha256 else ()) + subset_rules(e)
                for e in self.examples]
        return hashlib.sha256(json.dumps(rows).encode("utf-8")).hexdigest()

    def class_images(self) -> int:
        """How many of the examples are class images (prior preservation)."""
        return sum(e.prior for e in self.examples)

    def summary(self) -> str:
        classes = self.class_images()
        lines = [f"dataset {self.root}: {len(self.examples) - classes} usable, {len(self.skipped)} skipped"]
        if classes:
            lines.append(f"  class images {self.class_root}: {classes}, trained beside them for prior preservation")
        if len(self.order) != len(self.examples):
            lines.append(f"  {len(self.order)} items per epoch with folder repeats")
        lines += [f"  {count} image(s): {note}" for note, count in sorted(self.notes.items())]
        sizes = Counter(self.sizes[index] for index in self.order)
        if len(sizes) > 1:
            lines.append("  buckets (items): " + ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(sizes.items())))
        return "\n".join(lines)

    def write_report(self, path: str | Path, held_out: int = 0) -> Path:
        """JSON report of what was used and what was skipped and why (the data_report.json of a run)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        classes = self.class_images()
        report = {"dataset_path": str(self.root), "usable": len(self.examples) - classes + held_out,
                  "training": len(self.examples) - classes, "held_out_for_validation": held_out,
                  "class_data_path": str(self.class_root) if self.class_root else None, "class_images": classes,
                  "skipped_count": len(self.skipped),
                  "skipped": self.skipped, "notes": dict(self.notes)}
        path.write_text(json.dumps(report, indent=2), encoding="utf-8")
        return path


def caption_token_counts(captions: list[str], tokenizer) -> tuple[list[int], int]:
    """(CLIP token count of each caption, how many exceed the tokenizer's limit): those lose their end in training."""
    lengths = [len(ids) for ids in tokenizer(captions, verbose=False).input_ids]
    return lengths, sum(n > tokenizer.model_max_length for n in lengths)


def doctor_report(root: Path, resolution: int = 512, caption_extension: str = ".txt",
                  tokenizer=None, masks: str | None = None) -> str:
    """What a user should know about a dataset folder before spending GPU hours on it, as readable text. `masks`:
    also report the loss masks, from that folder ("": the pictures' alpha channels)."""
    previous_level = log.level
    log.setLevel(logging.ERROR)  # the skips are listed below, once
    try:
        data = CustomDataset(root, resolution=resolution, caption_extension=caption_extension, buckets=True)
    finally:
        log.setLevel(previous_level)
    files = [p for p in root.rglob("*") if p.is_file()]
    lines = [f"dataset {root}", f"  images: {len(data.examples)} usable, {len(data.skipped)} skipped, "
             f"{sum(1 for p in files if is_ignored(p.relative_to(root)))} hidden/system files ignored"]
    lines += [f"    skipped {s['file']}: {s['reason']}" for s in data.skipped]
    if masks is not None:
        lines += mask_report(data, masks)

    metadata = read_metadata(root)
    caption_files = Counter(p.suffix for p in files if p.suffix.lower() in CAPTION_EXTENSIONS)
    uncaptioned = [e for e in data.examples if not caption_for(e.path, metadata, caption_extension)]
    source = "metadata file" if metadata is not None else f"'{caption_extension}' files"
    lines.append(f"  captions: from {source}; {len(data.examples) - len(uncaptioned)} captioned, "
                 f"{len(uncaptioned)} without (they get fallback_caption)")
    if caption_files:
        lines.append("    caption files present: " + ", ".join(f"{n} {ext}" for ext, n in caption_files.most_common()))
    lines += [f"    no caption: {e.path.relative_to(root)}" for e in uncaptioned[:10]]

    by_hash: dict[str, list[str]] = {}
    for e in data.examples:
        by_hash.setdefault(e.sha256, []).append(str(e.path.relative_to(root)))
    duplicates = [names for names in by_hash.values() if len(names) > 1]
    lines.append(f"  duplicates: {len(duplicates)} group(s) of identical files")
    lines += [f"    {' = '.join(names)}" for names in duplicates[:10]]

    small = [e for e in data.examples if min(e.size) < resolution]
    huge = [e for e in data.examples if min(e.size) > 4 * resolution]
    lines.append(f"  sizes: {len(small)} smaller than {resolution} px on the short side (upscaled in square "
                 f"training), {len(huge)} over {4 * resolution} px (slow to decode; consider downsizing)")
    lines += [f"    {count} image(s): {note}" for note, count in sorted(data.notes.items())]
    buckets = Counter(data.sizes[e] for e in data.order)
    lines.append("  aspect-ratio buckets at this resolution: "
                 + ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(buckets.items(), key=lambda kv: -kv[1])))
    captions = [e.caption for e in data.examples if e.caption]
    if tokenizer is not None and captions:
        lengths, too_long = caption_token_counts(captions, tokenizer)
        lengths = sorted(lengths)
        lines.append(f"  caption tokens: min {lengths[0]}, median {lengths[len(lengths) // 2]}, max {lengths[-1]}; "
                     f"{too_long} over the {tokenizer.model_max_length}-token limit (truncated in training)")
    elif captions:
        words = sorted(len(c.split()) for c in captions)
        lines.append(f"  caption words: min {words[0]}, max {words[-1]} (pass --tokenizer MODEL for CLIP token "
                     f"counts; the limit is 77 tokens, roughly 50-60 words)")
    return "\n".join(lines)


def mask_report(data: CustomDataset, mask_path: str) -> list[str]:
    """Lines on the pictures' loss masks: how many found, the pictures without one, the masks that cannot be used."""
    scan = scan_masks([(e.path, e.size) for e in data.examples], data.root, mask_path)
    where = f"from {mask_path}" if mask_path else "from the alpha channels"
    lines = [f"  masks ({where}): {len(scan.found)} found, {len(scan.missing)} picture(s) without one (trained on "
             f"every pixel), {len(scan.problems)} unusable"]
    lines += [f"    no mask: {name}" for name in scan.missing[:10]]
    lines += [f"    unusable: {problem}" for problem in scan.problems]
    return lines


def main(argv: list[str] | None = None) -> None:
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="Check a dataset folder before training: python dataset.py "
                                                 "--check PATH")
    parser.add_argument("--check", required=True, metavar="PATH", help="the dataset folder")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--caption_extension", default=".txt")
    parser.add_argument("--tokenizer", default="", metavar="MODEL",
                        help="a diffusers model folder or hub id whose tokenizer counts caption tokens")
    parser.add_argument("--masked_loss", action="store_true",
                        help="also check the loss masks: the pictures' alpha channels, or --mask_path's images")
    parser.add_argument("--mask_path", default="", metavar="PATH", help="a folder of same-stem mask images")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(message)s")
    tokenizer = None
    if args.tokenizer:
        from transformers import CLIPTokenizer
        try:
            tokenizer = CLIPTokenizer.from_pretrained(args.tokenizer, subfolder="tokenizer")
        except OSError as error:
            sys.exit(f"error: --tokenizer {args.tokenizer}: cannot load its tokenizer/ ({str(error)[:150]}); "
                     f"pass a diffusers model folder")
    try:
        masks = args.mask_path if args.masked_loss or args.mask_path else None
        print(doctor_report(Path(args.check), args.resolution, args.caption_extension, tokenizer, masks))
    except DatasetError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
