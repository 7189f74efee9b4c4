"""Which settings teach the tiny model a subject? One training of a concept, graded by the world's classifier.

    python benchmarks/subject_recipe.py --concept sks-star --captions named --seed 1 -- --conv_rank 8 --conv_alpha 8
    python benchmarks/subject_recipe.py --class_world 64 -- --class_prompt "a shape" --num_class_images 0 ...

The concept's eight pictures are drawn with one of three caption designs:
  default   the concept's own: "a sks on a white background", "a sks"
  named     the known attributes named, so "sks" has only the shape to carry: "a small yellow sks on a white
            background", "a yellow sks"
  shape     DreamBooth's "a [V] [class]", the class word being "shape": "a small yellow sks shape on a white
            background"; the test prompts gain the class word too ("a sks shape on a white background")
`--class_world N` has the base model draw N pictures of random captions of its own world (sizes, colours, shapes,
backgrounds), each with its caption, as prior-preservation class images: the prior of the whole world is kept, not
only of one class prompt. Training starts from demo.py's recipe, then the flags after `--`. The concept and the
known prompts are sampled with and without the LoRA at the same seeds (`--per_prompt` each) and one JSON line is
printed and appended to benchmarks/results-subject-recipes.jsonl; `grid.png` in the run folder shows the first
24 concept samples and 12 known-prompt samples with the LoRA.

`--trainer example` trains the same data, steps, rank, learning rate, batch and seed the way the diffusers example
does (benchmarks/example_trainer.py: a PEFT LoRA in its loop) instead, for a side-by-side; it takes no flags.
"""

import argparse
import dataclasses
import json
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import generate  # noqa: E402
import train_lora  # noqa: E402
from benchmarks.example_trainer import train_like_example  # noqa: E402
from demo import RECIPE  # noqa: E402
from sdlora import tiny_world  # noqa: E402
from sdlora.sampling import make_grid  # noqa: E402

MODEL = ROOT / "models" / "tiny-sd-world"
RESULTS = ROOT / "benchmarks" / "results-subject-recipes.jsonl"
CAPTIONS = {
    "named": ("a {size} {colour} sks on a {background} background", "a {colour} sks"),
    "shape": ("a {size} {colour} sks shape on a {background} background", "a {colour} sks shape"),
}


def concept_with_captions(name: str, captions: str) -> tiny_world.Concept:
    concept = tiny_world.CONCEPTS[name]
    if captions == "default":
        return concept
    concept = dataclasses.replace(concept, caption_templates=CAPTIONS[captions])
    if captions == "shape":
        prompts = tuple(prompt.replace("a sks", "a sks shape") for prompt in concept.prompts)
        concept = dataclasses.replace(concept, prompts=prompts)
    return concept


def draw_world_class_images(pipe, folder: Path, count: int, seed: int = 5) -> Path:
    """`count` base-model pictures of random world captions, each saved with its caption."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    captions = [tiny_world.caption(tiny_world.random_picture(rng), rng) for _ in range(count)]
    for index, (text, image) in enumerate(zip(captions, tiny_world.sample(pipe, captions, seed=seed))):
        image.save(folder / f"world-{index:03d}.png")
        (folder / f"world-{index:03d}.txt").write_text(text + "\n", encoding="utf-8")
    return folder


def main() -> None:
    own, flags = (sys.argv[1:sys.argv.index("--")], sys.argv[sys.argv.index("--") + 1:]) if "--" in sys.argv \
        else (sys.argv[1:], [])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concept", default="sks-star", choices=sorted(tiny_world.CONCEPTS))
    parser.add_argument("--captions", default="default", choices=("default", *CAPTIONS))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--per_prompt", type=int, default=12)
    parser.add_argument("--class_world", type=int, default=0, help="world class images to draw; 0: none")
    parser.add_argument("--trainer", default="suite", choices=("suite", "example"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / ".subject-recipe"), help="the run folder (replaced)")
    args = parser.parse_args(own)
    if args.trainer == "example" and (flags or args.class_world):
        parser.error("--trainer example trains as the diffusers example does, with demo.py's recipe: no flags, "
                     "no --class_world")
    concept, out = concept_with_captions(args.concept, args.captions), Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    settings = generate.parse_config(["--pretrained_model_name_or_path", str(MODEL), "--mixed_precision", "no"])
    base = generate.load_pipeline(settings, [])
    base.set_progress_bar_config(disable=True)
    if args.class_world:
        flags = ["--class_data_path", str(draw_world_class_images(base, out / "class", args.class_world)), *flags]
    started, data = time.time(), tiny_world.write_concept_dataset(concept, out / "data")
    if args.trainer == "example":
        recipe = dict(zip(RECIPE[::2], RECIPE[1::2]))
        lora = train_like_example(
            MODEL, data, out / "run" / "pytorch_lora_weights.safetensors", rank=int(recipe["--rank"]),
            learning_rate=float(recipe["--learning_rate"]), batch=int(recipe["--train_batch_size"]),
            steps=int(recipe["--max_train_steps"]), warmup=int(recipe["--lr_warmup_steps"]),
            scheduler=recipe["--lr_scheduler"], seed=args.seed)
    else:
        lora = train_lora.main(train_lora.parse_config([
            "--pretrained_model_name_or_path", str(MODEL), "--output_dir", str(out / "run"), *RECIPE,
            "--dataset_path", str(data), "--seed", str(args.seed),
            "--sample_steps", "0", "--checkpointing_steps", "0", "--interop_check", "false", *flags]))
    train_seconds = time.time() - started
    with_lora = generate.load_pipeline(settings, [(lora, 1.0)])
    with_lora.set_progress_bar_config(disable=True)
    report = tiny_world.grade_lora(base, with_lora, concept, samples_per_prompt=args.per_prompt)
    known = [p for p in tiny_world.KNOWN_PROMPTS for _ in range(args.per_prompt)]
    by_attribute = tiny_world.score(list(zip(known, report.images["prior_lora"])))
    own_flags = flags[2:] if args.class_world else flags  # the class folder's path is not a setting
    result = {"concept": concept.name, "trainer": args.trainer, "captions": args.captions, "class_world": args.class_world,
              "seed": args.seed, "per_prompt": args.per_prompt, "flags": " ".join(own_flags),
              "train_seconds": round(train_seconds), "concept_base": round(report.concept_base, 3),
              "concept_lora": round(report.concept_lora, 3), "prior_base": round(report.prior_base, 3),
              "prior_lora": round(report.prior_lora, 3),
              "prior_lora_by_attribute": {name: f"{hit}/{total}" for name, (hit, total) in by_attribute.items()}}
    make_grid(report.images["concept_lora"][:24] + report.images["prior_lora"][:12], columns=12).save(out / "grid.png")
    with RESULTS.open("a", encoding="utf-8") as results:
        results.write(json.dumps(result) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
