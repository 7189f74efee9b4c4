"""Loss masks (masked_loss): where in each picture the loss counts. White (or opaque) = learn, black (or
transparent) = ignore, grey in between.

A mask is a same-stem image in the `mask_path` folder (`photo.jpg` -> `<mask_path>/photo.png`, sub-folders as
under the dataset), read as greyscale, or, without a mask folder, the picture's own alpha channel. It must have its
picture's size (after EXIF rotation); the dataset crops, mirrors and buckets it with its picture, and the loss step
shrinks it to the latent grid by area averaging (kohya's apply_masked_loss, library/custom_train_functions.py:
`interpolate(mask, size=loss.shape[2:], mode="area")`).
"""

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from sdlora.files import IMAGE_EXTENSIONS, sha256_file

ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def mask_file(image: Path, root: Path, mask_folder: Path) -> Path | None:
    """The mask of `image` (under `root`): the file in `mask_folder` at the same relative path and stem, with any
    image extension; None when there is none."""
    stem = mask_folder / image.relative_to(root).with_suffix("")
    for candidate in sorted(stem.parent.glob(stem.name + ".*")) if stem.parent.is_dir() else []:
        if candidate.suffix.lower() in IMAGE_EXTENSIONS and candidate.with_suffix("") == stem:
            return candidate
    return None


def read_mask(path: Path, from_alpha: bool) -> Image.Image | None:
    """The mask as an 8-bit greyscale ("L") image, EXIF rotation applied: `path`'s alpha channel (`from_alpha`; None
    when it has none), else `path` itself as greyscale. Raises ValueError with a reason when it cannot be read."""
    try:
        with Image.open(path) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot be read as an image ({type(error).__name__}: {error})") from None
    if not from_alpha:
        return image.convert("L")
    if image.mode not in ALPHA_MODES and "transparency" not in image.info:
        return None
    return image.convert("RGBA").getchannel("A")


@dataclass
class MaskScan:
    """The masks found for a folder's pictures: {example index: (mask file, its sha256)}, the pictures without
    one, and one line per mask that cannot be used (unreadable, or another size than its picture)."""

    found: dict[int, tuple[Path, str]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def scan_masks(pictures: list[tuple[Path, tuple[int, int]]], root: Path, mask_path: str) -> MaskScan:
    """Find and fully read the mask of each picture (path under `root`, displayed size): in `mask_path`, or each
    picture's alpha channel when `mask_path` is empty."""
    scan = MaskScan()
    for index, (picture, size) in enumerate(pictures):
        relative = picture.relative_to(root)
        source = mask_file(picture, root, Path(mask_path)) if mask_path else picture
        if source is None:
            scan.missing.append(str(relative))
            continue
        shown = f"mask {source.relative_to(mask_path)}" if mask_path else "alpha channel"
        try:
            mask = read_mask(source, from_alpha=not mask_path)
        except ValueError as error:
            scan.problems.append(f"{relative}: {shown} {error}")
            continue
        if mask is None:
            scan.missing.append(str(relative))
        elif mask.size != size:
            scan.problems.append(f"{relative}: {shown} is {mask.size[0]}x{mask.size[1]}, the picture "
                                 f"{size[0]}x{size[1]}; a mask must have its picture's size")
        else:
            scan.found[index] = (source, sha256_file(source) if mask_path else "")
    return scan
