"""CustomDataset: finding, decoding, captioning and skipping."""

import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from dataset import CustomDataset, DatasetError, load_image

RED = (200, 30, 30)


def solid(size=(80, 64), color=RED, mode="RGB") -> Image.Image:
    return Image.new(mode, size, color)


def save(image: Image.Image, path, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)


@pytest.fixture
def planted(tmp_path):
    """A folder with good, odd-but-valid and unusable files side by side."""
    root = tmp_path / "data"
    save(solid(), root / "good.jpg", quality=95)
    (root / "good.txt").write_text("a red square\n", encoding="utf-8")
    save(solid(), root / "UPPER.JPG", quality=95)
    save(solid(), root / "sub" / "nested.png")
    (root / "sub" / "nested.txt").write_text("nested caption", encoding="utf-8")
    rgba = Image.new("RGBA", (64, 64), (0, 0, 255, 0))  # fully transparent blue: must become white
    save(rgba, root / "transparent.png")
    sixteen = Image.fromarray(np.full((64, 64), 65535 // 2, dtype=np.uint16))  # mid grey at 16 bits
    save(sixteen, root / "grey16.png")
    # EXIF orientation 6 (rotate 90 CW to display): stored 80x64 must come out 64x80.
    exif = Image.Exif()
    exif[0x0112] = 6
    save(solid((80, 64)), root / "rotated.jpg", exif=exif.tobytes())
    # Unusable: truncated JPEG, zero bytes, text named .png, tiny image, non-UTF-8 caption.
    buffer = io.BytesIO()
    solid((256, 256)).save(buffer, format="JPEG")
    (root / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.png").write_text("not an image", encoding="utf-8")
    save(solid((8, 8)), root / "tiny.png")
    save(solid(), root / "latin1.jpg")
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    # Ignored silently.
    (root / ".DS_Store").write_bytes(b"\0\0")
    (root / "._good.jpg").write_bytes(b"\0\0")
    (root / "Thumbs.db").write_bytes(b"\0\0")
    return root


def test_planted_folder_keeps_usable_and_skips_exactly_the_bad(planted, caplog):
    """Every unusable file is skipped with one warning and a reason; hidden files are not mentioned."""
    with caplog.at_level(logging.WARNING):
        data = CustomDataset(planted, resolution=64, fallback_caption="sks photo")
    used = sorted(str(e.path.relative_to(planted)) for e in data.examples)
    assert used == ["UPPER.JPG", "good.jpg", "grey16.png", "rotated.jpg", "sub/nested.png", "transparent.png"]
    reasons = {s["file"]: s["reason"] for s in data.skipped}
    assert set(reasons) == {"truncated.jpg", "empty.jpg", "notes.png", "tiny.png", "latin1.jpg"}
    assert "truncated" in reasons["truncated.jpg"]
    assert "not an image" in reasons["notes.png"] and "not an image" in reasons["empty.jpg"]
    assert "too small" in reasons["tiny.png"]
    assert "not UTF-8" in reasons["latin1.jpg"] and "0xe9" in reasons["latin1.jpg"]
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 5 and all(m.startswith("skipping ") for m in warned)
    assert not any("DS_Store" in m or "Thumbs" in m or "._good" in m for m in warned)
    assert "6 usable, 5 skipped" in data.summary()


def test_report_lists_every_skipped_file(planted, tmp_path):
    """data_report.json names each skipped file with its reason and counts the usable ones."""
    data = CustomDataset(planted, resolution=64)
    report = json.loads(data.write_report(tmp_path / "out" / "data_report.json").read_text())
    assert report["usable"] == 6 and report["skipped_count"] == 5
    assert {s["file"] for s in report["skipped"]} == {s["file"] for s in data.skipped}


def test_captions_from_text_files_and_fallback(planted):
    """Same-stem .txt captions are read (sub-folders too); images without one get the fallback caption."""
    data = CustomDataset(planted, resolution=64, fallback_caption="sks photo")
    captions = {e.path.name: e.caption for e in data.examples}
    assert captions["good.jpg"] == "a red square"
    assert captions["nested.png"] == "nested caption"
    assert captions["UPPER.JPG"] == "sks photo"


def test_odd_images_decode_to_the_right_pixels(planted):
    """Transparency becomes white, 16-bit grey is scaled (not clipped), EXIF rotation is applied."""
    transparent, _ = load_image(planted / "transparent.png")
    assert transparent.getpixel((5, 5)) == (255, 255, 255)
    grey, notes = load_image(planted / "grey16.png")
    assert abs(grey.getpixel((5, 5))[0] - 127) <= 1 and "high bit depth" in notes[0]
    rotated, notes = load_image(planted / "rotated.jpg")
    assert rotated.size == (64, 80) and "EXIF rotation applied" in notes


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
