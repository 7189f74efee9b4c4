"""What the subject-training options cost: step time, peak memory and optimizer state, per option.

    python benchmarks/bench_options.py          # about 3 minutes on a 2-core CPU

Each option trains demo.py's sks-purple pictures on the shipped tiny model (64 px, batch 4, rank 8) for STEPS
optimizer steps in its own process: seconds per optimizer step (median of the steps after the first 10, from the
loss log), peak resident memory of the process, and the optimizer state its checkpoint holds (bytes per trained
LoRA parameter). For SD 1.4's shape the LoRA parameter counts are counted on its UNet built on the meta device (no
weights), and the optimizer state is those counts times the bytes per parameter measured here.
Results: benchmarks/results-options.json and a printed table.
"""

import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

MODEL = ROOT / "models" / "tiny-sd-world"
STEPS = 60
OPTIONS = {  # name: flags after the common ones
    "adamw (baseline)": [],
    "adamw8bit": ["--optimizer", "adamw8bit"],
    "prodigy": ["--optimizer", "prodigy", "--learning_rate", "1.0"],
    "adafactor": ["--optimizer", "adafactor"],
    "lion": ["--optimizer", "lion", "--learning_rate", "3e-4"],
    "conv_rank 8 (LoCon)": ["--conv_rank", "8", "--conv_alpha", "8"],
    "prior preservation": ["--class_data_path", "{class_images}", "--class_prompt", "a triangle on a black background",
                           "--num_class_images", "8"],
}


def run_one(flags: list[str]) -> dict:
    """Child process: train, then report step times, peak RSS and the checkpoint's optimizer state."""
    from sdlora import tiny_world
    import train_lora
    from sdlora.checkpoints import STATE_TENSORS
    from safetensors import safe_open

    with tempfile.TemporaryDirectory() as work:
        data = tiny_world.write_concept_dataset(tiny_world.CONCEPTS["sks-purple"], Path(work) / "data")
        flags = [flag.replace("{class_images}", str(Path(work) / "class")) for flag in flags]
        cfg = train_lora.parse_config([
            "--pretrained_model_name_or_path", str(MODEL), "--dataset_path", str(data), "--output_dir",
            str(Path(work) / "out"), "--resolution", "64", "--rank", "8", "--alpha", "8", "--learning_rate", "1e-3",
            "--train_batch_size", "4", "--max_train_steps", str(STEPS), "--checkpointing_steps", str(STEPS),
            "--sample_steps", "0", "--sample_prompts", "--interop_check", "false", *flags])
        train_lora.main(cfg)
        rows = [json.loads(line) for line in (Path(work) / "out" / "loss_log.jsonl").read_text().splitlines()]
        with safe_open(str(Path(work) / "out" / f"checkpoint-{STEPS}" / STATE_TENSORS), "pt") as f:
            # 8-bit AdamW's two 256-entry quantisation maps are one pair shared by all parameters (the checkpoint
            # keeps a copy per parameter): left out, as they do not grow with the LoRA.
            state = [f.get_tensor(k) for k in f.keys() if k.startswith("optimizer.") and "/qmap" not in k]
            state_bytes = sum(t.numel() * t.element_size() for t in state)
        with safe_open(str(Path(work) / "out" / "pytorch_lora_weights.safetensors"), "pt") as f:
            lora_parameters = sum(f.get_tensor(k).numel() for k in f.keys() if not k.endswith(".alpha"))
    times = [b["time"] - a["time"] for a, b in zip(rows, rows[1:])][10:]
    return {"step_seconds": statistics.median(times), "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "optimizer_state_bytes": state_bytes, "lora_parameters": lora_parameters}


def sd14_lora_parameters(rank: int, conv_rank: int) -> int:
    """LoRA parameters on SD 1.4's UNet (attention projections at `rank`, 3x3 convs at `conv_rank`), counted on a
    UNet built on the meta device."""
    from diffusers import UNet2DConditionModel

    from lora_diffusion import inject_trainable_lora

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
            attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
        network = inject_trainable_lora(unet, rank=rank, alpha=rank, conv_rank=conv_rank, conv_alpha=conv_rank)
    return sum(p.numel() for p in network.parameters())


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--one":
        print(json.dumps(run_one(json.loads(sys.argv[2]))))
        return
    results = {}
    for name, flags in OPTIONS.items():
        print(f"  {name} ...", end=" ", flush=True)
        done = subprocess.run([sys.executable, __file__, "--one", json.dumps(flags)], capture_output=True, text=True,
                              cwd=ROOT)
        if done.returncode != 0:
            raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(results[name], flush=True)
    sd14 = {"rank 4": sd14_lora_parameters(4, 0), "rank 4 + conv_rank 8": sd14_lora_parameters(4, 8)}
    baseline = results["adamw (baseline)"]
    print(f"\ntiny model, 64 px, batch 4, rank 8, {STEPS} steps; SD 1.4 LoRA parameters: "
          + ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in sd14.items()))
    print("| option | s/step | x baseline | peak RSS MiB | optimizer state B/param | SD 1.4 rank-4 state MiB |\n"
          "|---|---|---|---|---|---|")
    for name, measured in results.items():
        per_parameter = measured["optimizer_state_bytes"] / measured["lora_parameters"]
        parameters = sd14["rank 4 + conv_rank 8"] if "conv_rank" in name else sd14["rank 4"]
        print(f"| {name} | {measured['step_seconds']:.3f} | {measured['step_seconds'] / baseline['step_seconds']:.2f} | "
              f"{measured['peak_mb']:.0f} | {per_parameter:.2f} | {per_parameter * parameters / 2**20:.1f} |")
    out = ROOT / "benchmarks" / "results-options.json"
    out.write_text(json.dumps({"steps": STEPS, "options": OPTIONS, "results": results, "sd14_lora_parameters": sd14},
                              indent=2) + "\n", encoding="utf-8")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
