"""optimizers.py: every optimizer trains the LoRA, resumes bitwise exactly from a checkpoint, and is refused with
the pip command when its package is missing."""

import importlib.util
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from sdlora import optimizers
import train_lora
from sdlora.checkpoints import join_optimizer_state, split_optimizer_state
from conftest import REPO_ROOT
from sdlora.settings import ConfigError

# The learning rate each optimizer is used with (README: "Optimizers").
LEARNING_RATES = {"adamw": "1e-3", "adamw8bit": "1e-3", "prodigy": "1.0", "adafactor": "1e-3", "lion": "1e-4"}


def config(tiny_model_dir, output_dir, optimizer: str, *extra: str):
    return train_lora.parse_config([
        "--pretrained_model_name_or_path", str(tiny_model_dir), "--dataset_path", str(REPO_ROOT / "examples/dataset"),
        "--output_dir", str(output_dir), "--resolution", "64", "--max_train_steps", "4", "--checkpointing_steps", "2",
        "--train_batch_size", "2", "--sample_steps", "0", "--sample_prompts", "--interop_check", "false",
        "--optimizer", optimizer, "--learning_rate", LEARNING_RATES[optimizer], *extra,
    ])


@pytest.mark.parametrize("optimizer", list(optimizers.OPTIMIZERS))
def test_each_optimizer_trains_and_resumes_bitwise_exactly(tiny_model_dir, tmp_path, optimizer):
    """With each optimizer the LoRA moves off zero, and a run resumed from its step-2 checkpoint ends bitwise equal
    to the uninterrupted run: the whole optimizer state went through the checkpoint."""
    straight = load_file(str(train_lora.main(config(tiny_model_dir, tmp_path / "straight", optimizer))))
    assert all(t.abs().sum() > 0 for k, t in straight.items() if k.endswith("lora_up.weight"))
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "straight" / "checkpoint-2", resumed_dir / "checkpoint-2")
    resumed = load_file(str(train_lora.main(config(tiny_model_dir, resumed_dir, optimizer,
                                                   "--resume_from_checkpoint", "latest"))))
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_split_optimizer_state_round_trips_nested_tensors_and_numbers():
    """Tensors, nested dicts of tensors and plain numbers come back as they were saved, and the numbers survive
    JSON."""
    state = {0: {"step": 3, "exp_avg": torch.arange(4.0), "quant": {"state1": torch.ones(2, dtype=torch.uint8)}},
             5: {"RMS": torch.tensor(0.5), "growth": float("inf")}}
    tensors, scalars = split_optimizer_state(state)
    assert set(tensors) == {"optimizer.0.exp_avg", "optimizer.0.quant/state1", "optimizer.5.RMS"}
    back = join_optimizer_state(tensors, json.loads(json.dumps(scalars)))
    assert back[0]["step"] == 3 and back[5]["growth"] == float("inf")
    assert torch.equal(back[0]["exp_avg"], state[0]["exp_avg"]) and torch.equal(back[0]["quant"]["state1"],
                                                                                 state[0]["quant"]["state1"])
    assert torch.equal(back[5]["RMS"], state[5]["RMS"])


def test_missing_optimizer_package_is_refused_with_the_pip_command(tiny_model_dir, tmp_path, monkeypatch):
    """An optimizer whose package is not installed stops the run before anything is written, with the install line."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "lion_pytorch" else real_find_spec(name, *args))
    with pytest.raises(ConfigError, match="--optimizer lion needs the lion_pytorch package: pip install lion-pytorch"):
        train_lora.main(config(tiny_model_dir, tmp_path / "out", "lion"))
    assert not (tmp_path / "out").exists()
