"""Crash harness for test_robustness.py: runs training attempts in forked children and SIGKILLs them.

    python tests/kill_runner.py MODEL_DIR WORK_DIR PLAN_JSON

The parent imports train_lora once (slow) and never runs a model, so forking children is safe and cheap.
Each attempt of PLAN (a list of [kind, step, where]) is a child process that trains in WORK_DIR/killed and kills
itself with SIGKILL at the planned point: kind "step" after the loss of `step` is logged, kind "save" inside
the save of checkpoint-`step` at `where` (before_write, mid_write, before_rename, before_manifest, mid_prune),
kind "timer": the parent SIGKILLs it `step` tenths of a second after it starts (wherever it then is).
A last attempt runs to the end. A reference run in WORK_DIR/reference is never interrupted.
Prints one JSON line: the exit status of every attempt.
"""

import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdlora import checkpoints  # noqa: E402
from sdlora import lora_file  # noqa: E402
from sdlora import training_log  # noqa: E402
import train_lora  # noqa: E402


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def plant_kill(kind: str, step: int, where: str) -> None:
    """Patch this (child) process so it SIGKILLs itself at the planned point."""
    if kind != "step":
        plant_save_fault(where, f"checkpoint-{step}", die)
        return
    original_write = training_log.LossLog.write

    def write(self, logged_step, *args, **kwargs):
        original_write(self, logged_step, *args, **kwargs)
        if logged_step == step:
            die()
    training_log.LossLog.write = write


def plant_save_fault(where: str, target: str, fault: Callable[[], None], patch=setattr) -> None:
    """Make the save of checkpoint folder `target` call `fault()` (a kill, or an exception) at `where`:
    before_write, mid_write (half the LoRA file's bytes at its temporary name), before_rename, before_manifest,
    mid_prune (while removing an older checkpoint, its manifest already gone). `patch` sets the attribute
    (setattr in a throw-away child, monkeypatch.setattr in a test)."""
    if where in ("before_write", "mid_write"):
        original_atomic = lora_file.atomic_write

        def atomic_write(path, data):
            if f"{target}.tmp" in str(path):
                if where == "mid_write":
                    temporary = Path(path).with_name(f".{Path(path).name}.tmp")
                    temporary.parent.mkdir(parents=True, exist_ok=True)
                    temporary.write_bytes(data[: len(data) // 2])
                fault()
            original_atomic(path, data)
        patch(lora_file, "atomic_write", atomic_write)
    elif where == "before_rename":
        original_rename = Path.rename

        def rename(self, destination):
            if Path(destination).name == target:
                fault()
            return original_rename(self, destination)
        patch(Path, "rename", rename)
    elif where == "before_manifest":
        original_manifest = checkpoints.atomic_write

        def manifest_write(path, data):
            if Path(path).name == checkpoints.MANIFEST and Path(path).parent.name == target:
                fault()
            original_manifest(path, data)
        patch(checkpoints, "atomic_write", manifest_write)
    elif where == "mid_prune":
        original_rmtree = checkpoints.shutil.rmtree

        def rmtree(path, *args, **kwargs):
            if checkpoints.latest_valid_checkpoint(Path(path).parent).name == target:
                fault()
            original_rmtree(path, *args, **kwargs)
        patch(checkpoints.shutil, "rmtree", rmtree)
    else:
        raise ValueError(where)


def kill_later(pid: int, seconds: float) -> threading.Timer:
    def kill() -> None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    timer = threading.Timer(seconds, kill)
    timer.start()
    return timer


def run_child(args: list[str], plan: list | None) -> int:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            if plan and plan[0] != "timer":
                plant_kill(*plan)
            train_lora.main(train_lora.parse_config(args))
        except BaseException as error:  # report, never fall back into the parent's code
            print(f"child error: {type(error).__name__}: {error}", file=sys.stderr)
            code = 1
        os._exit(code)
    timer = kill_later(pid, plan[1] / 10) if plan and plan[0] == "timer" else None
    _, status = os.waitpid(pid, 0)
    if timer:
        timer.cancel()
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def main() -> None:
    model_dir, work_dir, plan = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    dataset = str(Path(__file__).resolve().parents[1] / "examples" / "dataset")
    common = ["--pretrained_model_name_or_path", model_dir, "--dataset_path", dataset, "--resolution", "64",
              "--max_train_steps", "20", "--checkpointing_steps", "2", "--checkpoints_total_limit", "2",
              "--gradient_accumulation_steps", "2", "--center_crop", "false", "--random_flip", "true",
              "--learning_rate", "1e-3", "--sample_prompts"]
    statuses = {"reference": run_child(common + ["--output_dir", str(work_dir / "reference")], None), "attempts": []}
    killed = common + ["--output_dir", str(work_dir / "killed")]
    for kill in plan + [None]:
        has_checkpoint = checkpoints.latest_valid_checkpoint(work_dir / "killed") is not None
        resume = ["--resume_from_checkpoint", "latest"] if has_checkpoint else []
        statuses["attempts"].append({"kill": kill, "resumed": has_checkpoint, "status": run_child(killed + resume, kill)})
    print(json.dumps(statuses))


if __name__ == "__main__":
    main()
