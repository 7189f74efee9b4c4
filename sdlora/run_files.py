"""What a training run writes into its output folder besides checkpoints, and the names of those files: one
constant each, imported by the writer (train_lora.py) and the reader (report.py)."""

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dataset import CustomDataset
    from sdlora.ema import Ema

CONFIG_NAME = "config.json"  # the resolved settings
RUN_CONFIG_NAME = "config.toml"  # the same settings as a file `train_lora.py --config` reads
DATA_REPORT_NAME = "data_report.json"  # the images used and skipped, and why
LOSS_LOG_NAME = "loss_log.jsonl"  # one row per optimizer step
VAL_LOSS_LOG_NAME = "val_loss_log.jsonl"  # one {"step", "val_loss"} row per held-out loss
HEALS_LOG_NAME = "heals.jsonl"  # one row per rollback of a diverging run (sdlora/healing.py)
SAMPLES_DIR = "samples"  # step<NNNNNN>-<i>.png and step<NNNNNN>-grid.png
EMA_FILE_NAME = "pytorch_lora_weights_ema.safetensors"  # the EMA of the LoRA weights, beside the LoRA file
TEXTUAL_INVERSION_FILE_NAME = "learned_embeds.safetensors"  # a trained token's embedding, as diffusers names it
LATENT_CACHE_DIR = "latent_cache"  # with cache_latents_to_disk
IMAGE_CHECK_CACHE_NAME = ".image_check_cache.json"  # the minute-0 image check, kept so a rerun starts fast
LOGS_DIR = "logs"  # TensorBoard


def write_run_start(cfg, output_dir: Path, dataset: "CustomDataset", validation_data: "CustomDataset | None") -> None:
    """data_report.json, the resolved config.json and config.toml (every constant; `--config` reads it back), and
    the dataset summary on screen."""
    from sdlora.run_config import toml_text  # torch-free module otherwise

    held_out = len(validation_data.examples) if validation_data and not cfg.validation_dataset_path else 0
    dataset.write_report(output_dir / DATA_REPORT_NAME, held_out)
    (output_dir / CONFIG_NAME).write_text(json.dumps(vars(cfg), indent=2), encoding="utf-8")
    settings = {name: value for name, value in vars(cfg).items() if name != "config"}
    (output_dir / RUN_CONFIG_NAME).write_text(toml_text(settings, "the resolved settings of this run: python "
                                                        "train_lora.py --config config.toml"), encoding="utf-8")
    print(dataset.summary())


def lora_metadata(cfg, dataset: "CustomDataset", step: int, started_at: str) -> dict[str, str]:
    """Our keys plus the `ss_*` / `modelspec.*` keys AUTOMATIC1111 shows in its LoRA card (rank and alpha are the
    network's own, added by LoRANetwork.save)."""
    tag_frequency = Counter(tag.strip() for e in dataset.examples for tag in e.caption.split(",") if tag.strip())
    name = Path(cfg.output_dir).name
    return {
        "base_model": cfg.pretrained_model_name_or_path, "resolution": str(cfg.resolution), "step": str(step),
        "ss_output_name": name, "ss_sd_model_name": cfg.pretrained_model_name_or_path,
        "ss_base_model_version": "sd_v1", "ss_resolution": f"({cfg.resolution}, {cfg.resolution})",
        "ss_num_train_images": str(len(dataset.examples)), "ss_steps": str(step), "ss_learning_rate": str(cfg.learning_rate),
        "ss_training_started_at": started_at, "ss_network_dropout": str(cfg.network_dropout),
        "ss_tag_frequency": json.dumps({Path(cfg.dataset_path).name: dict(tag_frequency.most_common(200))}),
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.title": name,
    }


def save_lora_files(cfg, network, ema: "Ema | None", final_path: Path, metadata: dict[str, str]) -> None:
    """The final LoRA file (a trained token bundled in it, and also in its own textual-inversion file), and the
    EMA weights' beside it when an EMA is kept."""
    network.save(final_path, metadata)
    if network.token is not None:
        from sdlora.pivotal import save_textual_inversion  # torch-free module otherwise
        save_textual_inversion(final_path.parent / TEXTUAL_INVERSION_FILE_NAME, network.token.token,
                               network.token.vectors)
    if ema:
        with ema.swapped_in():
            network.save(Path(cfg.output_dir) / EMA_FILE_NAME, dict(metadata, ema_decay=str(ema.decay)))
