"""What each adapter type (network_type lora | dora | loha | lokr) costs and learns.

    python benchmarks/bench_adapters.py --part sd14    # parameters and file size on SD 1.4's shapes (seconds)
    python benchmarks/bench_adapters.py --part tiny    # learning on the shipped tiny model (about 2 min per run)

sd14: SD 1.4's UNet and CLIP text encoder built on the meta device from their published configs (no weights, no
download), each type injected at the default ranks (rank 4, alpha 4, the attention projections) and with the
text encoder and LoCon's 3x3 convolutions (conv_rank 8) too; the trainable parameters counted, and the file's size
measured by writing the network's file with zero weights of the same shapes (weights and the network's header).

tiny: demo.py's recipe (demo.RECIPE: 64 px, rank 8, alpha 8, lr 1e-3, batch 4, 600 steps, the same seeds) on its
style concept (sks-purple) and subject concept (sks-star), one process per run: seconds per optimizer step (median
after the first 10, from the loss log), the process's peak resident memory, the file's size, then the demo's
grading (tiny_world.grade_lora: the concept's share of concept-prompt samples, and the known prompts' attributes
kept) with and without the LoRA, fused as generate.py fuses it.
Results: benchmarks/results-adapters.json (each part updates its own key) and a printed table.
"""

import argparse
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
from torch import nn  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results-adapters.json"
MODEL = ROOT / "models" / "tiny-sd-world"
TYPES = ("lora", "dora", "loha", "lokr")
CONCEPTS = ("sks-purple", "sks-star")


def sd14_models():
    """SD 1.4's UNet and text encoder on the meta device (../SD14_ARCH facts: the published configs)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
            attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
            max_position_embeddings=77, hidden_act="quick_gelu"))
    return unet, text_encoder


def zero_weights_on_cpu(network) -> None:
    """Replace every adapter parameter (built on the meta device like its base) by CPU zeros of its shape, so the
    network's file can be written; the frozen bases stay on meta."""
    for layer in network.layers.values():
        for name, parameter in list(layer.named_parameters()):
            if name.startswith("base."):
                continue
            owner_path, _, attribute = name.rpartition(".")
            owner = layer.get_submodule(owner_path) if owner_path else layer
            setattr(owner, attribute, nn.Parameter(torch.zeros(parameter.shape)))


def measure_sd14() -> dict:
    from lora_diffusion import AdapterSpec, inject_trainable_lora

    rows = {}
    for network_type in TYPES:
        for label, extra in (("attention", {}),
                             ("attention + text encoder + conv_rank 8", {"text_encoder": True, "conv_rank": 8})):
            unet, text_encoder = sd14_models()
            network = inject_trainable_lora(
                unet, rank=4, alpha=4.0, text_encoder=text_encoder if extra.get("text_encoder") else None,
                conv_rank=extra.get("conv_rank", 0), conv_alpha=float(extra.get("conv_rank", 1)),
                spec=AdapterSpec(network_type))
            parameters = sum(p.numel() for p in network.parameters())
            zero_weights_on_cpu(network)
            with tempfile.TemporaryDirectory() as work:
                size = network.save(Path(work) / "file.safetensors").stat().st_size
            rows[f"{network_type}, {label}"] = {"network_type": network_type, "targets": label,
                                                "modules": len(network.layers), "parameters": parameters,
                                                "file_bytes": size}
            print(f"  {network_type:5s} {label:40s} {len(network.layers):4d} modules {parameters / 1e6:8.3f} M "
                  f"parameters {size / 2**20:8.2f} MiB", flush=True)
    return rows


def run_tiny(network_type: str, concept_name: str, steps: int, per_prompt: int, model: Path = MODEL) -> dict:
    """Child process: train with the demo's recipe, grade as the demo does."""
    import demo
    import generate
    import train_lora
    from sdlora import tiny_world

    concept = tiny_world.CONCEPTS[concept_name]
    with tempfile.TemporaryDirectory() as work:
        data = tiny_world.write_concept_dataset(concept, Path(work) / "data")
        recipe = list(demo.RECIPE)
        recipe[recipe.index("--max_train_steps") + 1] = str(steps)
        cfg = train_lora.parse_config([
            "--pretrained_model_name_or_path", str(model), "--dataset_path", str(data), "--output_dir",
            str(Path(work) / "out"), *recipe, "--checkpointing_steps", "0", "--sample_steps", "0",
            "--sample_prompts", "--interop_check", "false", "--network_type", network_type])
        path = train_lora.main(cfg)
        rows = [json.loads(line) for line in (Path(work) / "out" / "loss_log.jsonl").read_text().splitlines()]
        times = [b["time"] - a["time"] for a, b in zip(rows, rows[1:])][10:] or [rows[-1]["time"] - rows[0]["time"]]
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        settings = generate.parse_config(["--pretrained_model_name_or_path", str(model), "--mixed_precision", "no"])
        base, with_lora = generate.load_pipeline(settings, []), generate.load_pipeline(settings, [(path, 1.0)])
        for pipe in (base, with_lora):
            pipe.set_progress_bar_config(disable=True)
        report = tiny_world.grade_lora(base, with_lora, concept, samples_per_prompt=per_prompt)
        return {"network_type": network_type, "concept": concept_name, "steps": steps,
                "step_seconds": statistics.median(times), "peak_mb": peak_mb, "file_bytes": path.stat().st_size,
                "parameters": sum(t.numel() for key, t in _tensors(path).items() if not key.endswith(".alpha")),
                **{name: getattr(report, name) for name in ("concept_base", "concept_lora", "prior_base",
                                                            "prior_lora")}}


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def measure_tiny(types: list[str], concepts: list[str], steps: int, per_prompt: int, model: Path) -> dict:
    done = json.loads(RESULTS.read_text()).get("tiny", {}) if RESULTS.exists() and model == MODEL else {}
    for concept in concepts:
        for network_type in types:
            name = f"{network_type}, {concept}"
            print(f"  {name} ...", end=" ", flush=True)
            child = subprocess.run([sys.executable, __file__, "--one", network_type, concept, str(steps),
                                    str(per_prompt), str(model)], capture_output=True, text=True, cwd=ROOT)
            if child.returncode != 0:
                raise SystemExit(f"{name} failed:\n{child.stderr[-3000:]}")
            done[name] = json.loads(child.stdout.strip().splitlines()[-1])
            print(done[name], flush=True)
            if model == MODEL:  # another model (a trial of this script) is not the measurement
                save("tiny", done)  # after each run, so an interrupted part keeps what it measured
    return done


def save(part: str, rows: dict) -> None:
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[part] = rows
    results.setdefault("commands", {})[part] = "python benchmarks/bench_adapters.py --part " + part
    RESULTS.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


def print_tiny_table(rows: dict) -> None:
    print("| type | concept | concept drawn, base -> LoRA | known prompts kept, base -> LoRA | parameters | file KiB | "
          "s/step | peak RSS MiB |\n|---|---|---|---|---|---|---|---|")
    for row in rows.values():
        print(f"| {row['network_type']} | {row['concept']} | {row['concept_base']:.0%} -> {row['concept_lora']:.0%} | "
              f"{row['prior_base']:.0%} -> {row['prior_lora']:.0%} | {row['parameters']:,} | "
              f"{row['file_bytes'] / 1024:.0f} | {row['step_seconds']:.3f} | {row['peak_mb']:.0f} |")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        network_type, concept, steps, per_prompt, model = sys.argv[2:7]
        print(json.dumps(run_tiny(network_type, concept, int(steps), int(per_prompt), Path(model))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("sd14", "tiny"), required=True)
    parser.add_argument("--types", nargs="+", default=list(TYPES), choices=TYPES)
    parser.add_argument("--concepts", nargs="+", default=list(CONCEPTS), choices=CONCEPTS)
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps (the demo's 600; fewer to try)")
    parser.add_argument("--samples_per_prompt", type=int, default=6, help="graded samples per prompt (the demo's 6)")
    parser.add_argument("--model", type=Path, default=MODEL, help="another model only tries the script out: its "
                                                                  "figures are printed, not saved")
    args = parser.parse_args()
    if args.part == "sd14":
        save("sd14", measure_sd14())
    else:
        print_tiny_table(measure_tiny(args.types, args.concepts, args.steps, args.samples_per_prompt, args.model))
    print(f"results: {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
