"""Two CPU processes (torchrun, gloo) train the same LoRA as one process with twice the batch, write each file
once, end together when one dies, resume exactly, and compute alike whatever each one's timing says."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import train_lora
from sdlora.checkpoints import read_state
from conftest import REPO_ROOT, shaped_dataset
from sdlora.settings import ConfigError

LEARNING_RATE, STEPS = 1e-3, 6
# Gradients are all-reduced in another summation order than one process sums them. Adam moves each weight by about
# the learning rate per step, m / (sqrt(v) + eps), and where a gradient element is as small as eps (1e-8) a rounding
# of the gradient changes that step by a share of it: two runs differ by a share of the distance Adam travels, not by
# the rounding of a weight. 1 % of it, 6e-5: measured 7.4e-6 on a Zen 4 and 1.46e-5 on an AVX2-only EPYC (where an
# absolute 1e-5 failed); pairing the wrong batches (1 process at batch 1) moves them 1.1e-2.
WEIGHT_TOLERANCE = 0.01 * LEARNING_RATE * STEPS
# A logged loss (near 1) is a mean summed in another order: relative rounding, 1.1e-7 measured; wrong batches: 11 %.
LOSS_RTOL = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def common(tiny_model_dir, output_dir, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(tiny_model_dir), "--dataset_path",
            str(REPO_ROOT / "examples" / "dataset"), "--output_dir", str(output_dir), "--resolution", "64",
            "--max_train_steps", str(STEPS), "--checkpointing_steps", "2", "--learning_rate", str(LEARNING_RATE),
            "--random_flip", "true", "--sample_steps", "0", "--sample_prompts", "a cat",
            "--sample_inference_steps", "2", *extra]


def torchrun(args: list[str], script: str = "train_lora.py", **kwargs) -> subprocess.Popen:
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), script, *args]
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **kwargs)


def run_on_two_processes(args: list[str], script: str = "train_lora.py") -> None:
    """`script` (train_lora.py) with `args` under torchrun on 2 CPU processes, which must succeed."""
    process = torchrun(args, script)
    log, _ = process.communicate(timeout=300)
    assert process.returncode == 0, log[-3000:]


def assert_same_training(one: Path, two: Path) -> None:
    """The runs in `one` and `two` trained the same LoRA and logged the same losses, one per step, within
    WEIGHT_TOLERANCE and LOSS_RTOL."""
    a, b = (load_file(str(run / "pytorch_lora_weights.safetensors")) for run in (one, two))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=WEIGHT_TOLERANCE)
    losses = [[json.loads(line)["loss"] for line in (run / "loss_log.jsonl").read_text().splitlines()]
              for run in (one, two)]
    assert len(losses[0]) == len(losses[1]) == STEPS
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=LOSS_RTOL, atol=0)


@pytest.fixture(scope="module")
def two_process_run(tiny_model_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("two")
    run_on_two_processes(common(tiny_model_dir, output, "--train_batch_size", "1"))
    return output


def files_written(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and "logs" not in p.parts)


def test_two_processes_match_one_process_with_twice_the_batch(two_process_run, tiny_model_dir, tmp_path):
    """Per-device batch 1 on 2 processes trains the LoRA of batch 2 on 1 process (within the tolerances), with the
    same losses, and writes the same files, each once."""
    one = tmp_path / "one"
    train_lora.main(train_lora.parse_config(common(tiny_model_dir, one, "--train_batch_size", "2")))
    assert_same_training(one, two_process_run)
    assert files_written(two_process_run) == files_written(one)


def test_two_processes_with_buckets_and_an_uneven_count_match_one_process(tiny_model_dir, tmp_path):
    """Buckets on, batch 2 on 2 processes, 5 images in buckets of 3, 1 and 1 (so no global batch of 4 is full):
    the LoRA and the losses of batch 4 on 1 process, within the tolerances."""
    data = shaped_dataset(tmp_path / "data", {"a.png": (256, 128), "b.png": (260, 130), "c.png": (250, 125),
                                              "d.png": (128, 256), "e.png": (200, 200)})
    for index, name in enumerate("abcde"):  # distinct images, so a sample paired with the wrong one shows
        Image.new("RGB", Image.open(data / f"{name}.png").size, (40 * index, 200 - 30 * index, 90)).save(
            data / f"{name}.png")

    def args(output, batch):
        return common(tiny_model_dir, output, "--dataset_path", str(data), "--aspect_ratio_buckets", "true",
                      "--resolution", "128", "--train_batch_size", batch)
    run_on_two_processes(args(tmp_path / "two", "2"))
    train_lora.main(train_lora.parse_config(args(tmp_path / "one", "4")))
    assert_same_training(tmp_path / "one", tmp_path / "two")


def test_resume_of_a_two_process_run_is_exact(two_process_run, tiny_model_dir, tmp_path):
    """A 2-process run resumed from its step-4 checkpoint on 2 processes ends bitwise equal to the uninterrupted one."""
    shutil.copytree(two_process_run / "checkpoint-4", tmp_path / "checkpoint-4")
    run_on_two_processes(common(tiny_model_dir, tmp_path, "--train_batch_size", "1",
                                "--resume_from_checkpoint", "latest"))
    resumed = load_file(str(tmp_path / "pytorch_lora_weights.safetensors"))
    reference = load_file(str(two_process_run / "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


def test_resume_on_another_number_of_processes_is_refused(two_process_run, tiny_model_dir, tmp_path):
    """Resuming a 2-process checkpoint on 1 process refuses, naming num_processes."""
    shutil.copytree(two_process_run / "checkpoint-4", tmp_path / "checkpoint-4")
    cfg = train_lora.parse_config(common(tiny_model_dir, tmp_path, "--train_batch_size", "1",
                                         "--resume_from_checkpoint", "latest"))
    with pytest.raises(ConfigError, match="num_processes: checkpoint 2, now 1"):
        train_lora.main(cfg)


def test_every_process_computes_with_the_main_process_choice_of_fp32_parts(tiny_model_dir, tmp_path):
    """In bf16 on CPUs whose timings disagree, every process builds its UNet with the main process's fp32 parts,
    and the checkpoints keep that choice."""
    run_on_two_processes(common(tiny_model_dir, tmp_path, "--train_batch_size", "1", "--max_train_steps", "2",
                                "--mixed_precision", "bf16"), script="tests/disagreeing_timing_runner.py")
    main_choice = {"fp32_attention": False, "fp32_kernels": False}  # the runner's rank 0 times bf16 as faster
    for rank in (0, 1):
        assert json.loads((tmp_path / f"fp32_parts-rank{rank}.json").read_text()) == main_choice
    identity = read_state(tmp_path / "checkpoint-2")["run_identity"]
    assert {key: identity[key] for key in main_choice} == main_choice


def test_killing_one_process_ends_the_other_promptly(tiny_model_dir, tmp_path):
    """SIGKILL of rank 1 mid-run ends rank 0 and the launcher within 60 s, with a non-zero exit naming rank 1."""
    process = torchrun(common(tiny_model_dir, tmp_path, "--max_train_steps", "100000", "--checkpointing_steps", "50"))
    deadline = time.time() + 240
    while not (tmp_path / "checkpoint-50").exists():  # well into training
        assert process.poll() is None and time.time() < deadline, "training did not get going"
        time.sleep(0.5)
    workers = [p for p in psutil.Process(process.pid).children(recursive=True) if "train_lora.py" in p.cmdline()]
    rank1 = [p for p in workers if p.environ().get("RANK") == "1"]
    assert len(workers) == 2 and len(rank1) == 1
    killed_at = time.time()
    os.kill(rank1[0].pid, signal.SIGKILL)
    log, _ = process.communicate(timeout=120)
    assert time.time() - killed_at < 60
    assert process.returncode != 0 and "rank      : 1" in log
    assert all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in workers)


def test_two_processes_with_class_images_match_one_process(tiny_model_dir, tmp_path):
    """Prior preservation on 2 processes at batch 1 (3 class images, so class batches wrap unevenly) trains the
    LoRA and logs the losses of batch 2 on 1 process, within the tolerances."""
    classes = shaped_dataset(tmp_path / "class", {"x.png": (64, 64), "y.png": (64, 64), "z.png": (64, 64)})
    for index, name in enumerate("xyz"):
        Image.new("RGB", (64, 64), (200 - 60 * index, 30 * index, 120)).save(classes / f"{name}.png")

    def args(output, batch):
        return common(tiny_model_dir, output, "--class_data_path", str(classes), "--class_prompt", "a photo",
                      "--num_class_images", "0", "--prior_loss_weight", "0.5", "--train_batch_size", batch)
    run_on_two_processes(args(tmp_path / "two", "1"))
    train_lora.main(train_lora.parse_config(args(tmp_path / "one", "2")))
    assert_same_training(tmp_path / "one", tmp_path / "two")
