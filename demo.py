"""Offline demo: build a tiny SD-shaped model with random weights, train a LoRA on the bundled example photos,
then sample from it. Needs no GPU and no download; a few minutes on a laptop CPU.

    python demo.py      # everything lands in demo_output/

It runs the real train_lora.py and generate.py with the flags printed below, so it doubles as a usage example.
Random weights draw noise, not pictures: the demo shows the machinery, not image quality.
"""

import shlex
import shutil
from pathlib import Path

import generate
import train_lora
from tiny_model import build_tiny_sd

DEMO_DIR = Path("demo_output")


def run(script, args: list[str]):
    print(f"\n$ python {script.__name__}.py {shlex.join(args)}\n", flush=True)
    return script.main(script.parse_config(args))


def main() -> None:
    model_dir = DEMO_DIR / "tiny-sd"
    if not (model_dir / "model_index.json").is_file():
        build_tiny_sd(model_dir)
        print(f"built a tiny random SD 1.x model in {model_dir}")
    shutil.rmtree(DEMO_DIR / "lora", ignore_errors=True)  # the demo's own run: start it afresh each time
    lora_path = run(train_lora, [
        "--pretrained_model_name_or_path", str(model_dir), "--dataset_path", "examples/dataset",
        "--output_dir", str(DEMO_DIR / "lora"), "--resolution", "128", "--rank", "8", "--alpha", "8",
        "--learning_rate", "1e-3", "--max_train_steps", "200", "--checkpointing_steps", "100",
        "--validation_steps", "100", "--validation_prompts", "a photo of a cat", "a photo of a rocket",
        "--validation_inference_steps", "20", "--random_flip", "true", "--validation_split", "0.25",
    ])
    run(generate, [
        "--pretrained_model_name_or_path", str(model_dir), "--lora", f"{lora_path}:1.0",
        "--prompt", "a photo of a cat", "--num_images", "4", "--height", "128", "--width", "128",
        "--num_inference_steps", "20", "--output_dir", str(DEMO_DIR / "samples"),
    ])


if __name__ == "__main__":
    main()
