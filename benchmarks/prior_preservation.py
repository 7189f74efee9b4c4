"""Does prior preservation keep the class word's meaning? Measured on the shipped tiny model with its classifier.

    python benchmarks/prior_preservation.py            # about 5 minutes on a 2-core CPU
    python benchmarks/prior_preservation.py --train_text_encoder true   # flags go to both trainings

demo.py's style concept (sks-purple: "a sks triangle on a black background" is purple) is trained twice with
demo.py's recipe, once alone and once with prior preservation, the class prompt being the captions without the
trigger word: "a triangle on a black background" (the base model draws those in the four colours it knows, never
purple; it draws the 100 class images). A LoRA whose style leaks into the plain class words makes plain
triangles purple. For the base model and both LoRAs, the same seeds are sampled on
  class    the class prompt: purple share (the leak) and its asked attributes kept (shape, background)
  control  "a circle on a white background", a plain prompt the class images do not cover
  concept  the trigger prompt: purple share (the style learned)
and written to benchmarks/results-prior-preservation[-<flags>].json.
"""

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import generate  # noqa: E402
from sdlora import tiny_world  # noqa: E402
import train_lora  # noqa: E402
from demo import RECIPE  # noqa: E402

MODEL = ROOT / "models" / "tiny-sd-world"
WORK = ROOT / "benchmarks" / ".prior-preservation"
PROMPTS = {"class": "a triangle on a black background", "control": "a circle on a white background",
           "concept": "a sks triangle on a black background"}
SAMPLES = 48  # per prompt and model


def train(name: str, *extra: str) -> Path:
    """demo.py's recipe on the sks-purple pictures, then `extra` flags."""
    data = tiny_world.write_concept_dataset(tiny_world.CONCEPTS["sks-purple"], WORK / "data")
    cfg = train_lora.parse_config([
        "--pretrained_model_name_or_path", str(MODEL), "--dataset_path", str(data), "--output_dir", str(WORK / name),
        *RECIPE, "--checkpointing_steps", "0", "--sample_steps", "0", "--sample_prompts",
        "--sample_guidance_scale", str(tiny_world.GUIDANCE), "--interop_check", "false", *extra])
    started = time.perf_counter()
    path = train_lora.main(cfg)
    print(f"{name}: trained in {time.perf_counter() - started:.0f} s", flush=True)
    return path


def grade(pipe) -> dict[str, float]:
    figures = {}
    for kind, prompt in PROMPTS.items():
        images = tiny_world.sample(pipe, [prompt] * SAMPLES, seed=0)
        figures[f"{kind}_purple"] = tiny_world.share(images, "colour", "purple")
        if kind != "concept":
            figures[f"{kind}_kept"] = tiny_world.attribute_share([prompt] * SAMPLES, images)
    return figures


def main(flags: list[str]) -> int:
    tag = "".join(f"-{flag.lstrip('-')}" for flag in flags)
    loras = {"without prior preservation": train("alone" + tag, *flags),
             "with prior preservation": train("prior" + tag, *flags, "--class_data_path", str(WORK / "class-images"),
                                              "--class_prompt", PROMPTS["class"])}
    settings = generate.parse_config(["--pretrained_model_name_or_path", str(MODEL), "--mixed_precision", "no"])
    results = {}
    for label, loras_fused in [("base model", [])] + [(label, [(path, 1.0)]) for label, path in loras.items()]:
        pipe = generate.load_pipeline(settings, loras_fused)
        pipe.set_progress_bar_config(disable=True)
        results[label] = grade(pipe)
    print(f"\n{SAMPLES} samples per prompt, guidance {tiny_world.GUIDANCE}; class prompt {PROMPTS['class']!r}, "
          f"control {PROMPTS['control']!r}, concept {PROMPTS['concept']!r}")
    print("| | class purple | class kept | control purple | control kept | concept purple |\n|---|---|---|---|---|---|")
    for label, figures in results.items():
        print(f"| {label} | {figures['class_purple']:.0%} | {figures['class_kept']:.0%} | "
              f"{figures['control_purple']:.0%} | {figures['control_kept']:.0%} | {figures['concept_purple']:.0%} |")
    out = ROOT / "benchmarks" / f"results-prior-preservation{tag}.json"
    out.write_text(json.dumps({"samples_per_prompt": SAMPLES, "prompts": PROMPTS, "recipe": RECIPE + flags,
                               "results": results}, indent=2) + "\n", encoding="utf-8")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
