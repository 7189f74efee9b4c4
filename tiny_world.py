"""The procedural world the shipped tiny model was pretrained on, and the classifier that grades its drawings.

A picture is one flat shape on a flat background, 64 x 64 px. Four attributes describe it, and a caption names
some of them (never a held-out one):

    shape       circle, square, triangle            held out: star
    colour      red, green, blue, yellow            held out: purple
    background  white, gray, black
    size        small, large

The held-out concepts are never drawn and never named in pretraining, so a LoRA that makes the model draw them
has learned something new. The classifier knows every concept, held-out ones included, and reads an image the
simple way: the background is the median border colour, the shape is the pixels far from it; its colour is the
nearest named colour to their median, its shape follows from how it fills its bounding box, its size from the
box's side.
"""

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (40, 80, 215), "yellow": (235, 205, 40)}
BACKGROUNDS = {"white": (240, 240, 240), "gray": (128, 128, 128), "black": (20, 20, 20)}
SIZES = ("small", "large")
HELD_OUT_SHAPES = ("star",)
HELD_OUT_COLOURS = {"purple": (150, 50, 195)}
ALL_COLOURS = COLOURS | HELD_OUT_COLOURS
SIZE_PX = {"small": (18, 26), "large": (34, 44)}  # side of the bounding box, px, drawn uniformly in this range
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
    """Polygon of a shape centred on its bounding box; None for the circle (drawn as an ellipse)."""
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


def draw(picture: Picture, rng: random.Random, colour_rgb: tuple[int, int, int] | None = None) -> Image.Image:
    """Render a picture: its shape at a random place and exact size within its size class."""
    big = IMAGE_SIZE * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUNDS[picture.background])
    side = rng.uniform(*SIZE_PX[picture.size]) * SUPERSAMPLE
    margin = side / 2 + 3 * SUPERSAMPLE
    cx, cy = rng.uniform(margin, big - margin), rng.uniform(margin, big - margin)
    fill = colour_rgb or ALL_COLOURS[picture.colour]
    points = shape_points(picture.shape, cx, cy, side)
    if points is None:
        ImageDraw.Draw(image).ellipse([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], fill=fill)
    else:
        ImageDraw.Draw(image).polygon(points, fill=fill)
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS)


# Captions name a random subset of the attributes in several phrasings, so each word means the same thing
# wherever it stands; an attribute left out of a caption is free in the picture.
TEMPLATES = (
    "a {size} {colour} {shape} on a {background} background",
    "a {colour} {shape} on a {background} background",
    "a {colour} {shape}",
    "a photo of a {colour} {shape}",
    "a {size} {shape}",
    "a {shape} on a {background} background",
    "{colour} {shape}, {background} background",
    "a picture of a {size} {colour} {shape}",
    "a {colour} {shape}, {size}",
    "a {background} background with a {colour} {shape}",
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


def classify(image: Image.Image) -> dict[str, str]:
    """Read shape, colour, background and size off a 64 px image ('none' where no shape stands out)."""
    pixels = np.asarray(image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE)), dtype=np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background_rgb = np.median(border, axis=0)
    mask = np.linalg.norm(pixels - background_rgb, axis=-1) > 60
    result = {"background": nearest(background_rgb, BACKGROUNDS)}
    if mask.sum() < 30:
        return result | {"shape": "none", "colour": "none", "size": "none"}
    result["colour"] = nearest(np.median(pixels[mask], axis=0), ALL_COLOURS)
    ys, xs = np.nonzero(mask)
    height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = mask.sum() / (height * width)
    centroid_y = (ys.mean() - ys.min()) / max(height - 1, 1)  # 0 top .. 1 bottom of the box
    if fill > 0.88:
        result["shape"] = "square"
    elif fill > 0.66:
        result["shape"] = "circle"
    elif centroid_y > 0.6:
        result["shape"] = "triangle"  # apex up: two thirds of its area sits in the lower half
    else:
        result["shape"] = "star"
    result["size"] = "small" if max(height, width) < 30 else "large"
    return result


def score(prompts_and_images: list[tuple[str, Image.Image]]) -> dict[str, tuple[int, int]]:
    """Per attribute: (images that show the attribute their prompt asked for, images whose prompt asked for it)."""
    tally: dict[str, list[int]] = {}
    for prompt, image in prompts_and_images:
        seen = classify(image)
        for attribute, wanted in named_attributes(prompt).items():
            hits = tally.setdefault(attribute, [0, 0])
            hits[0] += seen[attribute] == wanted
            hits[1] += 1
    return {attribute: (hit, total) for attribute, (hit, total) in tally.items()}
