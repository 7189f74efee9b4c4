"""A planted-defect dataset: good, odd-but-valid and unusable files side by side, with what each must become."""

import io
from pathlib import Path

import numpy as np
from PIL import Image

RED = (200, 30, 30)
WHITE = (255, 255, 255)

# Unusable files and a word their skip reason must contain.
SKIPPED = {
    "truncated.jpg": "truncated",  # first half of a JPEG's bytes: opens, fails on full decode
    "truncated.png": "truncated",
    "empty.jpg": "not an image",  # zero bytes
    "notes.png": "not an image",  # a text file with an image extension
    "garbage.webp": "not an image",  # random bytes
    "tiny.png": "too small",
    "latin1.jpg": "not UTF-8",  # its caption is Latin-1
}
# Usable files, relative to the root.
USABLE = ["UPPER.JPG", "bom.png", "cmyk.jpg", "empty_caption.png", "good.jpg", "grey16.png", "huge.png",
          "la.png", "long_caption.png", "mono.bmp", "palette.png", "rotated.jpg", "sub/nested.png",
          "transparent.png", "wide.png", "photo.webp"]
# (file, pixel, expected RGB, tolerance in 8-bit levels) for odd images after decoding. Pillow and libjpeg-turbo
# decode in integer arithmetic, the same on every processor: 0 where the value is exact, 1 for the rounding of 16-bit
# grey to 8 bits, 12 for the lossy JPEG encoding of a CMYK red.
PIXELS = [
    ("transparent.png", (5, 5), WHITE, 0),  # fully transparent blue -> white background
    ("palette.png", (5, 5), WHITE, 0),  # transparent palette index -> white
    ("palette.png", (60, 60), (0, 128, 0), 0),
    ("la.png", (5, 5), WHITE, 0),  # grey with alpha 0 -> white
    ("grey16.png", (5, 5), (127, 127, 127), 1),  # 16-bit mid grey scaled, not clipped to white
    ("mono.bmp", (5, 5), WHITE, 0),
    ("cmyk.jpg", (5, 5), RED, 12),
]
LONG_CAPTION = "a very detailed caption " * 10  # 240 characters: past the 77-token limit


def solid(size=(80, 64), color=RED, mode="RGB") -> Image.Image:
    return Image.new(mode, size, color)


def save(image: Image.Image, path: Path, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)


def cut(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


def make_planted_dataset(root: Path) -> Path:
    save(solid(), root / "good.jpg", quality=95)
    (root / "good.txt").write_text("a red square\n", encoding="utf-8")
    save(solid(), root / "UPPER.JPG", quality=95)
    save(solid(), root / "sub" / "nested.png")
    (root / "sub" / "nested.txt").write_text("nested caption", encoding="utf-8")
    save(solid(), root / "photo.webp")
    save(Image.new("RGBA", (64, 64), (0, 0, 255, 0)), root / "transparent.png")
    save(Image.fromarray(np.full((64, 64), 65535 // 2, dtype=np.uint16)), root / "grey16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display: stored 80x64 must come out 64x80
    save(solid((80, 64)), root / "rotated.jpg", exif=exif.tobytes())
    save(solid(mode="CMYK", color=(0, 217, 217, 55)), root / "cmyk.jpg", quality=95)
    palette = Image.new("P", (80, 80), 0)
    palette.putpalette([255, 0, 255] + [0, 128, 0] + [0, 0, 0] * 254)
    palette.paste(1, (40, 40, 80, 80))
    save(palette, root / "palette.png", transparency=0)
    save(Image.new("LA", (64, 64), (90, 0)), root / "la.png")
    save(Image.new("1", (64, 64), 1), root / "mono.bmp")
    save(solid((3000, 2000)), root / "huge.png")
    save(solid((640, 64)), root / "wide.png")  # 10:1, accepted with a note
    save(solid(), root / "empty_caption.png")
    (root / "empty_caption.txt").write_text("  \n", encoding="utf-8")
    save(solid(), root / "long_caption.png")
    (root / "long_caption.txt").write_text(LONG_CAPTION, encoding="utf-8")
    save(solid(), root / "bom.png")
    (root / "bom.txt").write_bytes("\ufeffcaption with a byte order mark".encode("utf-8"))

    (root / "truncated.jpg").write_bytes(cut(solid((256, 256)), "JPEG"))
    (root / "truncated.png").write_bytes(cut(Image.fromarray(np.random.default_rng(0).integers(
        0, 255, (128, 128, 3), dtype=np.uint8)), "PNG"))
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.png").write_text("not an image", encoding="utf-8")
    (root / "garbage.webp").write_bytes(np.random.default_rng(1).integers(0, 255, 4096, dtype=np.uint8).tobytes())
    save(solid((8, 8)), root / "tiny.png")
    save(solid(), root / "latin1.jpg")
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))

    for junk in (".DS_Store", "._good.jpg", "Thumbs.db", ".cache/thumb.jpg"):  # never data, never mentioned
        (root / junk).parent.mkdir(parents=True, exist_ok=True)
        (root / junk).write_bytes(b"\0\0")
    return root
