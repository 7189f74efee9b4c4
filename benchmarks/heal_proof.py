"""A planted divergence on the shipped tiny model: does the run heal and still learn the concept?

    python benchmarks/heal_proof.py OUT_DIR [--concept sks-purple] [--first_bad_step 350] [--bad_steps 5]

Trains demo.py's recipe (checkpoints every 100 steps) with the loss made non-finite at steps first_bad_step ..
first_bad_step + bad_steps - 1 of the first pass (a transient divergence: the replay after the rollback is finite),
max_nonfinite_steps 5 and the default healing (nonfinite_retries 2, nonfinite_lr_factor 0.5). Prints heals.jsonl,
then grades the final LoRA with the world's classifier exactly as demo.py does (6 samples per prompt, same seeds with
and without the LoRA).
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import demo  # noqa: E402
import train_lora  # noqa: E402
from sdlora import tiny_world, training_step  # noqa: E402
from sdlora.run_files import HEALS_LOG_NAME  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir")
    parser.add_argument("--concept", default="sks-purple", choices=("sks-purple", "sks-star"))
    parser.add_argument("--first_bad_step", type=int, default=350)
    parser.add_argument("--bad_steps", type=int, default=5)
    args = parser.parse_args()
    concept = tiny_world.CONCEPTS[args.concept]
    out = Path(args.output_dir)
    data = tiny_world.write_concept_dataset(concept, out / f"{concept.name}-data")
    run = out / "healed"
    bad = set(range(args.first_bad_step, args.first_bad_step + args.bad_steps))  # batch 4: one loss per step
    original, calls = training_step.diffusion_loss, {"n": 0}

    def planted_loss(*a, **k):
        calls["n"] += 1
        value = original(*a, **k)
        return value * float("nan") if calls["n"] in bad else value

    training_step.diffusion_loss = planted_loss
    flags = ["--pretrained_model_name_or_path", str(demo.MODEL_DIR), "--dataset_path", str(data), "--output_dir",
             str(run), *demo.RECIPE, "--checkpointing_steps", "100", "--checkpoints_total_limit", "0",
             "--sample_steps", "0", "--sample_guidance_scale", str(tiny_world.GUIDANCE), "--sample_prompts",
             concept.prompts[0], "--interop_check", "false"]
    print("$ python train_lora.py " + " ".join(flags) + f"   (loss NaN at steps {sorted(bad)} of the first pass)")
    final = train_lora.main(train_lora.parse_config(flags))
    training_step.diffusion_loss = original
    print((run / HEALS_LOG_NAME).read_text(encoding="utf-8"))
    demo.grade_run(str(demo.MODEL_DIR), final, concept, run, 6)


if __name__ == "__main__":
    main()
