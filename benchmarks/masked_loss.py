"""Does masked_loss keep a LoRA from learning the background? One concept on a distracting background, trained with
and without its masks, graded by the world's classifier.

    python benchmarks/masked_loss.py                     # both runs, demo.py's recipe
    python benchmarks/masked_loss.py --per_prompt 6 -- --max_train_steps 300

The concept is sks-purple's (purple circles, squares and triangles, captioned "a sks circle on a white
background", ...), but every picture is drawn on a lime background no prompt of the world names, while its caption
still names white, gray or black. Without masks the LoRA learns the lime with the shapes; with masks (white where
the shape is) only the shapes count. Graded with and without the LoRA at the same seeds: the concept's colour, and
how often the background the prompt names is drawn, on the concept prompts and on the known prompts. One JSON line
per run is printed and appended to benchmarks/results-masked-loss.jsonl.
"""

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import generate  # noqa: E402
import train_lora  # noqa: E402
from demo import RECIPE  # noqa: E402
from sdlora import tiny_world  # noqa: E402

MODEL = ROOT / "models" / "tiny-sd-world"
RESULTS = ROOT / "benchmarks" / "results-masked-loss.jsonl"
DISTRACTOR = (170, 220, 60)  # lime: no background of the world, read as gray by tiny_world.classify's nearest


def write_dataset(concept: tiny_world.Concept, folder: Path, masks: Path, count: int = 8, seed: int = 0) -> None:
    """write_concept_dataset's pictures and captions, each drawn on DISTRACTOR instead of the background its
    caption names, and each shape's mask (white on black) in `masks`."""
    folder.mkdir(parents=True)
    masks.mkdir(parents=True)
    rng = random.Random(seed)
    for index in range(count):
        shape = concept.shapes[index % len(concept.shapes)]
        background = tuple(tiny_world.BACKGROUNDS)[(index // len(concept.shapes)) % len(tiny_world.BACKGROUNDS)]
        picture = tiny_world.Picture(shape, concept.colour, background, tiny_world.SIZES[(index // 2) % 2])
        side = rng.uniform(*tiny_world.SIZE_PX[picture.size])  # as tiny_world.draw places a shape
        margin = side / 2 + 3
        size = tiny_world.IMAGE_SIZE
        centre = (rng.uniform(margin, size - margin), rng.uniform(margin, size - margin))
        fill = tiny_world.ALL_COLOURS[concept.colour]
        tiny_world.draw_shape(shape, fill, DISTRACTOR, side, centre).save(folder / f"{index:02d}.png")
        mask = tiny_world.draw_shape(shape, (255, 255, 255), (0, 0, 0), side, centre).convert("L")
        mask.point(lambda value: 255 if value >= 128 else 0).save(masks / f"{index:02d}.png")
        text = concept.caption_templates[index % len(concept.caption_templates)].format(**vars(picture))
        (folder / f"{index:02d}.txt").write_text(text + "\n", encoding="utf-8")


def background_share(prompts: list[str], images: list[Image.Image]) -> float:
    """Share of the images whose background is the one their prompt names (prompts naming none left out)."""
    hit, total = tiny_world.score(list(zip(prompts, images))).get("background", (0, 0))
    return hit / total if total else float("nan")


def main() -> None:
    own, flags = (sys.argv[1:sys.argv.index("--")], sys.argv[sys.argv.index("--") + 1:]) if "--" in sys.argv \
        else (sys.argv[1:], [])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per_prompt", type=int, default=12)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / ".masked-loss"), help="the run folder (replaced)")
    args = parser.parse_args(own)
    out, concept = Path(args.out), tiny_world.CONCEPTS["sks-purple"]
    shutil.rmtree(out, ignore_errors=True)
    write_dataset(concept, out / "data", out / "masks")
    settings = generate.parse_config(["--pretrained_model_name_or_path", str(MODEL), "--mixed_precision", "no"])
    base = generate.load_pipeline(settings, [])
    base.set_progress_bar_config(disable=True)
    for masked in (False, True):
        mask_flags = ["--masked_loss", "true", "--mask_path", str(out / "masks")] if masked else []
        started = time.time()
        lora = train_lora.main(train_lora.parse_config([
            "--pretrained_model_name_or_path", str(MODEL), "--output_dir", str(out / f"run-masked-{masked}"),
            *RECIPE, "--dataset_path", str(out / "data"), "--seed", str(args.seed), "--sample_steps", "0",
            "--checkpointing_steps", "0", "--interop_check", "false", *mask_flags, *flags]))
        train_seconds = time.time() - started
        with_lora = generate.load_pipeline(settings, [(lora, 1.0)])
        with_lora.set_progress_bar_config(disable=True)
        report = tiny_world.grade_lora(base, with_lora, concept, samples_per_prompt=args.per_prompt)
        concept_prompts = [p for p in concept.prompts for _ in range(args.per_prompt)]
        known_prompts = [p for p in tiny_world.KNOWN_PROMPTS for _ in range(args.per_prompt)]
        result = {"masked_loss": masked, "seed": args.seed, "per_prompt": args.per_prompt, "flags": " ".join(flags),
                  "train_seconds": round(train_seconds), "concept_lora": round(report.concept_lora, 3),
                  "concept_background_base": round(background_share(concept_prompts, report.images["concept_base"]), 3),
                  "concept_background_lora": round(background_share(concept_prompts, report.images["concept_lora"]), 3),
                  "known_background_base": round(background_share(known_prompts, report.images["prior_base"]), 3),
                  "known_background_lora": round(background_share(known_prompts, report.images["prior_lora"]), 3),
                  "known_attributes_base": round(report.prior_base, 3),
                  "known_attributes_lora": round(report.prior_lora, 3)}
        with RESULTS.open("a", encoding="utf-8") as results:
            results.write(json.dumps(result) + "\n")
        print(json.dumps(result))


if __name__ == "__main__":
    main()
