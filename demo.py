"""Offline demo: teach the shipped tiny model a concept it has never seen, and show that it learned it.

    python demo.py                      # a style: "sks" paints known shapes in purple, a colour it never saw
    python demo.py --concept sks-star   # a subject: "sks" is a star, a shape it never saw
    python demo.py --name prodigy -- --optimizer prodigy --learning_rate 1.0   # flags after -- go to train_lora.py

The model in models/tiny-sd-world/ was pretrained by pretrain_tiny.py on a world of coloured shapes with purple
and stars held out. The demo draws eight pictures of the concept, trains a LoRA on them with the real
train_lora.py (the command is printed), then samples the concept prompts and two known prompts with and without
the LoRA through generate.py's loader and grades every image with the world's classifier (its earlier palette
reader's figures printed beside). Everything lands in demo_output/: the run (report.html shows the figures and the
before/after grid), and before_after.png.
A few minutes on a laptop CPU; needs no GPU and no download.
"""

import argparse
import json
import shlex
import shutil
import sys
from pathlib import Path

from PIL import Image, ImageDraw

import generate
from sdlora import tiny_world
import train_lora
from sdlora.report import LEARNING_GRID_NAME, LEARNING_NAME, write_report
from sdlora.settings import ConfigError

DEMO_DIR = Path("demo_output")
MODEL_DIR = Path("models/tiny-sd-world")
# The recipe that learns a concept on the tiny model (README: "The default recipe"). Rank, alpha, targets and the
# trigger word carry over to SD 1.4; the learning rate, step count and resolution are the tiny model's.
RECIPE = ["--resolution", "64", "--rank", "8", "--alpha", "8", "--learning_rate", "1e-3",
          "--train_batch_size", "4", "--max_train_steps", "600", "--lr_warmup_steps", "30",
          "--lr_scheduler", "constant_with_warmup"]
SHARES_TO_REACH = {"concept_lora": 0.9, "prior_lora": 0.9}  # and the base must not already draw it:
BASE_CONCEPT_AT_MOST = 0.1
GRADING = (f"tiny_world.classify: shape = best clean prototype by outline IoU >= {tiny_world.SHAPE_WITHIN_IOU}, "
           f"colour = nearest named colour within {tiny_world.COLOUR_WITHIN_DE00} CIEDE2000, else 'other'")
PALETTE_GRADING = ("tiny_world.classify_by_palette: colour = nearest named colour in RGB however far, "
                   "shape by fill and taper with star for anything else")


def run_training(args: list[str]) -> Path:
    print(f"\n$ python train_lora.py {shlex.join(args)}\n", flush=True)
    return train_lora.main(train_lora.parse_config(args))


def labelled_rows(rows: list[tuple[str, list[Image.Image]]], side: int = 64, zoom: int = 2) -> Image.Image:
    """One row of images per label, the label written above its row, images enlarged `zoom` times."""
    columns = max(len(images) for _, images in rows)
    cell, label_height = side * zoom, 18
    sheet = Image.new("RGB", (columns * cell, len(rows) * (cell + label_height)), "white")
    pen = ImageDraw.Draw(sheet)
    for row, (label, images) in enumerate(rows):
        top = row * (cell + label_height)
        pen.text((4, top + 3), label, fill="black")
        for column, image in enumerate(images):
            sheet.paste(image.resize((cell, cell), Image.NEAREST), (column * cell, top + label_height))
    return sheet


def before_after_grid(report: tiny_world.LearningReport, concept: tiny_world.Concept, per_prompt: int) -> Image.Image:
    """Base vs LoRA on the first concept prompt and on each known prompt, same seeds side by side."""
    rows = []
    prompt_sets = [("concept", concept.prompts[:1])] + [("prior", (p,)) for p in tiny_world.KNOWN_PROMPTS]
    all_prompts = {"concept": concept.prompts, "prior": tiny_world.KNOWN_PROMPTS}
    for kind, (prompt,) in prompt_sets:
        start = all_prompts[kind].index(prompt) * per_prompt
        for label in ("base", "lora"):
            images = report.images[f"{kind}_{label}"][start:start + per_prompt]
            rows.append((f"{'base model' if label == 'base' else 'with the LoRA'}: {prompt}", images))
    return labelled_rows(rows)


def known_prompt_shares(report: tiny_world.LearningReport, per_prompt: int,
                        reader: tiny_world.Reader = tiny_world.classify) -> dict[str, tuple[float, float]]:
    """Each known prompt's share of asked attributes drawn, (base, with the LoRA), as `reader` sees them."""
    shares = {}
    for index, prompt in enumerate(tiny_world.KNOWN_PROMPTS):
        part = slice(index * per_prompt, (index + 1) * per_prompt)
        shares[prompt] = tuple(tiny_world.attribute_share([prompt] * per_prompt,
                                                          report.images[f"prior_{label}"][part], reader)
                               for label in ("base", "lora"))
    return shares


def figures_of(report: tiny_world.LearningReport) -> dict[str, float]:
    return {name: getattr(report, name) for name in ("concept_base", "concept_lora", "prior_base", "prior_lora")}


def grade_run(model: str, lora_path: Path, concept: tiny_world.Concept, run_dir: Path, per_prompt: int) -> bool:
    """Sample the same prompts and seeds with and without the LoRA through generate.py's loader (fused weights),
    grade them under both readers, write learning.json, learning.png and the report, print the figures; True when
    the demo's levels are reached."""
    settings = generate.parse_config(["--pretrained_model_name_or_path", model, "--mixed_precision", "no"])
    base = generate.load_pipeline(settings, [])
    with_lora = generate.load_pipeline(settings, [(lora_path, 1.0)])
    for pipe in (base, with_lora):
        pipe.set_progress_bar_config(disable=True)
    report = tiny_world.grade_lora(base, with_lora, concept, samples_per_prompt=per_prompt)
    # The same images under the earlier palette grading (nearest RGB colour, star for any concave blob), beside.
    by_palette = tiny_world.grade(report.images, concept, per_prompt, tiny_world.classify_by_palette)
    before_after_grid(report, concept, per_prompt).save(run_dir / LEARNING_GRID_NAME)
    figures = figures_of(report)
    by_prompt = known_prompt_shares(report, per_prompt)
    by_prompt_palette = known_prompt_shares(report, per_prompt, tiny_world.classify_by_palette)
    (run_dir / LEARNING_NAME).write_text(json.dumps({
        "concept": concept.name, "kind": concept.kind, "reads": f"{concept.attribute} == {concept.value}",
        "grading": GRADING, "concept_prompts": list(concept.prompts), "known_prompts": list(tiny_world.KNOWN_PROMPTS),
        "samples_per_prompt": per_prompt, **figures, "known_by_prompt": by_prompt,
        "palette_grading": {"grading": PALETTE_GRADING, **figures_of(by_palette), "known_by_prompt": by_prompt_palette},
    }, indent=2) + "\n", encoding="utf-8")
    write_report(run_dir)

    print(f"\nwhat the LoRA learned ({concept.kind} {concept.name!r}, graded by tiny_world.classify; "
          f"[the earlier palette grading, tiny_world.classify_by_palette, of the same images]):")
    for line in report.lines(beside=by_palette):
        print(f"  {line}")
    for prompt, (base_share, lora_share) in by_prompt.items():
        old_base, old_lora = by_prompt_palette[prompt]
        print(f"    {prompt!r}: {base_share:.0%} base, {lora_share:.0%} with the LoRA   "
              f"[palette grading: {old_base:.0%}, {old_lora:.0%}]")
    reached = (all(figures[name] >= level for name, level in SHARES_TO_REACH.items())
               and figures["concept_base"] <= BASE_CONCEPT_AT_MOST)
    print(f"  {'reached' if reached else 'MISSED'}: concept >= 90 % with the LoRA and <= 10 % without, "
          f"known prompts >= 90 %")
    print(f"before/after grid: {run_dir / LEARNING_GRID_NAME}; report: {run_dir / 'report.html'}")
    return reached


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, training_flags = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="flags after -- are passed to train_lora.py after the recipe's, so they "
                                            "override it: python demo.py -- --optimizer lion --learning_rate 3e-4")
    parser.add_argument("--concept", choices=sorted(tiny_world.CONCEPTS), default="sks-purple")
    parser.add_argument("--model", default=str(MODEL_DIR), help="the pretrained tiny model folder")
    parser.add_argument("--name", default="", help="the run's folder under demo_output/ (default: the concept)")
    parser.add_argument("--samples_per_prompt", type=int, default=6, help="graded samples of each test prompt")
    args = parser.parse_args(own)
    concept = tiny_world.CONCEPTS[args.concept]
    run_dir = DEMO_DIR / (args.name or concept.name)
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo's own run: start it afresh each time
    data_dir = tiny_world.write_concept_dataset(concept, DEMO_DIR / f"{concept.name}-data")
    print(f"{concept.kind} concept {concept.name!r}: 8 pictures with captions in {data_dir}")
    lora_path = run_training([
        "--pretrained_model_name_or_path", args.model, "--dataset_path", str(data_dir), "--output_dir", str(run_dir),
        *RECIPE, "--checkpointing_steps", "300", "--sample_steps", "300", "--sample_guidance_scale", str(tiny_world.GUIDANCE),
        "--sample_prompts", concept.prompts[0], *tiny_world.KNOWN_PROMPTS, *training_flags,
    ])

    # Grade: the same prompts and seeds with and without the LoRA, under the current and the earlier reader.
    reached = grade_run(args.model, lora_path, concept, run_dir, args.samples_per_prompt)
    if not args.name:  # the default demo's grid, where the README points
        shutil.copyfile(run_dir / LEARNING_GRID_NAME, DEMO_DIR / "before_after.png")
    return 0 if reached else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as error:
        sys.exit(f"error: {error}")
