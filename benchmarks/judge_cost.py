"""What judging costs: the measured time to sample one image on the shipped tiny model and on SD 1.4's shapes, and
the minutes to judge N checkpoints x M multipliers from it.

    python benchmarks/judge_cost.py [--checkpoints 6] [--multipliers 3]

Tiny model: the judge's own pipeline (generate.load_pipeline), 25 PNDM steps, guidance 3, 64 px, batches of 8.
SD 1.4's shapes: its UNet (the published config, random weights: the time does not depend on the values), one
guided step = one UNet forward at batch 2 on a 64 x 64 latent (512 px), timed in fp16 on a GPU when there is one,
else in fp32 on the CPU, times 25 steps; text encoding and the VAE decode are left out (under 3 % of a 25-step image on SD 1.4). One judged row
draws (captions <= 8 + 4 editability + 4 prior prompts) x judge_samples_per_prompt images; the base model is one
row more.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import generate  # noqa: E402
from benchmarks.bench_adapters import sd14_models  # noqa: E402
from sdlora import tiny_world  # noqa: E402

STEPS = 25


def tiny_seconds_per_image(images: int = 16) -> float:
    settings = generate.parse_config(["--pretrained_model_name_or_path", str(ROOT / "models/tiny-sd-world"),
                                      "--mixed_precision", "no", "--lora"])
    pipe = generate.load_pipeline(settings, [])
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a sks circle on a white background"] * 8
    tiny_world.sample(pipe, prompts, 0, STEPS)  # warm-up
    started = time.perf_counter()
    for start in range(0, images, 8):
        tiny_world.sample(pipe, prompts, start, STEPS)
    return (time.perf_counter() - started) / images


def sd14_seconds_per_image() -> float:
    """On a GPU in fp16 (as generate.py samples there), else on the CPU in fp32."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    unet, _ = sd14_models()
    unet = unet.to_empty(device=device)
    for parameter in unet.parameters():
        torch.nn.init.normal_(parameter, std=0.02)
    unet = unet.to(dtype).eval()
    latents = torch.randn(2, 4, 64, 64, device=device, dtype=dtype)
    states = torch.randn(2, 77, 768, device=device, dtype=dtype)
    with torch.no_grad():
        unet(latents, 500, states)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        unet(latents, 500, states)
        if device == "cuda":
            torch.cuda.synchronize()
    return (time.perf_counter() - started) * STEPS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=int, default=6)
    parser.add_argument("--multipliers", type=int, default=3)
    parser.add_argument("--images_per_row", type=int, default=32, help="(8 + 4 + 4 prompts) x 2 samples")
    args = parser.parse_args()
    rows = args.checkpoints * args.multipliers + 1
    images = rows * args.images_per_row
    result = {"torch_threads": torch.get_num_threads(), "tiny_s_per_image": tiny_seconds_per_image(),
              "sd14_s_per_image": sd14_seconds_per_image(), "rows": rows, "images": images}
    result["sd14_device"] = "cuda" if torch.cuda.is_available() else "cpu"
    for name in ("tiny", "sd14"):
        result[f"{name}_minutes"] = images * result[f"{name}_s_per_image"] / 60
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
