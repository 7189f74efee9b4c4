"""Harness for test_multiprocess.py: train_lora.py on CPUs whose start-up timings disagree, the fp32-parts timing
saying fp32 on every process but the main one. Each process writes the fp32 parts its UNet was built with to
OUTPUT_DIR/fp32_parts-rank<RANK>.json.

    python -m torch.distributed.run --nproc_per_node 2 tests/disagreeing_timing_runner.py TRAIN_LORA_ARGS...
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_lora  # noqa: E402
from sdlora import loading  # noqa: E402

RANK = int(os.environ["RANK"])
build_unet = train_lora.trainable_unet


def disagreeing_timing(dtype):
    parts = {"fp32_attention": RANK != 0, "fp32_kernels": RANK != 0}
    return parts, f"rank {RANK}'s timing: {parts}"


def recorded_unet(cfg, weight_dtype, fp32_parts):
    (Path(cfg.output_dir) / f"fp32_parts-rank{RANK}.json").write_text(json.dumps(fp32_parts))
    return build_unet(cfg, weight_dtype, fp32_parts)


loading.fp32_choices = disagreeing_timing
train_lora.trainable_unet = recorded_unet
train_lora.main(train_lora.parse_config(sys.argv[1:]))
