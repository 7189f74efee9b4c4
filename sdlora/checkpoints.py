"""Resumable checkpoints that are never half-written.

A checkpoint is a folder `checkpoint-<step>/` holding the LoRA file, the training state (optimizer moments and
RNG as safetensors, the rest as JSON) and, written last, `manifest.json` with the sha256 of every other file.
A folder without a manifest that matches its files is not a checkpoint: a crash at any moment of a save leaves
either the previous checkpoints or the new complete one. Nothing here is ever unpickled.
"""

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from sdlora.files import atomic_write, sha256_file
from lora_diffusion import LoRANetwork
from sdlora.lora_file import LORA_FILE_NAME
from sdlora.settings import RENAMED_FLAGS, ConfigError

MANIFEST = "manifest.json"
STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"
MANIFEST_VERSION = 1  # a checkpoint manifest's `format_version`

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message says which and why."""


def save_checkpoint(folder: Path, network: LoRANetwork, lora_metadata: dict[str, str], optimizer, lr_scheduler,
                    state: dict, extra_tensors: dict[str, torch.Tensor] | None = None, grad_scaler=None) -> None:
    """Write `folder` completely, or not at all. `state` is JSON-able (step, config, fingerprints, counters);
    `extra_tensors` (e.g. EMA weights) come back from load_checkpoint as state["extra_tensors"]. With fp16 the
    GradScaler's scale and growth count are kept, so a resumed run scales its first losses as the original did."""
    temporary = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    network.save(temporary / LORA_FILE_NAME, lora_metadata)  # refuses non-finite weights
    optimizer_state = optimizer.state_dict()
    tensors, scalars = split_optimizer_state(optimizer_state["state"])
    tensors |= {f"extra.{key}": value.detach().cpu().contiguous() for key, value in (extra_tensors or {}).items()}
    bad = [key for key, value in tensors.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        raise CheckpointError(f"refusing to write {folder}: non-finite training state in {bad[:3]}")
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():  # dropout on a GPU draws from the CUDA generators, one per device
        tensors |= {f"rng.cuda.{index}": rng for index, rng in enumerate(torch.cuda.get_rng_state_all())}
    if grad_scaler is not None:
        state = dict(state, grad_scaler=grad_scaler.state_dict())
    atomic_write(temporary / STATE_TENSORS, safetensors_bytes(tensors))
    full_state = dict(state, param_groups=optimizer_state["param_groups"], optimizer_scalars=scalars,
                      lr_scheduler=lr_scheduler.state_dict())
    atomic_write(temporary / STATE_JSON, json.dumps(full_state, indent=1).encode("utf-8"))
    if folder.exists():  # an invalid leftover of an earlier crash at this same step
        remove_checkpoint(folder)
    temporary.rename(folder)
    files = {path.name: sha256_file(path) for path in sorted(folder.iterdir())}
    manifest = {"format_version": MANIFEST_VERSION, "step": state["step"], "files": files,
                "config_fingerprint": state.get("config_fingerprint"),
                "dataset_fingerprint": state.get("dataset_fingerprint")}
    atomic_write(folder / MANIFEST, json.dumps(manifest, indent=1).encode("utf-8"))


def split_optimizer_state(per_parameter: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's per-parameter state as (tensors keyed "optimizer.<index>.<key>", the JSON-able rest keyed
    {index: {key: value}}). Nested dicts (8-bit AdamW's quantisation state) join their keys with "/"; plain numbers
    (Prodigy's and Adafactor's step counters) go to JSON."""
    tensors, scalars = {}, {}

    def walk(index, prefix: str, values: dict) -> None:
        for key, value in values.items():
            if isinstance(value, dict):
                walk(index, f"{prefix}{key}/", value)
            elif isinstance(value, torch.Tensor):
                # A copy each: 8-bit AdamW shares one quantisation map between parameters; safetensors refuses
                # shared storage.
                tensors[f"optimizer.{index}.{prefix}{key}"] = value.detach().cpu().clone()
            else:
                scalars.setdefault(str(index), {})[prefix + key] = value

    for index, values in per_parameter.items():
        walk(index, "", values)
    return tensors, scalars


def join_optimizer_state(tensors: dict[str, torch.Tensor], scalars: dict) -> dict:
    """The inverse of split_optimizer_state."""
    per_parameter: dict = {}

    def put(index: str, path: str, value) -> None:
        *parents, name = path.split("/")
        entry = per_parameter.setdefault(int(index), {})
        for parent in parents:
            entry = entry.setdefault(parent, {})
        entry[name] = value

    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, path = key.split(".", 2)
            put(index, path, value)
    for index, values in scalars.items():
        for path, value in values.items():
            put(index, path, value)
    return per_parameter


def check_checkpoint(folder: Path) -> str | None:
    """None when `folder` is a complete checkpoint, else the reason it is not."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
    except FileNotFoundError:
        return "no manifest (the save was interrupted)"
    except (ValueError, KeyError, TypeError):
        return "unreadable manifest"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256_file(path) != expected:
            return f"{name} does not match its checksum (truncated or modified)"
    if {LORA_FILE_NAME, STATE_TENSORS, STATE_JSON} - files.keys():
        return "manifest lists an incomplete set of files"
    return None


def list_checkpoints(output_dir: Path) -> list[Path]:
    """`checkpoint-<step>` folders, oldest first, whether or not they are valid."""
    found = []
    for folder in Path(output_dir).glob("checkpoint-*"):
        suffix = folder.name.removeprefix("checkpoint-")
        if suffix.isdigit() and folder.is_dir():
            found.append((int(suffix), folder))
    return [folder for _, folder in sorted(found)]


def latest_valid_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint; newer broken ones are skipped with a warning naming them."""
    for folder in reversed(list_checkpoints(output_dir)):
        problem = check_checkpoint(folder)
        if problem is None:
            return folder
        log.warning(f"warning: skipping {folder}: {problem}")
    return None


def remove_checkpoint(folder: Path) -> None:
    """Manifest first, so a crash halfway through leaves an invalid folder, never a valid-looking partial one."""
    (folder / MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(folder)


def prune_checkpoints(output_dir: Path, keep: int, keep_also: str | None = None) -> None:
    """Keep the newest `keep` checkpoints (0: all) and the one named `keep_also` (early stopping's best). Runs only
    after a new checkpoint is complete."""
    if keep > 0:
        for folder in list_checkpoints(output_dir)[:-keep]:
            if folder.name != keep_also:
                remove_checkpoint(folder)


def read_state(folder: Path) -> dict:
    """The JSON part of a checkpoint's training state."""
    return json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))


def load_checkpoint(folder: Path, network: LoRANetwork, optimizer, lr_scheduler, grad_scaler=None) -> dict:
    """Restore LoRA weights, optimizer, LR scheduler, the CPU and CUDA RNGs and the fp16 GradScaler from
    `folder`; returns the JSON state."""
    problem = check_checkpoint(folder)
    if problem:
        raise CheckpointError(f"cannot resume from {folder}: {problem}")
    network.load(folder / LORA_FILE_NAME)
    try:
        tensors = load_file(str(folder / STATE_TENSORS))
    except SafetensorError as error:
        raise CheckpointError(f"cannot resume from {folder}: {STATE_TENSORS} is unreadable ({error})") from None
    state = read_state(folder)
    optimizer.load_state_dict({"state": join_optimizer_state(tensors, state.get("optimizer_scalars", {})),
                               "param_groups": state["param_groups"]})
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count()) if f"rng.cuda.{i}" in tensors]
    if cuda_states:
        torch.cuda.set_rng_state_all(cuda_states)
    if grad_scaler is not None and state.get("grad_scaler"):
        grad_scaler.load_state_dict(state["grad_scaler"])
    state["extra_tensors"] = {k.removeprefix("extra."): v for k, v in tensors.items() if k.startswith("extra.")}
    return state


# ---------------------------------------------------------------------------------------------------------------
# Resuming: which checkpoint, and whether it belongs to this run

# Run-defining settings added after checkpoints were first written, with the value that gives the behaviour every
# earlier run had: an older checkpoint lacks them and still resumes exactly at these values.
SETTINGS_ADDED_LATER = {"network_type": "lora", "lokr_factor": -1, "network_dropout": 0.0, "rank_dropout": 0.0,
                        "module_dropout": 0.0, "network_weights": "", "train_token": "", "train_token_new": False,
                        "train_token_init": "", "train_token_vectors": 1, "train_token_lr": 5e-4, "loss_type": "l2",
                        "huber_c": 0.1, "huber_schedule": "snr", "debiased_estimation": False, "min_timestep": 0,
                        "max_timestep": 1000, "masked_loss": False}


def run_identity(cfg, names: tuple[str, ...], num_processes: int) -> dict:
    """The settings (`names`, train_lora.RUN_DEFINING) a resumed run must share with the original to finish with
    the same LoRA, and the process count."""
    identity = {name: getattr(cfg, name) for name in names}
    identity["num_processes"] = num_processes
    return identity


def resolve_resume(output_dir: Path, resume_from_checkpoint: str) -> Path | None:
    """The checkpoint to continue from ("" for a new run, "latest", or a folder), or None for a new run (which must
    not overwrite an earlier one)."""
    if not resume_from_checkpoint:
        # Valid checkpoints only: a run killed before its first checkpoint completed can simply start again.
        earlier = [c for c in list_checkpoints(output_dir) if check_checkpoint(c) is None]
        earlier += list(output_dir.glob(LORA_FILE_NAME))
        if earlier:
            raise ConfigError(f"{output_dir} already holds a run ({earlier[-1].name}); continue it with "
                              f"--resume_from_checkpoint latest, or start a new run in another --output_dir")
        return None
    if resume_from_checkpoint == "latest":
        folder = latest_valid_checkpoint(output_dir)
        if folder is None:
            raise ConfigError(f"--resume_from_checkpoint latest: no valid checkpoint in {output_dir}; "
                              f"drop the flag to start a new run, or point --output_dir at the old run")
        return folder
    folder = Path(resume_from_checkpoint)
    problem = check_checkpoint(folder)
    if problem:
        raise ConfigError(f"--resume_from_checkpoint {folder}: not a usable checkpoint ({problem}); "
                          f"use 'latest' or another checkpoint-<step> folder")
    return folder


def check_resume_matches(folder: Path, identity: dict, dataset_fingerprint: str, allow_changes: bool) -> None:
    """Refuse to resume a checkpoint made with other settings or data, listing the differences."""
    state = read_state(folder)
    # A checkpoint written before a setting was renamed saved it under its old name.
    saved = {RENAMED_FLAGS.get(name, name): value for name, value in state.get("run_identity", {}).items()}
    saved = SETTINGS_ADDED_LATER | saved  # a checkpoint from before a setting existed ran with its old behaviour
    differences = [f"{name}: checkpoint {saved.get(name)!r}, now {value!r}"
                   for name, value in identity.items() if saved.get(name) != value]
    if state.get("dataset_fingerprint") != dataset_fingerprint:
        differences.append("dataset: images or captions differ from the checkpoint's")
    if not differences:
        return
    listing = "\n  ".join(differences)
    if not allow_changes:
        raise ConfigError(f"cannot resume {folder} exactly; these differ:\n  {listing}\nUse the original settings "
                          f"and data, or pass --resume_despite_changes true to continue anyway (no longer exact)")
    log.warning(f"warning: resuming {folder} despite changes; the run is no longer exact:\n  {listing}")
