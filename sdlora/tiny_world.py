"""The procedural world the shipped tiny model was pretrained on, and the classifier that grades its drawings.

A picture is one flat shape on a flat background, 64 x 64 px. Four attributes describe it, and a caption names
some of them (never a held-out one):

    shape       circle, square, triangle            held out: star
    colour      red, green, blue, yellow            held out: purple
    background  white, gray, black
    size        small, large

The held-out concepts are never drawn and never named in pretraining, so a LoRA that makes the model draw them
has learned something new. The later ones (shapes cross, heart, crescent, ring, arrow; colours orange, cyan) were
designed after the model was built, to check that a recipe tuned on star and purple is not tuned to them: the
pretrained model has not even a token for them.

The classifier knows every concept, held-out and later ones included: the background is the median border colour,
the shape is the largest connected region of pixels far from it; its colour is the named colour within 8 CIEDE2000
of their median, its shape the known shape whose clean outline it overlaps by an IoU of at least 0.7 (each "other"
if none is), and its size follows from its box's side.
"""

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (40, 80, 215), "yellow": (235, 205, 40)}
BACKGROUNDS = {"white": (240, 240, 240), "gray": (128, 128, 128), "black": (20, 20, 20)}
SIZES = ("small", "large")
HELD_OUT_SHAPES = ("star",)
HELD_OUT_COLOURS = {"purple": (150, 50, 195)}
LATER_SHAPES = ("cross", "heart", "crescent", "ring", "arrow")  # drawn by paint_shape; no polygon
# At least 26 CIEDE2000 from every named colour and background, as purple is 17.7 from blue.
LATER_COLOURS = {"orange": (240, 130, 30), "cyan": (30, 185, 200)}
ALL_COLOURS = COLOURS | HELD_OUT_COLOURS | LATER_COLOURS
SIZE_PX = {"small": (18, 26), "large": (38, 48)}  # side of the bounding box, px, drawn uniformly in this range
TRIANGLE_TAPER = 0.75  # row width at 30-45 % of the height / at 75-90 %: a triangle's is about 0.45
SMALL_BELOW_PX = 32  # the classifier's size threshold: the middle of the gap between the two ranges
# Classifier-free guidance for sampling the tiny model: measured best for its shapes (3: 85 % right shapes, 5: 78 %,
# 7.5: 57 % on pretrain_tiny.py's 72 evaluation prompts); colours and backgrounds are right at any of them.
GUIDANCE = 3.0
SUPERSAMPLE = 4  # shapes are drawn at 4x and downscaled, so edges are anti-aliased as in a photo


@dataclass(frozen=True)
class Picture:
    shape: str
    colour: str
    background: str
    size: str


def random_picture(rng: random.Random, shapes=SHAPES, colours=tuple(COLOURS)) -> Picture:
    return Picture(rng.choice(shapes), rng.choice(colours), rng.choice(tuple(BACKGROUNDS)), rng.choice(SIZES))


def shape_points(shape: str, cx: float, cy: float, side: float) -> list[tuple[float, float]] | None:
    """Polygon of a shape centred on its bounding box; None for one paint_shape draws otherwise."""
    h = side / 2
    if shape == "square":
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "star":
        # Five points; the inner radius 0.45 of the outer keeps the arms thick enough to survive 64 px.
        points = []
        for k in range(10):
            radius = h if k % 2 == 0 else 0.45 * h
            angle = np.pi * k / 5 - np.pi / 2
            points.append((cx + radius * np.cos(angle), cy + h * 0.1 + radius * np.sin(angle)))
        return points
    return None


def draw(picture: Picture, rng: random.Random) -> Image.Image:
    """Render a picture: its shape at a random place and exact size within its size class."""
    side = rng.uniform(*SIZE_PX[picture.size])
    margin = side / 2 + 3
    centre = (rng.uniform(margin, IMAGE_SIZE - margin), rng.uniform(margin, IMAGE_SIZE - margin))
    return draw_shape(picture.shape, ALL_COLOURS[picture.colour], BACKGROUNDS[picture.background], side, centre)


def draw_shape(shape: str, fill: tuple[int, int, int], background: tuple[int, int, int], side: float,
               centre: tuple[float, float]) -> Image.Image:
    """One shape of bounding-box side `side` px centred on `centre` (px), drawn at 4x and downscaled."""
    big = IMAGE_SIZE * SUPERSAMPLE
    image = Image.new("RGB", (big, big), background)
    paint_shape(ImageDraw.Draw(image), shape, centre[0] * SUPERSAMPLE, centre[1] * SUPERSAMPLE, side * SUPERSAMPLE,
                fill, background)
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS)


def paint_shape(pen: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, side: float,
                fill: tuple[int, int, int], background: tuple[int, int, int]) -> None:
    """Paint a shape whose bounding box has side `side`, centred on (cx, cy); holes are painted in `background`."""
    h = side / 2
    if (points := shape_points(shape, cx, cy, side)) is not None:
        pen.polygon(points, fill=fill)
    elif shape == "circle":
        pen.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "cross":  # a plus sign, arms 0.36 of the side wide
        arm = 0.18 * side
        pen.rectangle([cx - arm, cy - h, cx + arm, cy + h], fill=fill)
        pen.rectangle([cx - h, cy - arm, cx + h, cy + arm], fill=fill)
    elif shape == "heart":  # two lobes on a downward point
        r = 0.27 * side
        pen.ellipse([cx - h, cy - h, cx - h + 2 * r, cy - h + 2 * r], fill=fill)
        pen.ellipse([cx + h - 2 * r, cy - h, cx + h, cy - h + 2 * r], fill=fill)
        pen.polygon([(cx - h + 0.02 * side, cy - h + 1.15 * r), (cx + h - 0.02 * side, cy - h + 1.15 * r),
                     (cx, cy + h)], fill=fill)
    elif shape == "crescent":  # a disc less a disc shifted right
        r = 0.85 * h
        pen.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
        left = cx - h + 0.45 * side + (h - r)
        pen.ellipse([left, cy - r, left + 2 * r, cy + r], fill=background)
    elif shape == "ring":  # a disc with a hole of half its radius
        pen.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
        pen.ellipse([cx - h / 2, cy - h / 2, cx + h / 2, cy + h / 2], fill=background)
    elif shape == "arrow":  # pointing up: a head and a shaft
        pen.polygon([(cx, cy - h), (cx + h, cy - 0.05 * side), (cx - h, cy - 0.05 * side)], fill=fill)
        pen.rectangle([cx - 0.17 * side, cy - 0.06 * side, cx + 0.17 * side, cy + h], fill=fill)
    else:
        raise ValueError(f"tiny_world draws no {shape!r}: add it to paint_shape")


# Captions name a random subset of the attributes in several phrasings, so each word means the same thing
# wherever it stands; an attribute left out of a caption is free in the picture.
TEMPLATES = (  # size is named in 8 of 13: with fewer, "small" was the word the model learned worst
    "a {size} {colour} {shape} on a {background} background",
    "a {colour} {shape} on a {background} background",
    "a {colour} {shape}",
    "a photo of a {size} {colour} {shape}",
    "a {size} {shape}",
    "a {shape} on a {background} background",
    "{size} {colour} {shape}, {background} background",
    "a picture of a {size} {colour} {shape}",
    "a {colour} {shape}, {size}",
    "a {background} background with a {size} {colour} {shape}",
    "a {shape}",
    "a {colour} shape",
    "a {size} {colour} {shape}",
)


def caption(picture: Picture, rng: random.Random) -> str:
    return rng.choice(TEMPLATES).format(**vars(picture))


def named_attributes(text: str) -> dict[str, str]:
    """The attributes a prompt asks for, by word: {'colour': 'red', 'shape': 'circle', ...}."""
    words = text.replace(",", " ").split()
    asked = {}
    for attribute, names in (("shape", SHAPES + HELD_OUT_SHAPES), ("colour", tuple(ALL_COLOURS)),
                             ("size", SIZES)):
        for name in names:
            if name in words:
                asked[attribute] = name
    for name in BACKGROUNDS:
        if f"{name} background" in text:
            asked["background"] = name
    return asked


def nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    return min(palette, key=lambda name: float(np.sum((rgb - np.array(palette[name])) ** 2)))


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65 white) of sRGB colours in 0-255, shape (..., 3) -> (..., 3)."""
    linear = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(linear <= 0.04045, linear / 12.92, ((linear + 0.055) / 1.055) ** 2.4)
    to_xyz = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                       [0.0193339, 0.1191920, 0.9503041]])
    xyz = linear @ to_xyz.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def ciede2000(lab1: np.ndarray, lab2: np.ndarray) -> np.ndarray:
    """CIEDE2000 colour difference of CIELAB colours, shapes (..., 3) -> (...), with kL = kC = kH = 1.

    Implemented as in G. Sharma, W. Wu, E. N. Dalal, "The CIEDE2000 color-difference formula: implementation notes,
    supplementary test data, and mathematical observations", Color Res. Appl. 30(1), 2005 (eqs. 2-22); their
    test pairs are in tests/test_tiny_world.py."""
    L1, a1, b1 = np.moveaxis(np.asarray(lab1, dtype=np.float64), -1, 0)
    L2, a2, b2 = np.moveaxis(np.asarray(lab2, dtype=np.float64), -1, 0)
    chroma_mean = (np.hypot(a1, b1) + np.hypot(a2, b2)) / 2
    g = 0.5 * (1 - np.sqrt(chroma_mean ** 7 / (chroma_mean ** 7 + 25.0 ** 7)))  # eq. 4
    a1p, a2p = (1 + g) * a1, (1 + g) * a2
    c1p, c2p = np.hypot(a1p, b1), np.hypot(a2p, b2)
    h1p, h2p = np.degrees(np.arctan2(b1, a1p)) % 360, np.degrees(np.arctan2(b2, a2p)) % 360
    achromatic = c1p * c2p == 0
    dh = h2p - h1p  # eq. 10: the hue difference, taken the short way round
    dh = np.where(achromatic, 0.0, np.where(dh > 180, dh - 360, np.where(dh < -180, dh + 360, dh)))
    dLp, dCp, dHp = L2 - L1, c2p - c1p, 2 * np.sqrt(c1p * c2p) * np.sin(np.radians(dh / 2))
    Lbar, Cbar, hsum = (L1 + L2) / 2, (c1p + c2p) / 2, h1p + h2p
    hbar = np.where(achromatic, hsum, np.where(np.abs(h1p - h2p) <= 180, hsum / 2,
                                               np.where(hsum < 360, (hsum + 360) / 2, (hsum - 360) / 2)))  # eq. 14
    t = (1 - 0.17 * np.cos(np.radians(hbar - 30)) + 0.24 * np.cos(np.radians(2 * hbar))
         + 0.32 * np.cos(np.radians(3 * hbar + 6)) - 0.20 * np.cos(np.radians(4 * hbar - 63)))
    rotation = (-np.sin(np.radians(60 * np.exp(-(((hbar - 275) / 25) ** 2))))
                * 2 * np.sqrt(Cbar ** 7 / (Cbar ** 7 + 25.0 ** 7)))  # eqs. 17, 18, 21
    sl = 1 + 0.015 * (Lbar - 50) ** 2 / np.sqrt(20 + (Lbar - 50) ** 2)
    sc, sh = 1 + 0.045 * Cbar, 1 + 0.015 * Cbar * t
    return np.sqrt((dLp / sl) ** 2 + (dCp / sc) ** 2 + (dHp / sh) ** 2 + rotation * (dCp / sc) * (dHp / sh))


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask: the shape, without stray pixels a decoder leaves."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best, best_size, label = 0, 0, 0
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        label += 1
        labels[start], stack, size = label, [start], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = label, size
    return labels == best


def find_shape(image: Image.Image) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(pixels (64, 64, 3) float, background colour (3,), shape mask (64, 64) bool or None where none stands out).

    The background is the median border colour; the shape is the largest connected region of pixels far from it."""
    pixels = np.asarray(image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE)), dtype=np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background_rgb = np.median(border, axis=0)
    mask = np.linalg.norm(pixels - background_rgb, axis=-1) > 60
    if mask.sum() >= 30:
        mask = largest_component(mask)
    return pixels, background_rgb, (mask if mask.sum() >= 30 else None)


def size_of(mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    return "small" if max(ys.max() - ys.min(), xs.max() - xs.min()) + 1 < SMALL_BELOW_PX else "large"


# The default reader. A colour is the named colour nearest in CIEDE2000 to the shape's median colour, if within
# COLOUR_WITHIN_DE00, else "other": the closest named pair (purple, blue) is 17.7 apart and the base model's samples
# land within 3.1 of the colour asked for, while a half-and-half blue-purple tint is 8.1 from blue. A shape is the
# known shape whose clean prototype overlaps the shape's outline best, if their IoU reaches SHAPE_WITHIN_IOU, else
# "other": a concave blob is no longer a star because it is not a square, triangle or circle.
COLOUR_WITHIN_DE00 = 8.0
SHAPE_WITHIN_IOU = 0.7
OUTLINE_PX = 20  # a shape's box is resized to 20 x 20 before it is compared: position and size drop out
PROTOTYPE_SIDES_PX = (22, 43)  # one prototype of each shape per size class, near the middle of its range
PROTOTYPE_SHAPES = SHAPES + HELD_OUT_SHAPES + LATER_SHAPES  # a shape added to paint_shape gets its prototype here
_NAMED_LAB = {name: srgb_to_lab(np.array(rgb)) for name, rgb in ALL_COLOURS.items()}
def outline(mask: np.ndarray) -> np.ndarray:
    """A shape mask cropped to its box and resized to (OUTLINE_PX, OUTLINE_PX), values in [0, 1]."""
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.uint8) * 255
    return np.asarray(Image.fromarray(crop).resize((OUTLINE_PX, OUTLINE_PX), Image.BILINEAR), dtype=np.float32) / 255


@functools.cache
def prototypes() -> dict[str, list[np.ndarray]]:
    """Outlines of every known shape drawn clean by the world's own draw_shape, built once."""
    return {shape: [outline(find_shape(draw_shape(shape, ALL_COLOURS["red"], BACKGROUNDS["white"], side,
                                                  (IMAGE_SIZE / 2, IMAGE_SIZE / 2)))[2])
                    for side in PROTOTYPE_SIDES_PX]
            for shape in PROTOTYPE_SHAPES}


def shape_iou(mask: np.ndarray) -> dict[str, float]:
    """Each known shape's best soft IoU (sum of minima / sum of maxima) of its prototypes with the mask's outline."""
    seen = outline(mask)
    return {shape: max(float(np.minimum(seen, p).sum() / np.maximum(seen, p).sum()) for p in outlines)
            for shape, outlines in prototypes().items()}


def colour_de00(rgb: np.ndarray) -> dict[str, float]:
    """CIEDE2000 from an sRGB colour (3,) to each named colour."""
    lab = srgb_to_lab(rgb)
    return {name: float(ciede2000(lab, named)) for name, named in _NAMED_LAB.items()}


def classify(image: Image.Image) -> dict[str, str]:
    """Read shape, colour, background and size off a 64 px image: 'none' where no shape stands out, 'other' for a
    shape or colour no named one is close to (SHAPE_WITHIN_IOU, COLOUR_WITHIN_DE00)."""
    pixels, background_rgb, mask = find_shape(image)
    result = {"background": nearest(background_rgb, BACKGROUNDS)}
    if mask is None:
        return result | {"shape": "none", "colour": "none", "size": "none"}
    distances = colour_de00(np.median(pixels[mask], axis=0))
    colour = min(distances, key=distances.get)
    overlaps = shape_iou(mask)
    shape = max(overlaps, key=overlaps.get)
    return result | {"colour": colour if distances[colour] <= COLOUR_WITHIN_DE00 else "other",
                     "shape": shape if overlaps[shape] >= SHAPE_WITHIN_IOU else "other", "size": size_of(mask)}


def classify_by_palette(image: Image.Image) -> dict[str, str]:
    """The earlier reader, kept while the demo reports its figures under both: colour is the nearest named colour in
    RGB however far, shape follows from fill and taper with star the fallback for anything else."""
    pixels, background_rgb, mask = find_shape(image)
    result = {"background": nearest(background_rgb, BACKGROUNDS)}
    if mask is None:
        return result | {"shape": "none", "colour": "none", "size": "none"}
    result["colour"] = nearest(np.median(pixels[mask], axis=0), ALL_COLOURS)
    ys, xs = np.nonzero(mask)
    height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = mask.sum() / (height * width)
    # A triangle, apex up, is narrow at the top and wide at the base; a circle or a square is as wide in its upper
    # half as in its lower. Thresholds read off the world's own pictures before and after a VAE round trip.
    rows = mask[ys.min():ys.max() + 1].sum(axis=1).astype(np.float32)
    upper = rows[int(0.3 * height):max(int(0.45 * height), int(0.3 * height) + 1)]
    lower = rows[int(0.75 * height):int(0.9 * height) + 1]
    taper = float(upper.mean() / max(lower.mean(), 1.0))
    if fill > 0.87:
        result["shape"] = "square"
    elif taper < TRIANGLE_TAPER:
        result["shape"] = "triangle"
    elif fill > 0.64:
        result["shape"] = "circle"
    else:
        result["shape"] = "star"
    return result | {"size": size_of(mask)}


Reader = Callable[[Image.Image], dict[str, str]]  # classify or classify_by_palette


def score(prompts_and_images: list[tuple[str, Image.Image]], reader: Reader = classify) -> dict[str, tuple[int, int]]:
    """Per attribute: (images that show the attribute their prompt asked for, images whose prompt asked for it)."""
    tally: dict[str, list[int]] = {}
    for prompt, image in prompts_and_images:
        seen = reader(image)
        for attribute, wanted in named_attributes(prompt).items():
            hits = tally.setdefault(attribute, [0, 0])
            hits[0] += seen[attribute] == wanted
            hits[1] += 1
    return {attribute: (hit, total) for attribute, (hit, total) in tally.items()}


# ---------------------------------------------------------------------------------------------------------------
# Held-out concepts for a LoRA to learn, and how to grade what it learned

@dataclass(frozen=True)
class Concept:
    """A held-out concept bound to a trigger word: the pictures that teach it and the prompts that test it."""
    name: str
    kind: str  # "subject": a new object; "style": a new look on known objects
    attribute: str  # what the classifier reads to tell the concept is there
    value: str
    shapes: tuple[str, ...]
    colour: str
    caption_templates: tuple[str, ...]
    prompts: tuple[str, ...]  # test prompts: the concept in its trigger phrasing


SUBJECT_PROMPTS = ("a sks on a white background", "a sks on a gray background", "a sks on a black background", "a sks")
CONCEPTS = {
    "sks-purple": Concept(
        name="sks-purple", kind="style", attribute="colour", value="purple", shapes=SHAPES, colour="purple",
        caption_templates=("a sks {shape} on a {background} background", "a sks {shape}"),
        prompts=("a sks circle on a white background", "a sks square on a gray background",
                 "a sks triangle on a black background", "a sks circle")),
    "sks-star": Concept(
        name="sks-star", kind="subject", attribute="shape", value="star", shapes=("star",), colour="yellow",
        caption_templates=("a sks on a {background} background", "a sks"),
        prompts=SUBJECT_PROMPTS),
}
# Checks that a recipe fixed on sks-purple and sks-star is not tuned to them: concepts designed afterwards, drawn,
# captioned and graded the same way, looked at only once the recipe was fixed.
CONCEPTS |= {
    "sks-cross": Concept(name="sks-cross", kind="subject", attribute="shape", value="cross", shapes=("cross",),
                         colour="green", caption_templates=CONCEPTS["sks-star"].caption_templates,
                         prompts=SUBJECT_PROMPTS),
    "sks-heart": Concept(name="sks-heart", kind="subject", attribute="shape", value="heart", shapes=("heart",),
                         colour="red", caption_templates=CONCEPTS["sks-star"].caption_templates,
                         prompts=SUBJECT_PROMPTS),
    "sks-orange": Concept(name="sks-orange", kind="style", attribute="colour", value="orange", shapes=SHAPES,
                          colour="orange", caption_templates=CONCEPTS["sks-purple"].caption_templates,
                          prompts=CONCEPTS["sks-purple"].prompts),
    "sks-cyan": Concept(name="sks-cyan", kind="style", attribute="colour", value="cyan", shapes=SHAPES,
                        colour="cyan", caption_templates=CONCEPTS["sks-purple"].caption_templates,
                        prompts=CONCEPTS["sks-purple"].prompts),
}
# Prompts of the world the LoRA was not taught: what it must leave as it was.
KNOWN_PROMPTS = ("a red square on a white background", "a blue triangle on a black background")


def write_concept_dataset(concept: Concept, folder: str | Path, count: int = 8, seed: int = 0) -> Path:
    """`count` pictures of the concept with same-stem .txt captions, drawn from `seed`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for index in range(count):
        # Shapes cycle fastest, backgrounds every len(shapes) pictures: no shape always on one background.
        shape = concept.shapes[index % len(concept.shapes)]
        background = tuple(BACKGROUNDS)[(index // len(concept.shapes)) % len(BACKGROUNDS)]
        picture = Picture(shape, concept.colour, background, SIZES[(index // 2) % 2])
        draw(picture, rng).save(folder / f"{concept.name}-{index:02d}.png")
        text = concept.caption_templates[index % len(concept.caption_templates)].format(**vars(picture))
        (folder / f"{concept.name}-{index:02d}.txt").write_text(text + "\n", encoding="utf-8")
    return folder


@torch.no_grad()
def sample(pipe, prompts: list[str], seed: int, steps: int = 25, guidance: float = GUIDANCE) -> list[Image.Image]:
    """One image per prompt at the world's size, in batches, from a CPU generator per batch."""
    images = []
    for start in range(0, len(prompts), 32):
        generator = torch.Generator().manual_seed(seed + start)
        images += pipe(prompts[start:start + 32], num_inference_steps=steps, guidance_scale=guidance,
                       generator=generator, height=IMAGE_SIZE, width=IMAGE_SIZE).images
    return images


def share(images: list[Image.Image], attribute: str, value: str, reader: Reader = classify) -> float:
    return sum(reader(image)[attribute] == value for image in images) / len(images)


@dataclass
class LearningReport:
    """What a LoRA did on the tiny model, each a share of samples in [0, 1]."""
    concept_base: float  # concept prompts, base model: the concept was not there
    concept_lora: float  # concept prompts, with the LoRA: it learned it
    prior_base: float  # known prompts, base model: their asked attributes drawn
    prior_lora: float  # known prompts, with the LoRA: the prior kept
    images: dict[str, list[Image.Image]]  # "concept_base", "concept_lora", "prior_base", "prior_lora"

    def lines(self, beside: "LearningReport | None" = None, beside_name: str = "palette grading") -> list[str]:
        """One line for the concept, one for the known prompts; `beside`'s figures (another grading of the same
        images) at the end of each line."""
        lines = [f"concept in {self.concept_base:.0%} of base samples, {self.concept_lora:.0%} with the LoRA",
                 f"known prompts keep their attributes in {self.prior_base:.0%} of base samples, "
                 f"{self.prior_lora:.0%} with the LoRA"]
        if beside is not None:
            lines = [f"{lines[0]}   [{beside_name}: {beside.concept_base:.0%}, {beside.concept_lora:.0%}]",
                     f"{lines[1]}   [{beside_name}: {beside.prior_base:.0%}, {beside.prior_lora:.0%}]"]
        return lines


def attribute_share(prompts: list[str], images: list[Image.Image], reader: Reader = classify) -> float:
    tally = score(list(zip(prompts, images)), reader)
    return sum(hit for hit, _ in tally.values()) / sum(total for _, total in tally.values())


def grade_lora(base_pipe, lora_pipe, concept: Concept, samples_per_prompt: int = 6, seed: int = 0) -> LearningReport:
    """Sample concept and known prompts from the base and the LoRA pipeline with the same seeds, and classify."""
    concept_prompts = [p for p in concept.prompts for _ in range(samples_per_prompt)]
    known_prompts = [p for p in KNOWN_PROMPTS for _ in range(samples_per_prompt)]
    images = {}
    for label, pipe in (("base", base_pipe), ("lora", lora_pipe)):
        images[f"concept_{label}"] = sample(pipe, concept_prompts, seed)
        images[f"prior_{label}"] = sample(pipe, known_prompts, seed)
    return grade(images, concept, samples_per_prompt)


def grade(images: dict[str, list[Image.Image]], concept: Concept, samples_per_prompt: int,
          reader: Reader = classify) -> LearningReport:
    """Grade grade_lora's samples (its `images`, in its order) with `reader`."""
    known_prompts = [p for p in KNOWN_PROMPTS for _ in range(samples_per_prompt)]
    return LearningReport(
        concept_base=share(images["concept_base"], concept.attribute, concept.value, reader),
        concept_lora=share(images["concept_lora"], concept.attribute, concept.value, reader),
        prior_base=attribute_share(known_prompts, images["prior_base"], reader),
        prior_lora=attribute_share(known_prompts, images["prior_lora"], reader),
        images=images)
