"""Minute-0 checks of a training run, so a mistake stops it before hours are spent: the output folder writable,
the class images there, every image and caption read, a resume that matches its checkpoint, room for the
checkpoints on disk."""

import shutil
from pathlib import Path

from transformers import CLIPTokenizer

from dataset import CustomDataset
from sdlora.checkpoints import check_resume_matches, run_identity
from sdlora.class_images import generate_missing
from sdlora.pivotal import check_train_token
from sdlora.run_files import IMAGE_CHECK_CACHE_NAME, write_run_start
from sdlora.settings import PRECISION_DTYPES, ConfigError
from sdlora.training_data import make_dataset


def check_output_dir(output_dir: Path) -> None:
    """Test-write the output folder now rather than failing at the first checkpoint."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / ".write_test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"--output_dir {output_dir} is not writable ({error.strerror}); "
                          f"choose a folder you can write to") from None


def fill_class_images(cfg, accelerator, resume_folder: Path | None) -> None:
    """Prior preservation: the base model draws the class images the folder lacks, on the main process, before a
    new run (a resumed run already has them); every process waits for them."""
    if cfg.class_data_path and resume_folder is None and accelerator.is_main_process:
        generate_missing(Path(cfg.class_data_path), cfg.num_class_images, cfg.class_prompt,
                         cfg.pretrained_model_name_or_path, cfg.resolution, cfg.seed, cfg.sample_inference_steps,
                         cfg.sample_guidance_scale, accelerator.device, PRECISION_DTYPES[cfg.mixed_precision])
    accelerator.wait_for_everyone()


def check_data(cfg, accelerator, output_dir: Path, resume_folder: Path | None,
               run_defining: tuple[str, ...]) -> tuple[CustomDataset, CustomDataset | None, dict]:
    """(training images, held-out images or None, run identity), once the output folder is known writable and the
    class images are there. The main process checks the images first and fills the check cache the rest read; a
    resume is refused here when its settings (`run_defining`) or data differ from the checkpoint's, and a
    train_token the tokenizer or captions cannot train. The main process writes data_report.json and config.json."""
    if accelerator.is_main_process:
        check_output_dir(output_dir)
    fill_class_images(cfg, accelerator, resume_folder)
    with accelerator.main_process_first():
        dataset = make_dataset(cfg, cfg.dataset_path, cfg.strict_data, output_dir / IMAGE_CHECK_CACHE_NAME,
                               with_classes=True)
    if cfg.train_token:
        tokenizer = CLIPTokenizer.from_pretrained(cfg.pretrained_model_name_or_path, subfolder="tokenizer")
        check_train_token(cfg, tokenizer, [example.caption for example in dataset.examples])
    validation_data = held_out_dataset(cfg, dataset)
    identity = run_identity(cfg, run_defining, accelerator.num_processes)
    if resume_folder:
        check_resume_matches(resume_folder, identity, dataset.fingerprint(), cfg.resume_despite_changes)
    if accelerator.is_main_process:
        write_run_start(cfg, output_dir, dataset, validation_data)
    return dataset, validation_data, identity


def held_out_dataset(cfg, dataset: CustomDataset) -> CustomDataset | None:
    """The validation images: a folder, or a seeded share split off the training images."""
    if cfg.validation_dataset_path:
        return make_dataset(cfg, cfg.validation_dataset_path).fixed_copy()
    return dataset.split_off(cfg.validation_split) if cfg.validation_split else None


def check_free_disk(output_dir: Path, network, cfg) -> None:
    """Refuse at minute 0 when the disk cannot hold the checkpoints this run will keep."""
    lora_bytes = 4 * sum(p.numel() for p in network.parameters())
    kept = cfg.checkpoints_total_limit or max(1, cfg.max_train_steps // max(cfg.checkpointing_steps, 1))
    needed = lora_bytes + (3 * lora_bytes + (1 << 20)) * (kept + 1) if cfg.checkpointing_steps else 2 * lora_bytes
    free = shutil.disk_usage(output_dir).free
    if free < 2 * needed:
        raise ConfigError(f"only {free / 2**20:.0f} MiB free in {output_dir}; this run needs about "
                          f"{needed / 2**20:.0f} MiB for its checkpoints; free space or lower checkpoints_total_limit")
