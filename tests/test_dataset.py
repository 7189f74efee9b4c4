"""CustomDataset: finding, decoding, captioning and skipping."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from dataset import CustomDataset, DatasetError, load_image
from planted import PIXELS, SKIPPED, USABLE, make_planted_dataset, save, solid


@pytest.fixture
def planted(tmp_path):
    return make_planted_dataset(tmp_path / "data")


def test_planted_folder_keeps_usable_and_skips_exactly_the_bad(planted, caplog):
    """Every unusable file is skipped with one warning and a reason; hidden files are not mentioned."""
    with caplog.at_level(logging.WARNING):
        data = CustomDataset(planted, resolution=64, fallback_caption="sks photo")
    used = sorted(str(e.path.relative_to(planted)) for e in data.examples)
    assert used == sorted(USABLE)
    reasons = {s["file"]: s["reason"] for s in data.skipped}
    assert set(reasons) == set(SKIPPED)
    for name, word in SKIPPED.items():
        assert word in reasons[name], (name, reasons[name])
    assert "0xe9" in reasons["latin1.jpg"]
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == len(SKIPPED) and all(m.startswith("skipping ") for m in warned)
    assert not any("DS_Store" in m or "Thumbs" in m or "._good" in m or ".cache" in m for m in warned)
    assert f"{len(USABLE)} usable, {len(SKIPPED)} skipped" in data.summary()
    # The too-small image's reason names both ways out, and the lower resolution it names does keep it.
    assert "train at --resolution 32 or lower, or upscale the file itself" in reasons["tiny.png"]
    assert "tiny.png" in [e.path.name for e in CustomDataset(planted, resolution=32).examples]


def test_report_lists_every_skipped_file(planted, tmp_path):
    """data_report.json names each skipped file with its reason and counts the usable ones."""
    data = CustomDataset(planted, resolution=64)
    report = json.loads(data.write_report(tmp_path / "out" / "data_report.json").read_text())
    assert report["usable"] == len(USABLE) and report["skipped_count"] == len(SKIPPED)
    assert {s["file"] for s in report["skipped"]} == set(SKIPPED)


def test_captions_from_text_files_and_fallback(planted):
    """Same-stem .txt captions are read (sub-folders, BOM); images without one, or an empty one, get the fallback."""
    data = CustomDataset(planted, resolution=64, fallback_caption="sks photo")
    captions = {e.path.name: e.caption for e in data.examples}
    assert captions["good.jpg"] == "a red square"
    assert captions["nested.png"] == "nested caption"
    assert captions["bom.png"] == "caption with a byte order mark"
    assert captions["UPPER.JPG"] == captions["empty_caption.png"] == "sks photo"


@pytest.mark.parametrize("name, xy, rgb, tolerance", PIXELS)
def test_odd_images_decode_to_the_right_pixels(planted, name, xy, rgb, tolerance):
    """Transparency becomes white, 16-bit grey is scaled (not clipped), CMYK, palette and 1-bit come out right."""
    image, _ = load_image(planted / name)
    assert image.mode == "RGB"
    assert all(abs(a - b) <= tolerance for a, b in zip(image.getpixel(xy), rgb)), image.getpixel(xy)


def test_exif_rotation_is_applied(planted):
    """An EXIF orientation-6 JPEG stored 80x64 decodes upright as 64x80, noted."""
    rotated, notes = load_image(planted / "rotated.jpg")
    assert rotated.size == (64, 80) and "EXIF rotation applied" in notes


def test_strict_turns_skips_into_a_refusal_listing_them(planted):
    """strict=True refuses the folder, naming every unusable file."""
    with pytest.raises(DatasetError) as error:
        CustomDataset(planted, resolution=64, strict=True)
    assert all(name in str(error.value) for name in SKIPPED)


def test_check_cache_skips_decoding_unchanged_files_and_notices_changes(planted, tmp_path, monkeypatch):
    """With a cache, a rerun decodes nothing that is unchanged, and re-checks a file that changed."""
    import dataset as dataset_module

    cache = tmp_path / "cache.json"
    first = CustomDataset(planted, resolution=64, cache_path=cache)
    decoded = []
    original = dataset_module.load_image
    monkeypatch.setattr(dataset_module, "load_image", lambda path: decoded.append(path.name) or original(path))
    CustomDataset(planted, resolution=64, cache_path=cache).examples  # noqa: B018
    assert decoded == []
    (planted / "good.jpg").write_bytes(b"")  # now broken
    second = CustomDataset(planted, resolution=64, cache_path=cache)
    assert decoded == ["good.jpg"] and "good.jpg" in {s["file"] for s in second.skipped}
    assert second.fingerprint() != first.fingerprint()


def test_items_are_square_tensors_in_range(planted):
    """pixel_values is float 3xRxR within [-1, 1]; a red image stays red after normalisation."""
    data = CustomDataset(planted, resolution=32)
    item = data[[e.path.name for e in data.examples].index("good.jpg")]
    pixels = item["pixel_values"]
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert pixels[0].mean() > 0.4 and pixels[2].mean() < -0.6  # red high, blue low


def test_random_crop_and_flip_replay_for_same_epoch(tmp_path):
    """Random crops/flips depend only on (seed, epoch, index): same epoch same pixels, another epoch differs."""
    gradient = np.tile(np.arange(256, dtype=np.uint8), (64, 1))
    save(Image.fromarray(np.stack([gradient] * 3, axis=-1)), tmp_path / "d" / "g.png")
    data = CustomDataset(tmp_path / "d", resolution=32, center_crop=False, random_flip=True, seed=3)
    first = data[0]["pixel_values"]
    assert torch.equal(first, data[0]["pixel_values"])
    different = False
    for epoch in range(1, 6):
        data.begin_epoch(epoch)
        different |= not torch.equal(first, data[0]["pixel_values"])
    assert different


def test_metadata_jsonl_captions(tmp_path):
    """metadata.jsonl (file_name, text) supplies captions, relative to the dataset folder."""
    root = tmp_path / "d"
    save(solid(), root / "img" / "a.png")
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "img/a.png", "text": "from metadata"}) + "\n")
    assert CustomDataset(root, resolution=32).examples[0].caption == "from metadata"


def test_metadata_csv_captions(tmp_path):
    """metadata.csv with file_name,text columns supplies captions."""
    root = tmp_path / "d"
    save(solid(), root / "a.png")
    (root / "metadata.csv").write_text('file_name,text\na.png,"a, with comma"\n')
    assert CustomDataset(root, resolution=32).examples[0].caption == "a, with comma"


def test_bad_metadata_line_is_named(tmp_path):
    """A broken metadata.jsonl line is an error naming the file and the line number."""
    root = tmp_path / "d"
    save(solid(), root / "a.png")
    (root / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n{broken\n')
    with pytest.raises(DatasetError, match=r"metadata.jsonl line 2"):
        CustomDataset(root, resolution=32)


@pytest.mark.parametrize("setup, message", [
    (lambda root: None, "does not exist"),
    (lambda root: root.mkdir(), r"no images .* \(found: nothing\)"),
    (lambda root: (root.mkdir(), (root / "a.txt").write_text("x")), r"found: 1 \.txt"),
], ids=["missing", "empty", "only-junk"])
def test_unusable_folder_is_refused_saying_what_was_found(tmp_path, setup, message):
    """A missing, empty or junk-only dataset folder is an error that says what it found."""
    root = tmp_path / "d"
    setup(root)
    with pytest.raises(DatasetError, match=message):
        CustomDataset(root, resolution=32)


def test_all_images_unusable_is_refused(tmp_path):
    """A folder whose every image is broken is refused, naming the files."""
    root = tmp_path / "d"
    root.mkdir()
    (root / "a.jpg").write_bytes(b"")
    with pytest.raises(DatasetError, match="a.jpg"):
        CustomDataset(root, resolution=32)


def test_captions_with_another_extension_are_refused(tmp_path):
    """Captions present only as .caption while caption_extension is .txt: refuse, naming the extension found."""
    root = tmp_path / "d"
    save(solid(), root / "a.png")
    (root / "a.caption").write_text("hello")
    with pytest.raises(DatasetError, match=r"ending in '\.caption'.*set caption_extension to '\.caption'"):
        CustomDataset(root, resolution=32)
    assert CustomDataset(root, resolution=32, caption_extension=".caption").examples[0].caption == "hello"


def test_doctor_reports_counts_duplicates_captions_buckets_and_tokens(planted, tiny_model_dir):
    """The dataset doctor names the skipped files, the duplicate group, the caption files present, the buckets
    and the token lengths (with the over-limit caption counted)."""
    from transformers import CLIPTokenizer

    from dataset import doctor_report

    (planted / "sub" / "copy.jpg").write_bytes((planted / "good.jpg").read_bytes())
    tokenizer = CLIPTokenizer.from_pretrained(tiny_model_dir, subfolder="tokenizer")
    report = doctor_report(planted, resolution=64, tokenizer=tokenizer)
    assert f"images: {len(USABLE) + 1} usable, {len(SKIPPED)} skipped, 4 hidden/system files ignored" in report
    assert all(f"skipped {name}:" in report for name in SKIPPED)
    assert "good.jpg = sub/copy.jpg" in report
    assert "caption files present: 6 .txt" in report
    assert "aspect-ratio buckets at this resolution: 64x64:" in report
    assert "1 over the 77-token limit" in report


def test_doctor_command_line_refuses_a_missing_folder(tmp_path):
    """`python dataset.py --check MISSING` prints one error line naming the folder, no traceback."""
    import subprocess
    import sys

    from conftest import REPO_ROOT

    result = subprocess.run([sys.executable, "dataset.py", "--check", str(tmp_path / "missing")], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "error: dataset folder" in result.stderr and "Traceback" not in result.stderr
