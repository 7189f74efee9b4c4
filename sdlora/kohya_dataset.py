"""kohya's dataset TOML (`--dataset_config`, sd-scripts docs/config_README-en.md), read into the image folders this
suite trains on: `[general]`, `[[datasets]]` and `[[datasets.subsets]]`, each level's values over the one above
(subset over dataset over general over train_lora.py's own settings).

Read: `image_dir`, `num_repeats`, `caption_extension`, `class_tokens` (the caption of a picture without a caption
file), `is_reg` (class images for prior preservation), `keep_tokens`, `shuffle_caption`, and per dataset
`resolution` and `enable_bucket`. Every other kohya key is refused by name with what to do instead
(UNSUPPORTED), a key kohya does not know either with the nearest known name. Relative `image_dir`s are relative
to the TOML file's folder (kohya takes them relative to the working folder: write absolute paths to use one file
with both).
"""

import functools
from pathlib import Path

from dataset import Subset
from sdlora.run_config import nearest_name, read_toml
from sdlora.settings import ConfigError

SUBSET_ONLY = ("image_dir", "class_tokens", "is_reg")  # kohya: only in [[datasets.subsets]]
SUBSET_KEYS = SUBSET_ONLY + ("num_repeats", "caption_extension", "keep_tokens", "shuffle_caption")
DATASET_KEYS = ("resolution", "enable_bucket")  # kohya: in [general] and [[datasets]], shared by its subsets

# kohya keys this suite does not read, and what to do instead.
UNSUPPORTED = {
    "batch_size": "set --train_batch_size (one batch size for the run)",
    "bucket_no_upscale": "buckets never upscale here unless --bucket_upscale true; remove the key",
    "bucket_reso_steps": "bucket sides are multiples of 64 here; remove the key",
    "min_bucket_reso": "buckets hold about resolution² pixels here, sides 64 to 4:1; remove the key",
    "max_bucket_reso": "buckets hold about resolution² pixels here, sides 64 to 4:1; remove the key",
    "flip_aug": "set --random_flip true (for the whole run)",
    "random_crop": "set --center_crop false (for the whole run)",
    "color_aug": "colour augmentation is not offered; remove the key",
    "face_crop_aug_range": "face-crop augmentation is not offered; crop the pictures beforehand",
    "caption_dropout_rate": "set --caption_dropout (for the whole run)",
    "caption_dropout_every_n_epochs": "use --caption_dropout instead",
    "caption_tag_dropout_rate": "tag dropout is not offered; use --caption_dropout or --shuffle_tags",
    "caption_prefix": "set --trigger_phrase (put first in every caption)",
    "caption_suffix": "write it into the caption files",
    "caption_separator": "tags are separated by commas here; remove the key",
    "keep_tokens_separator": "use keep_tokens (the first N comma-separated tags stay in place)",
    "secondary_separator": "write the tags with commas; remove the key",
    "enable_wildcard": "one caption per picture here; write it out in the caption file",
    "token_warmup_min": "token warm-up is not offered; remove the key",
    "token_warmup_step": "token warm-up is not offered; remove the key",
    "metadata_file": "put a metadata.jsonl (file_name, text) in the image folder instead",
    "cache_info": "the image check is cached in the output folder anyway; remove the key",
    "conditioning_data_dir": "ControlNet data is not trained here; remove the subset",
    "alpha_mask": "set --masked_loss true (the alpha channel is the mask without --mask_path)",
    "validation_split": "set --validation_split (for the whole run)",
    "validation_seed": "the validation split follows --seed; remove the key",
    "resize_interpolation": "pictures are resized with bicubic filtering here; remove the key",
    "network_multiplier": "not a dataset setting here; remove the key",
}
KNOWN = SUBSET_KEYS + DATASET_KEYS + ("subsets",) + tuple(UNSUPPORTED)


def _check_keys(path: Path, where: str, table: dict, allowed: tuple[str, ...]) -> None:
    """Refuse what `table` (the part at `where`) holds beyond `allowed`."""
    for key in table:
        if key in allowed:
            continue
        if key in UNSUPPORTED:
            raise ConfigError(f"--dataset_config {path}: {where}: kohya's {key!r} is not supported: "
                              f"{UNSUPPORTED[key]}")
        if key in DATASET_KEYS:
            raise ConfigError(f"--dataset_config {path}: {where}: {key!r} belongs in [[datasets]] or [general] (as "
                              f"in kohya's format: one per dataset, shared by its subsets); move it there")
        if key in SUBSET_ONLY or key == "subsets":
            raise ConfigError(f"--dataset_config {path}: {where}: {key!r} belongs in a [[datasets.subsets]] table "
                              f"(as in kohya's format); move it there")
        raise ConfigError(f"--dataset_config {path}: {where}: unknown key {key!r}{nearest_name(key, list(KNOWN))}")


def _typed(path: Path, where: str, key: str, value):
    """`value` checked for `key`'s type and range, or a ConfigError saying what is expected."""
    def wrong(expected: str) -> ConfigError:
        return ConfigError(f"--dataset_config {path}: {where}: {key} = {value!r}: expected {expected}")

    if key in ("image_dir", "class_tokens", "caption_extension"):
        if not isinstance(value, str):
            raise wrong("a string in quotes")
        if key == "caption_extension" and not value.startswith("."):
            raise wrong("an extension with its dot, e.g. '.txt'")
    elif key in ("is_reg", "shuffle_caption", "enable_bucket"):
        if not isinstance(value, bool):
            raise wrong("true or false")
    elif key in ("num_repeats", "keep_tokens"):
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if key == "num_repeats" else 0):
            raise wrong("a whole number of at least " + ("1" if key == "num_repeats" else "0"))
    elif key == "resolution":
        if isinstance(value, list) and len(value) == 2 and value[0] == value[1]:
            value = value[0]
        if isinstance(value, bool) or not isinstance(value, int) or value < 8 or value % 8:
            raise wrong("a positive multiple of 8, or [side, side] (other sizes: enable_bucket = true keeps each "
                        "picture's aspect ratio at about resolution² pixels)")
    return value


def read_dataset_config(path: str | Path, cfg) -> list[Subset]:
    """The subsets of a kohya dataset TOML, each with its settings resolved (subset over dataset over [general]
    over `cfg`'s caption_extension, fallback_caption, keep_tags, shuffle_tags, resolution, aspect_ratio_buckets).
    Anything this suite cannot honour is a ConfigError naming the file, the table and the key."""
    path = Path(path)
    table = read_toml(path, "--dataset_config")
    _check_keys(path, "top level", table, ("general", "datasets"))
    general = table.get("general", {})
    datasets = table.get("datasets", [])
    if not isinstance(general, dict) or not isinstance(datasets, list) or not datasets:
        raise ConfigError(f"--dataset_config {path}: expected an optional [general] table and at least one "
                          f"[[datasets]] table with [[datasets.subsets]] in it (kohya's layout)")
    _check_keys(path, "[general]", general, DATASET_KEYS + SUBSET_KEYS[len(SUBSET_ONLY):])
    base = {"num_repeats": 1, "caption_extension": cfg.caption_extension, "class_tokens": cfg.fallback_caption,
            "is_reg": False, "keep_tokens": cfg.keep_tags, "shuffle_caption": cfg.shuffle_tags,
            "resolution": cfg.resolution, "enable_bucket": cfg.aspect_ratio_buckets}
    base |= {key: _typed(path, "[general]", key, value) for key, value in general.items()}
    subsets = []
    for number, dataset in enumerate(datasets, start=1):
        where = f"[[datasets]] {number}"
        _check_keys(path, where, dataset, DATASET_KEYS + SUBSET_KEYS[len(SUBSET_ONLY):] + ("subsets",))
        level = base | {key: _typed(path, where, key, value) for key, value in dataset.items() if key != "subsets"}
        if not dataset.get("subsets"):
            raise ConfigError(f"--dataset_config {path}: {where} has no [[datasets.subsets]]; add one with "
                              f"image_dir = '...'")
        for index, subset in enumerate(dataset["subsets"], start=1):
            here = f"{where}, [[datasets.subsets]] {index}"
            _check_keys(path, here, subset, SUBSET_KEYS)
            values = level | {key: _typed(path, here, key, value) for key, value in subset.items()}
            if "image_dir" not in subset:
                raise ConfigError(f"--dataset_config {path}: {here} has no image_dir; add image_dir = '...' (the "
                                  f"folder of its pictures)")
            folder = Path(values["image_dir"]).expanduser()
            folder = (folder if folder.is_absolute() else path.parent / folder).resolve()
            if not folder.is_dir():
                raise ConfigError(f"--dataset_config {path}: {here}: image_dir {values['image_dir']!r} is not a "
                                  f"folder ({folder}; relative paths are taken from the TOML file's folder)")
            subsets.append(Subset(folder, values["num_repeats"], values["caption_extension"],
                                  values["class_tokens"], values["is_reg"], values["keep_tokens"],
                                  values["shuffle_caption"], values["resolution"], values["enable_bucket"]))
    if all(subset.is_reg for subset in subsets):
        raise ConfigError(f"--dataset_config {path}: every subset is is_reg (class images); add a subset of the "
                          f"pictures to learn")
    return subsets


def check_dataset_config(cfg, defaults: dict) -> None:
    """With dataset_config set: no dataset_path or class_data_path beside it (the TOML names every folder), and
    the file read in full now, so a mistake in it stops the run before anything loads."""
    if not cfg.dataset_config:
        return
    if cfg.dataset_path != defaults["dataset_path"] or cfg.class_data_path:
        raise ConfigError(f"--dataset_config {cfg.dataset_config} names the image folders: leave --dataset_path and "
                          f"--class_data_path unset (class images: a subset with is_reg = true)")
    read_dataset_config(cfg.dataset_config, cfg)


@functools.lru_cache(maxsize=8)
def has_class_subsets(path: str) -> bool:
    """Whether a dataset TOML (already checked by read_dataset_config) has an is_reg subset: its class images then
    train in a micro-batch of their own after each instance batch, as class_data_path's do."""
    if not path:
        return False
    datasets = read_toml(path, "--dataset_config").get("datasets", [])
    return any(isinstance(subset, dict) and subset.get("is_reg") is True
               for dataset in (datasets if isinstance(datasets, list) else []) if isinstance(dataset, dict)
               for subset in (dataset.get("subsets") if isinstance(dataset.get("subsets"), list) else []))
