"""What the repository itself holds: no absolute path of any machine, and Markdown links that resolve.

The path rule. A committed file may not name a place that exists on one machine only: the folders where a
machine keeps its users, sessions, scratch space and mounts, and the packages one machine installed. Flagged
are absolute paths under the folders named in MACHINE_ROOTS (home, Users, root, work, mnt, tmp, ...), a Windows
drive's Users folder, and any absolute path through a site-packages or dist-packages folder. Paths that a
distribution puts in the same place on every machine (the Chromium binary, the env of a shebang line) are not
flagged, nor are relative paths, paths from the home folder (~), or a path inside a URL. Text files are scanned
whole; PNG and JPEG images by their metadata (text chunks, EXIF, XMP, comments); safetensors files by their header.
An image's pixels are not read: a screenshot that shows a path has to be checked by eye.
"""

import json
import re
import struct
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO_ROOT

MACHINE_ROOTS = ("home", "Users", "root", "work", "mnt", "media", "scratch", "tmp", "var/tmp", "var/folders",
                 "private/var")
# An absolute path starts the text or follows a character that cannot end a word, a relative path or a host name.
MACHINE_PATH = re.compile(
    r"(?<![\w.~-])(?:/(?:" + "|".join(re.escape(root) for root in MACHINE_ROOTS) + r")/[^\s\"'`<>|]*"
    r"|/[^\s\"'`<>|]*/(?:site|dist)-packages\b[^\s\"'`<>|]*"
    r"|\b[A-Za-z]:(?:\\\\|\\|/)Users(?:\\\\|\\|/)[^\s\"'`<>|]*)")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
EXIF_IFDS = (0x8769, 0x8825, 0xA005)  # Exif, GPS and interoperability sub-directories


def machine_paths(text: str) -> list[str]:
    """Every absolute path of a machine in `text`, by the rule in the module docstring."""
    return [match.group(0) for match in MACHINE_PATH.finditer(text)]


def tracked_files() -> list[Path]:
    listing = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True).stdout
    return [REPO_ROOT / name for name in listing.decode("utf-8").split("\0") if name]


def is_binary(data: bytes) -> bool:
    """Git's rule: a NUL byte in the first 8000 bytes."""
    return b"\0" in data[:8000]


def image_metadata(path: Path) -> str:
    """The text an image carries beside its pixels: PNG text chunks, EXIF (all sub-directories), XMP, comments."""
    with Image.open(path) as image:
        image.load()  # PNG text chunks after the image data are read only now
        parts = [f"{key}={value!r}" for key, value in image.info.items()]
        exif = image.getexif()
        parts += [f"{tag}={value!r}" for tag, value in exif.items()]
        for ifd in EXIF_IFDS:
            parts += [f"{tag}={value!r}" for tag, value in exif.get_ifd(ifd).items()]
    return "\n".join(parts)


def safetensors_header(path: Path) -> str:
    with path.open("rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        return json.dumps(json.loads(file.read(length)).get("__metadata__", {}))


def scannable_text(path: Path) -> str | None:
    """What of a tracked file can carry a path: a text file whole, an image's metadata, a safetensors header."""
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return image_metadata(path)
    if suffix == ".safetensors":
        return safetensors_header(path)
    data = path.read_bytes()
    return None if is_binary(data) else data.decode("utf-8", errors="replace")


def test_no_tracked_file_names_a_machine_path():
    """No tracked text file, image metadata or safetensors header holds an absolute path of one machine."""
    found = {}
    for path in tracked_files():
        text = scannable_text(path) if path.is_file() else None
        if text and machine_paths(text):
            found[str(path.relative_to(REPO_ROOT))] = machine_paths(text)
    assert not found, f"absolute paths of a machine in tracked files (write them relative): {found}"


@pytest.mark.parametrize("planted", [
    "/" + "home/alice/sd/out", "/" + "Users/bob/loras/dog.safetensors", "/" + "root/models", "/" + "work/wt-C/x",
    "/" + "mnt/data/sd14", "/" + "tmp/pytest-of-root/pytest-3/run0", "/" + "private/var/folders/x",
    "C:" + "\\Users\\carol\\dog.safetensors", "C:" + "\\\\Users\\\\carol", "D:/" + "Users/dan",
    "/opt/conda/lib/python3.12/site" + "-packages/torch/nn.py", "/usr/lib/python3/dist" + "-packages/diffusers",
])
def test_the_scanner_finds_a_planted_path(planted):
    """A planted machine path is found in running text, in quotes, in JSON and at the start of a line."""
    for text in (planted, f"written to {planted}.", f'"command": "python x.py --output_dir {planted}"', f"`{planted}`"):
        assert machine_paths(text), text


@pytest.mark.parametrize("legitimate", [
    "#!/usr/bin/env bash", "Path(\"/usr/bin/chromium\")", "out/dog/pytorch_lora_weights.safetensors",
    "https://example.org/home/page", "models/tiny-sd-world/", "~/sd14", "C:\\loras\\a.safetensors",
    "benchmarks/.sd14-random/", "a/home/b",
])
def test_the_scanner_leaves_other_paths(legitimate):
    """System paths that are the same on every machine, relative paths, ~/ and URLs are not flagged."""
    assert machine_paths(legitimate) == []


def test_image_metadata_is_scanned(tmp_path):
    """A path planted in a PNG text chunk or a JPEG's EXIF is found; the same images without it are clean."""
    from PIL.PngImagePlugin import PngInfo
    planted = "/" + "home/alice/demo_output/report.html"
    info = PngInfo()
    info.add_text("parameters", f"saved from {planted}")
    Image.new("RGB", (4, 4)).save(tmp_path / "planted.png", pnginfo=info)
    exif = Image.Exif()
    exif[0x010E] = planted  # ImageDescription
    Image.new("RGB", (4, 4)).save(tmp_path / "planted.jpg", exif=exif)
    Image.new("RGB", (4, 4)).save(tmp_path / "clean.png")
    assert machine_paths(scannable_text(tmp_path / "planted.png")) == [planted]
    assert machine_paths(scannable_text(tmp_path / "planted.jpg")) == [planted]
    assert machine_paths(scannable_text(tmp_path / "clean.png")) == []


# --- Markdown links ---

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    body = re.sub(r"```.*?```", "", markdown, flags=re.S)
    return {github_anchor(line.lstrip("#")) for line in body.splitlines() if re.match(r"#{1,6} ", line)}


def broken_links(path: Path, root: Path, tracked: set[str]) -> list[str]:
    """Relative links (and #anchors) of a Markdown file that name no tracked file or folder, or no heading there."""
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    folders = {str(parent) for name in tracked for parent in Path(name).parents}
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto: ...
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        name = str(linked.relative_to(root.resolve())) if linked.is_relative_to(root.resolve()) else None
        if name not in tracked and name not in folders:
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text(encoding="utf-8")):
            broken.append(target)
    return broken


def test_markdown_links_resolve():
    """Every relative link in a tracked Markdown file names a tracked file or folder, and its #anchor a heading."""
    files = tracked_files()
    tracked = {str(p.relative_to(REPO_ROOT)) for p in files}
    found = {str(p.relative_to(REPO_ROOT)): broken_links(p, REPO_ROOT, tracked) for p in files if p.suffix == ".md"}
    found = {name: links for name, links in found.items() if links}
    assert not found, f"broken links: {found}"


def test_the_link_check_finds_broken_links(tmp_path):
    """A link to a missing file, one outside the repository and one to a missing heading are reported."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("# Read me\n", encoding="utf-8")
    page = tmp_path / "docs" / "page.md"
    page.write_text("# Title\n[a](../README.md#read-me) [b](missing.md) [c](#title) [d](#no-such-heading)\n"
                    "[e](../../elsewhere.md) [f](../docs/) ![g](../README.md)\n", encoding="utf-8")
    tracked = {"README.md", "docs/page.md"}
    assert broken_links(page, tmp_path, tracked) == ["missing.md", "#no-such-heading", "../../elsewhere.md"]
