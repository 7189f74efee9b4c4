"""A run as one TOML file (--config, and config.toml written back), and kohya's dataset TOML (--dataset_config)."""

import math

import pytest

import train_lora
from conftest import REPO_ROOT
from dataset import CustomDataset
from sdlora.kohya_dataset import has_class_subsets, read_dataset_config
from sdlora.run_config import read_run_config, toml_text
from sdlora.run_files import RUN_CONFIG_NAME
from sdlora.settings import ConfigError
from sdlora.training_data import make_dataset, micro_batches_per_step

MODEL = REPO_ROOT / "models" / "tiny-sd-world"


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def test_every_constant_round_trips_through_the_toml_writer(tmp_path):
    """toml_text of every constant, read back by read_run_config, gives the same values and types, also for
    strings with quotes, backslashes, newlines and non-ASCII, tiny and huge floats and infinity."""
    values = dict(train_lora.DEFAULTS) | {
        "fallback_caption": 'a "quoted" \\ back\tslash\nline, café', "learning_rate": 5e-10,
        "adam_weight_decay": 1e22, "snr_gamma": math.inf, "sample_prompts": ("one", 'two "2"')}
    read = read_run_config(write(tmp_path / "all.toml", toml_text(values, "header\nlines")), train_lora.DEFAULTS)
    assert read == values
    assert all(type(read[name]) is type(value) for name, value in values.items())


def test_flags_override_the_config_file_which_overrides_the_constants(tmp_path):
    """--config sets rank and alpha; a flag after it still wins for rank."""
    config = write(tmp_path / "run.toml", "rank = 16\nalpha = 2\nsample_prompts = ['a', 'b']\n")
    cfg = train_lora.parse_config(["--config", str(config), "--rank", "8"])
    assert (cfg.rank, cfg.alpha, cfg.sample_prompts) == (8, 2.0, ("a", "b"))
    assert cfg.learning_rate == train_lora.DEFAULTS["learning_rate"]


@pytest.mark.parametrize("text, words", [
    ("learning_rat = 1e-4\n", "unknown setting 'learning_rat'; did you mean 'learning_rate'"),
    ("rank = 4\nalpha 4\n", r"not valid TOML: .*\(at line 2, column 7\)"),
    ("rank = 4.5\n", "rank = 4.5: expected a whole number"),
    ("random_flip = 'yes'\n", "random_flip = 'yes': expected true or false"),
    ("sample_prompts = 'one'\n", "sample_prompts = 'one': expected a list of strings"),
    ("judge_multipliers = ['1.0']\n", r"judge_multipliers = \['1.0'\]: expected a list of numbers"),
])
def test_a_bad_run_config_is_refused_naming_the_file_and_the_fix(tmp_path, text, words):
    """An unknown key (with the nearest name), a syntax error (line and column), a value of the wrong type."""
    config = write(tmp_path / "run.toml", text)
    with pytest.raises(ConfigError, match=f"--config {config}: {words}"):
        train_lora.parse_config(["--config", str(config)])


def test_a_run_writes_its_resolved_settings_as_a_config_that_reproduces_it(tmp_path):
    """output_dir/config.toml, read back with --config, gives the run's settings (mixed_precision as resolved)."""
    config = write(tmp_path / "run.toml", f"pretrained_model_name_or_path = '{MODEL}'\nresolution = 64\n"
                                          f"max_train_steps = 1\ncheckpointing_steps = 0\nsample_steps = 0\n"
                                          f"sample_prompts = []\ninterop_check = false\nrank = 2\n"
                                          f"output_dir = '{tmp_path / 'out'}'\n")
    cfg = train_lora.parse_config(["--config", str(config), "--learning_rate", "3e-4"])
    train_lora.main(cfg)
    again = train_lora.parse_config(["--config", str(tmp_path / "out" / RUN_CONFIG_NAME)])
    expected = vars(cfg) | {"mixed_precision": "no", "config": str(tmp_path / "out" / RUN_CONFIG_NAME)}
    assert vars(again) == expected


KOHYA_DOCS_LAYOUT = """\
[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1

# This is a DreamBooth-style dataset
[[datasets]]
resolution = 64
keep_tokens = 2

  [[datasets.subsets]]
  image_dir = '{hoge}'
  class_tokens = 'hoge girl'
  num_repeats = 10
  # This subset uses keep_tokens = 2 (the value of the parent datasets)

  [[datasets.subsets]]
  image_dir = '{fuga}'
  class_tokens = 'fuga boy'
  keep_tokens = 3

  [[datasets.subsets]]
  is_reg = true
  image_dir = '{reg}'
  class_tokens = 'human'
  keep_tokens = 1

[[datasets]]
resolution = [128, 128]
enable_bucket = true

  [[datasets.subsets]]
  image_dir = '{piyo}'
  caption_extension = '.caption'
"""


def kohya_folders(tmp_path) -> dict:
    from PIL import Image
    folders = {}
    for name, size in (("hoge", (64, 64)), ("fuga", (64, 64)), ("reg", (64, 64)), ("piyo", (256, 128))):
        folder = tmp_path / name
        folder.mkdir()
        Image.new("RGB", size, (200, 10, 10)).save(folder / "a.png")
        folders[name] = folder
    (folders["fuga"] / "a.txt").write_text("fuga boy, red, square")
    (folders["piyo"] / "a.caption").write_text("piyo caption")
    return folders


def test_a_kohya_dataset_toml_in_the_layout_of_kohyas_docs_is_read(tmp_path):
    """kohya's documented example (config_README-en.md), with its fine-tuning dataset's metadata_file and the
    batch sizes left out: subset over dataset over general; repeats, class_tokens as the caption of a picture without
    one, is_reg as class images, per-dataset resolution and buckets, a subset's caption_extension."""
    folders = kohya_folders(tmp_path)
    config = write(tmp_path / "dataset.toml", KOHYA_DOCS_LAYOUT.format(**folders))
    cfg = train_lora.parse_config(["--dataset_config", str(config)])
    subsets = read_dataset_config(config, cfg)
    assert [(s.image_dir.name, s.num_repeats, s.keep_tokens, s.shuffle_caption, s.is_reg, s.resolution,
             s.enable_bucket, s.caption_extension) for s in subsets] == [
        ("hoge", 10, 2, True, False, 64, False, ".txt"), ("fuga", 1, 3, True, False, 64, False, ".txt"),
        ("reg", 1, 1, True, True, 64, False, ".txt"), ("piyo", 1, 1, True, False, 128, True, ".caption")]
    data = make_dataset(cfg, cfg.dataset_path, with_classes=True)
    by_folder = {e.path.parent.name: (e.caption, e.prior, data.sizes[i]) for i, e in enumerate(data.examples)}
    assert by_folder == {"hoge": ("hoge girl", False, (64, 64)), "fuga": ("fuga boy, red, square", False, (64, 64)),
                         "reg": ("human", True, (64, 64)), "piyo": ("piyo caption", False, (128, 64))}
    assert len(data) == 13 and has_class_subsets(str(config)) and micro_batches_per_step(cfg) == 2


def test_kohyas_docs_example_as_written_is_refused_at_its_first_unsupported_key(tmp_path):
    """The documented example as kohya writes it uses batch_size: refused by name, with the flag to use instead."""
    folders = kohya_folders(tmp_path)
    text = KOHYA_DOCS_LAYOUT.format(**folders).replace("keep_tokens = 2\n", "batch_size = 4\nkeep_tokens = 2\n", 1)
    config = write(tmp_path / "dataset.toml", text)
    with pytest.raises(ConfigError, match=r"\[\[datasets\]\] 1: kohya's 'batch_size' is not supported: set "
                                          r"--train_batch_size"):
        train_lora.check_config(train_lora.parse_config(["--dataset_config", str(config)]))


SUBSET = "[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{hoge}'\n"


@pytest.mark.parametrize("text, words", [
    (SUBSET + "flip_aug = true\n", "'flip_aug' is not supported: set --random_flip true"),
    (SUBSET + "num_repeat = 3\n", "unknown key 'num_repeat'; did you mean 'num_repeats'"),
    ("[general]\nimage_dir = '{hoge}'\n" + SUBSET, r"\[general\]: 'image_dir' belongs in a \[\[datasets.subsets\]\]"),
    (SUBSET + "resolution = 64\n", "'resolution' belongs in"),
    (SUBSET.replace("{hoge}", "{hoge}/missing"), "is not a folder"),
    (SUBSET.replace("]]\n[[", "]]\nresolution = 60\n[[", 1), "resolution = 60: expected a positive multiple of 8"),
    (SUBSET + "is_reg = true\n", "every subset is is_reg"),
    (SUBSET + "num_repeats == 3\n", r"not valid TOML: .*\(at line 4, column"),
])
def test_a_bad_kohya_dataset_toml_is_refused_at_start(tmp_path, text, words):
    """Unsupported kohya keys (with what to do instead), unknown keys (nearest name), keys at the wrong level, a
    missing folder, a bad resolution, only class images, a syntax error: each refused by check_config."""
    folders = kohya_folders(tmp_path)
    config = write(tmp_path / "dataset.toml", text.format(**folders))
    with pytest.raises(ConfigError, match=words):
        train_lora.check_config(train_lora.parse_config(["--dataset_config", str(config)]))


def test_a_dataset_config_beside_a_dataset_path_is_refused(tmp_path):
    """The TOML names every folder: a dataset_path or class_data_path beside it is a mistake."""
    folders = kohya_folders(tmp_path)
    config = write(tmp_path / "d.toml", f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{folders['hoge']}'\n")
    with pytest.raises(ConfigError, match="leave --dataset_path and --class_data_path unset"):
        train_lora.check_config(train_lora.parse_config(["--dataset_config", str(config), "--dataset_path",
                                                         str(folders["fuga"])]))


def test_the_shipped_examples_load(monkeypatch):
    """examples/run.toml and examples/dataset.toml are valid: every key known, the folder there."""
    monkeypatch.chdir(REPO_ROOT)
    cfg = train_lora.parse_config(["--config", "examples/run.toml"])
    train_lora.check_config(cfg)
    subsets = read_dataset_config(cfg.dataset_config, cfg)
    assert [(s.image_dir.name, s.num_repeats, s.enable_bucket) for s in subsets] == [("dataset", 2, True)]
    assert len(CustomDataset(REPO_ROOT / "examples" / "dataset", subsets=subsets, resolution=cfg.resolution)) == 8
