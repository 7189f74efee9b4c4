"""Can the shipped tiny model's VAE carry shapes the world never draws? Its round trip, measured, and an experiment
that refines it (issue: a testbed that can hold a subject).

    python benchmarks/vae_roundtrip.py measure [MODEL]      # read rates after the round trip; about 30 s
    python benchmarks/vae_roundtrip.py refine OUT [STEPS]   # refine the shipped VAE into a model copy in OUT, then
                                                            # measure it; about 12 minutes on 2 cores at 1600 steps
    python benchmarks/vae_roundtrip.py blur                 # the yardstick: read rates of small shapes after a
                                                            # Gaussian blur of 0.5-1.6 px instead of the VAE

`measure` draws 48 pictures of every shape tiny_world knows (the world's, its held-out star, and the later designs
cross, heart, crescent, ring, arrow) at each size, in every named colour on every background, sends them through
the VAE (encoder mean, decoder) and prints how often tiny_world.classify reads each shape, and each colour, right.

`refine` is the experiment, not the build: the shipped VAE deepened by one resnet per block (the added ones start
as the identity), then trained on the world's pictures, star-like radial polygons and generic concave shapes, with
an edge-weighted loss and the latents of the world's own pictures anchored where the UNet learned them. Results
in benchmarks/results-vae-roundtrip.md: it lifts the later designs and small triangles, not small stars.
"""

import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pretrain_tiny  # noqa: E402
from sdlora import tiny_world  # noqa: E402

MODEL = ROOT / "models" / "tiny-sd-world"
PER_SHAPE_AND_SIZE = 48
REFINE_STEPS, REFINE_BATCH, REFINE_LR = 1600, 16, 1e-3
REFINE_SHARES = {"world": 0.4, "star-like": 0.42, "generic": 0.18}  # of each batch, by kind of picture
LATENT_ANCHOR = 10.0  # x the squared drift of the world's latents from where the UNet learned them
EDGE_WEIGHT = 4.0  # extra L1 weight on pixels within 1 px of a drawn edge


# ---------------------------------------------------------------------------------------------------------------
# The round trip, measured

@torch.no_grad()
def round_trip(vae: AutoencoderKL, images: list[Image.Image]) -> list[Image.Image]:
    decoded = vae.decode(vae.encode(pretrain_tiny.to_tensor(images)).latent_dist.mean).sample.clamp(-1, 1)
    return [Image.fromarray(((d.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)) for d in decoded]


def read_rates(vae: AutoencoderKL) -> dict:
    """{"shape": {"star/small": [read, of], ...}, "colour": {"purple": [read, of], ...}} after the round trip."""
    rng, colours, backgrounds = random.Random(7), tuple(tiny_world.ALL_COLOURS), tuple(tiny_world.BACKGROUNDS)
    rates = {"shape": {}, "colour": {}}
    for shape in tiny_world.PROTOTYPE_SHAPES:
        for size in tiny_world.SIZES:
            pictures = [tiny_world.Picture(shape, colours[k % len(colours)],
                                           backgrounds[(k // len(colours)) % len(backgrounds)], size)
                        for k in range(PER_SHAPE_AND_SIZE)]
            seen = [tiny_world.classify(image)
                    for image in round_trip(vae, [tiny_world.draw(p, rng) for p in pictures])]
            rates["shape"][f"{shape}/{size}"] = [sum(s["shape"] == shape for s in seen), len(seen)]
            for picture, reading in zip(pictures, seen):
                tally = rates["colour"].setdefault(picture.colour, [0, 0])
                tally[0] += reading["colour"] == picture.colour
                tally[1] += 1
    return rates


def blur_rates(radii=(0.5, 0.8, 1.0, 1.3, 1.6)) -> dict[str, list[int]]:
    """How sharp must a codec be? Small pictures of every shape, read after a Gaussian blur of each radius (px at
    64 px) in place of the round trip: {"star": [read at radius 0.5, ...], ...}, of PER_SHAPE_AND_SIZE each."""
    rng, colours, backgrounds = random.Random(7), tuple(tiny_world.ALL_COLOURS), tuple(tiny_world.BACKGROUNDS)
    rates = {}
    for shape in tiny_world.PROTOTYPE_SHAPES:
        images = [tiny_world.draw(tiny_world.Picture(shape, colours[k % len(colours)],
                                                     backgrounds[(k // len(colours)) % len(backgrounds)], "small"), rng)
                  for k in range(PER_SHAPE_AND_SIZE)]
        rates[shape] = [sum(tiny_world.classify(image.filter(ImageFilter.GaussianBlur(radius)))["shape"] == shape
                            for image in images) for radius in radii]
    print("| small shape | " + " | ".join(f"blur {radius} px" for radius in radii) + " |")
    print("|---|" + "---|" * len(radii))
    for shape, reads in rates.items():
        print(f"| {shape} | " + " | ".join(f"{read}/{PER_SHAPE_AND_SIZE}" for read in reads) + " |")
    return rates


def print_rates(rates: dict) -> None:
    print("| shape | small | large |\n|---|---|---|")
    for shape in tiny_world.PROTOTYPE_SHAPES:
        cells = [rates["shape"][f"{shape}/{size}"] for size in tiny_world.SIZES]
        print(f"| {shape} | " + " | ".join(f"{read}/{of}" for read, of in cells) + " |")
    print("colours read: " + ", ".join(f"{name} {read}/{of}" for name, (read, of) in rates["colour"].items()))


# ---------------------------------------------------------------------------------------------------------------
# The experiment: a deeper VAE refined on shapes the world never draws

def generic_shape_picture(rng: random.Random) -> Image.Image:
    """One generic flat shape, any colour on any other: a radial polygon with random radii (concave), a union of
    bars and ellipses, a disc minus a disc, or an off-centre annulus. Side 12-50 px, half of them 18-26 px.

    It never draws the designs that check the round trip (tiny_world.LATER_SHAPES: cross, heart, crescent, ring,
    arrow): angles and radii are random, and the annulus's hole is off centre and never half the radius."""
    fill, back = distinct_colours(rng)
    s = tiny_world.SUPERSAMPLE
    big = tiny_world.IMAGE_SIZE * s
    image = Image.new("RGB", (big, big), back)
    draw = ImageDraw.Draw(image)
    h = (rng.uniform(18, 26) if rng.random() < 0.5 else rng.uniform(12, 50)) * s / 2
    cx, cy = rng.uniform(h + 3 * s, big - h - 3 * s), rng.uniform(h + 3 * s, big - h - 3 * s)
    kind = rng.randrange(4)
    if kind == 0:
        n = rng.randint(5, 12)
        start = rng.uniform(0, 2 * math.pi)
        angles = [start + 2 * math.pi * (k + rng.uniform(-0.3, 0.3)) / n for k in range(n)]
        radii = [h * rng.uniform(0.3, 1.0) for _ in range(n)]
        draw.polygon([(cx + r * math.cos(a), cy + r * math.sin(a)) for a, r in zip(angles, radii)], fill=fill)
    elif kind == 1:
        for _ in range(rng.randint(2, 3)):
            length, width, angle = h * rng.uniform(0.5, 1.0), h * rng.uniform(0.15, 0.45), rng.uniform(0, math.pi)
            px, py = cx + rng.uniform(-0.4, 0.4) * h, cy + rng.uniform(-0.4, 0.4) * h
            if rng.random() < 0.6:
                ux, uy = length * math.cos(angle), length * math.sin(angle)
                vx, vy = -width * math.sin(angle), width * math.cos(angle)
                draw.polygon([(px - ux - vx, py - uy - vy), (px + ux - vx, py + uy - vy),
                              (px + ux + vx, py + uy + vy), (px - ux + vx, py - uy + vy)], fill=fill)
            else:
                draw.ellipse([px - length, py - width * 2, px + length, py + width * 2], fill=fill)
    elif kind == 2:
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
        r, angle, offset = h * rng.uniform(0.4, 0.9), rng.uniform(0, 2 * math.pi), h * rng.uniform(0.5, 1.2)
        ox, oy = cx + offset * math.cos(angle), cy + offset * math.sin(angle)
        draw.ellipse([ox - r, oy - r, ox + r, oy + r], fill=back)
    else:
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
        r = h * (rng.uniform(0.25, 0.4) if rng.random() < 0.5 else rng.uniform(0.6, 0.7))
        ox, oy = cx + rng.uniform(-0.2, 0.2) * (h - r), cy + rng.uniform(-0.2, 0.2) * (h - r)
        draw.ellipse([ox - r, oy - r, ox + r, oy + r], fill=back)
    return image.resize((tiny_world.IMAGE_SIZE, tiny_world.IMAGE_SIZE), Image.LANCZOS)


# Phase 2: the VAE's decoder alone, on shapes the world does not draw


def star_like_picture(rng: random.Random) -> Image.Image:
    """A radial star of 3 to 8 points, inner radius 0.3-0.7 of the outer, each vertex's radius jittered by up to
    15 %, any colour on any other; sides as generic_shape_picture's. The world's held-out star (5 points, inner
    0.45, no jitter) is one point of this family: a codec must carry thin points, and the UNet and the text
    encoder never see a star."""
    fill, back = distinct_colours(rng)
    s = tiny_world.SUPERSAMPLE
    big = tiny_world.IMAGE_SIZE * s
    image = Image.new("RGB", (big, big), back)
    h = (rng.uniform(18, 26) if rng.random() < 0.5 else rng.uniform(12, 50)) * s / 2
    cx, cy = rng.uniform(h + 3 * s, big - h - 3 * s), rng.uniform(h + 3 * s, big - h - 3 * s)
    points, inner, start = rng.randint(3, 8), rng.uniform(0.3, 0.7), rng.uniform(0, 2 * math.pi)
    radii = [h * (1 if k % 2 == 0 else inner) * rng.uniform(0.85, 1.0) for k in range(2 * points)]
    ImageDraw.Draw(image).polygon([(cx + r * math.cos(start + math.pi * k / points),
                                    cy + r * math.sin(start + math.pi * k / points)) for k, r in enumerate(radii)],
                                  fill=fill)
    return image.resize((tiny_world.IMAGE_SIZE, tiny_world.IMAGE_SIZE), Image.LANCZOS)


def distinct_colours(rng: random.Random) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """A fill and a background of any colours, at least 80 apart in RGB: a shape the eye can see."""
    def colour():
        return tuple(rng.randrange(256) for _ in range(3))
    back, fill = colour(), colour()
    while sum((a - b) ** 2 for a, b in zip(back, fill)) < 80 ** 2:
        fill = colour()
    return fill, back


def deepen_vae(vae: AutoencoderKL) -> AutoencoderKL:
    """The same VAE with one resnet more in every encoder and decoder block, the added ones the identity (their last
    convolution zero), so the deepened VAE computes what the trained one did. AutoencoderKL gives its encoder and
    decoder one `layers_per_block`, so the encoder grows too; its added resnets learn only what the anchor allows."""
    deeper = AutoencoderKL.from_config({**vae.config, "layers_per_block": vae.config.layers_per_block + 1})
    trained, state = vae.state_dict(), deeper.state_dict()
    for name, tensor in state.items():
        if name in trained:
            state[name] = trained[name]
        elif ".conv2." in name:
            state[name] = torch.zeros_like(tensor)
    deeper.load_state_dict(state)
    return deeper


def refine_loss(reconstruction: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """L1 + MSE + L1 of the image gradients (Mathieu et al. 2016, arXiv:1511.05440, "gradient difference loss"),
    plus EDGE_WEIGHT x L1 within 1 px of the clean picture's edges; each picture weighted by 1/sqrt(shape area),
    so a small shape's corners count as much as a large one's. Pictures (B, 3, H, W) in [-1, 1]."""
    error = (reconstruction - pixels).abs()
    edges = ((pixels[..., :, 1:] - pixels[..., :, :-1]).abs().amax(1, keepdim=True) > 0.05).float()
    edges = F.pad(edges, (0, 1)) + F.pad(((pixels[..., 1:, :] - pixels[..., :-1, :]).abs().amax(1, keepdim=True)
                                          > 0.05).float(), (0, 0, 0, 1))
    near_edge = F.max_pool2d(edges.clamp(max=1), 3, stride=1, padding=1)
    per_pixel = error + error ** 2 + EDGE_WEIGHT * near_edge * error
    gradients = ((reconstruction.diff(dim=-1) - pixels.diff(dim=-1)).abs().mean(dim=(1, 2, 3))
                 + (reconstruction.diff(dim=-2) - pixels.diff(dim=-2)).abs().mean(dim=(1, 2, 3)))
    background = pixels[..., :1, :1]  # every picture leaves a margin of background around its shape
    area = ((pixels - background).abs().amax(1) > 0.1).float().sum(dim=(1, 2)).clamp(min=16)
    weight = area.rsqrt() / area.rsqrt().mean()
    return (weight * (per_pixel.mean(dim=(1, 2, 3)) + gradients)).mean()


def refine_batch(rng: random.Random, batch: int) -> tuple[torch.Tensor, list[int]]:
    """REFINE_SHARES of world, star-like and generic pictures, and which rows are the world's."""
    pictures, world_rows = [], []
    for row in range(batch):
        kind = rng.choices(tuple(REFINE_SHARES), weights=tuple(REFINE_SHARES.values()))[0]
        if kind == "world":
            world_rows.append(row)
            pictures.append(tiny_world.draw(tiny_world.random_picture(rng), rng))
        else:
            pictures.append(star_like_picture(rng) if kind == "star-like" else generic_shape_picture(rng))
    return pretrain_tiny.to_tensor(pictures), world_rows


def refine_vae(trained: AutoencoderKL, steps: int, work_dir: Path) -> tuple[AutoencoderKL, float]:
    """Deepen the VAE and train it on shapes the world never draws, its latents of the world's own pictures held
    where they were (LATENT_ANCHOR), so the UNet trained on those latents stays valid while the decoder learns to
    draw new shapes. In a build it would run after the UNet, which would then never depend on it."""
    final = work_dir / "vae_refined.pt"
    torch.manual_seed(pretrain_tiny.SEED + 3)
    vae = deepen_vae(trained)
    if (done := pretrain_tiny.load_state(final)) is not None:
        vae.load_state_dict(done["vae"])
        return vae, done["seconds"]
    trained.eval().requires_grad_(False)
    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=REFINE_LR, weight_decay=0.0)
    state_path, step, clock = work_dir / "vae_refine_state.pt", 0, pretrain_tiny.Clock()
    rng = random.Random(pretrain_tiny.SEED + 3)
    if (state := pretrain_tiny.load_state(state_path)) is not None:
        vae.load_state_dict(state["vae"])
        optimizer.load_state_dict(state["optimizer"])
        step, clock = state["step"], pretrain_tiny.Clock(state["seconds"])
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        print(f"vae refinement: resumed at step {step}")
    while step < steps:
        for group in optimizer.param_groups:
            group["lr"] = REFINE_LR * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        pixels, world_rows = refine_batch(rng, REFINE_BATCH)
        moments = vae.quant_conv(vae.encoder(pixels))
        posterior = DiagonalGaussianDistribution(moments)
        loss = refine_loss(vae.decode(posterior.sample()).sample, pixels)
        if world_rows:
            with torch.no_grad():
                anchor = trained.quant_conv(trained.encoder(pixels[world_rows]))
            loss = loss + LATENT_ANCHOR * (moments[world_rows] - anchor).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if step % 100 == 0:
            print(f"vae refinement step {step}/{steps} loss {loss.item():.4f} ({clock.spent():.0f} s)", flush=True)
        if clock.save_due() or step == steps:
            pretrain_tiny.save_state(state_path, {
                "vae": vae.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "seconds": clock.spent(),
                "rng": rng.getstate(), "torch_rng": torch.get_rng_state()})
    vae.eval().requires_grad_(False)
    pretrain_tiny.save_state(final, {"vae": vae.state_dict(), "seconds": clock.spent()})
    return vae, clock.spent()


def main(argv: list[str]) -> None:
    torch.set_num_threads(2)
    if argv[:1] == ["measure"]:
        model = argv[1] if len(argv) > 1 else str(MODEL)
        print_rates(read_rates(AutoencoderKL.from_pretrained(model, subfolder="vae").eval()))
    elif argv[:1] == ["blur"]:
        blur_rates()
    elif argv[:1] == ["refine"] and len(argv) >= 2:
        out = Path(argv[1])
        steps = int(argv[2]) if len(argv) > 2 else REFINE_STEPS
        shipped = AutoencoderKL.from_pretrained(str(MODEL), subfolder="vae")
        refined, seconds = refine_vae(shipped, steps, out / "work")
        refined.save_pretrained(out / "vae")
        rates = {"before": read_rates(shipped.eval()), "after": read_rates(refined)}
        (out / "read_rates.json").write_text(json.dumps({"steps": steps, "seconds": round(seconds), **rates}, indent=1))
        for label, measured in rates.items():
            print(f"\n{label}:")
            print_rates(measured)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
