"""report.py: a self-contained HTML report of a run folder (balanced HTML, local links only, a real loss plot)
that a headless Chromium renders with every image loaded."""

import json
import math
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdlora import report

# Debian's package `chromium` puts the browser on PATH (/usr/bin/chromium); .ci/run and the README's test command
# install it. Missing, the test fails with this line: a suite that skipped it would pass without checking the page.
CHROMIUM_MISSING = ("no `chromium` on PATH for the HTML report test: install Debian's package `chromium` "
                    "(`apt-get update && apt-get install -y chromium`, sudo where you are not root), as the README's "
                    "test command does")
VOID_TAGS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
TRAIN_STEPS = 20
RUN_ID = "20260101-120000/4242"


def make_fake_run(folder: Path) -> Path:
    """A run folder as train_lora.py leaves it (plus a validation loss log and a metrics table), with a resume."""
    folder.mkdir(parents=True)
    config = {"rank": 8, "alpha": 8.0, "learning_rate": 1e-4, "output_dir": str(folder),
              "sample_prompts": ["a photo of sks dog", "sks dog <b>on</b> a beach"]}
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    data_report = {"dataset_path": "my_dog", "usable": 11, "skipped_count": 1,
                   "skipped": [{"file": "broken.jpg", "reason": "truncated JPEG"}], "notes": {"converted to RGB": 2}}
    (folder / "data_report.json").write_text(json.dumps(data_report), encoding="utf-8")
    rows = [{"run": RUN_ID, "step": step, "loss": 0.3 / (1 + 0.2 * step) + 0.02 * math.sin(step), "lr": 1e-4,
             "skipped": False, "time": 1e9 + step} for step in range(1, TRAIN_STEPS + 1)]
    rows[4] = {**rows[4], "loss": float("nan"), "skipped": True}  # a non-finite step the trainer skipped
    rows.append({**rows[15], "run": "20260101-130000/4343", "loss": 0.05})  # a resume rewrites step 16
    (folder / "loss_log.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows) + '{"run": "torn',
                                           encoding="utf-8")
    val_rows = [{"step": step, "val_loss": 0.25 / (1 + 0.1 * step)} for step in (0, 5, 10, 15, 20)]
    (folder / report.VAL_LOSS_LOG_NAME).write_text("".join(json.dumps(row) + "\n" for row in val_rows),
                                                   encoding="utf-8")
    (folder / "samples").mkdir()
    for step, hue in ((10, 0), (0, 120)):  # written out of order: the report sorts by step
        gradient = np.linspace(0, 255, 128, dtype=np.uint8)
        pixels = np.stack([np.tile(gradient, (64, 1)), np.full((64, 128), hue, np.uint8),
                           np.tile(gradient[::-1], (64, 1))], axis=-1)
        Image.fromarray(pixels).save(folder / "samples" / f"step{step:06d}-grid.png")
        Image.fromarray(pixels[:, :64]).save(folder / "samples" / f"step{step:06d}-00.png")
    (folder / "evaluation").mkdir()
    (folder / "evaluation" / "metrics.csv").write_text(
        "checkpoint,multiplier,images,fid,clip_score,images_dir\n"
        "run/checkpoint-10/pytorch_lora_weights.safetensors,0.5,4,123.456789,31.25,00-checkpoint-10-multiplier0.5\n"
        "run/checkpoint-10/pytorch_lora_weights.safetensors,1.0,4,98.7654321,33.5,00-checkpoint-10-multiplier1\n",
        encoding="utf-8")
    return folder


class PageParser(HTMLParser):
    """Collects every src/href and checks that each non-void tag is closed in order."""

    def __init__(self):
        super().__init__()
        self.open_tags, self.errors, self.references, self.tags, self.text = [], [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.references += [(tag, name, value) for name, value in attrs if name in ("src", "href")]
        if tag not in VOID_TAGS:
            self.open_tags.append(tag)

    def handle_endtag(self, tag):
        if not self.open_tags or self.open_tags[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.open_tags[-1:] or 'nothing'}")
        else:
            self.open_tags.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse(path: Path) -> PageParser:
    parser = PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser


def run_chromium(profile: Path, *args: str) -> subprocess.CompletedProcess:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail(CHROMIUM_MISSING, pytrace=False)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={profile}"]
    return subprocess.run([chromium, *flags, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def fake_run(tmp_path) -> Path:
    return make_fake_run(tmp_path / "run é 1")  # a space and a non-ASCII letter, as users name folders


def test_html_is_balanced_and_references_only_local_files(fake_run):
    """The page parses with every tag closed in order, and every src/href is a file beside it, never http(s)."""
    page = report.write_report(fake_run)
    parsed = parse(page)
    assert parsed.errors == [] and parsed.open_tags == [], (parsed.errors, parsed.open_tags)
    assert parsed.tags[:3] == ["html", "head", "meta"] and "script" not in parsed.tags and "link" not in parsed.tags
    assert len(parsed.references) >= 5  # the loss plot, and each of the two grids as image and as link
    for tag, name, value in parsed.references:
        assert not value.startswith(("http:", "https:", "//", "/")), f"<{tag} {name}={value}> is not local"
        assert (page.parent / value).is_file(), f"<{tag} {name}={value}> points to no file"
    assert "http://" not in page.read_text(encoding="utf-8") and "https://" not in page.read_text(encoding="utf-8")


def test_report_shows_each_file_of_the_run_with_grids_in_step_order(fake_run):
    """Config, dataset summary, metrics and loss facts appear (escaped), and the grids are labelled in step order."""
    page = report.write_report(fake_run)
    source = page.read_text(encoding="utf-8")
    text = " ".join(" ".join(parse(page).text).split())
    assert "sks dog <b>on</b> a beach" in text and "<b>on</b>" not in source  # run text is escaped, not markup
    assert "usable images 11" in text and "broken.jpg truncated JPEG" in text and "converted to RGB 2" in text
    assert "123.5" in text and "98.77" in text and "00-checkpoint-10-multiplier1" in text  # metrics.csv rows
    assert f"last step {TRAIN_STEPS}" in text and "2 attempt(s)" in text
    assert "skipped updates (non-finite loss or gradient): 1" in text
    assert source.index("samples/step000000-grid.png") < source.index("samples/step000010-grid.png")
    assert "step 0 (base model, before training)" in text and "step 10" in text
    assert "step000000-00.png" not in source, "only the grids are shown, not every single sample"


def test_a_run_from_before_the_rename_still_shows_its_sample_prompts(fake_run):
    """A run folder written before sample_prompts was renamed saved the prompts as validation_prompts."""
    config_path = fake_run / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["validation_prompts"] = config.pop("sample_prompts")
    config_path.write_text(json.dumps(config), encoding="utf-8")
    text = " ".join(" ".join(parse(report.write_report(fake_run)).text).split())
    assert "Prompts, left to right: a photo of sks dog | sks dog <b>on</b> a beach" in text


def test_loss_plot_is_a_nonblank_png_of_the_stated_size_with_the_validation_curve(fake_run):
    """loss.png is a PNG of PLOT_SIZE with real content, and shows the validation colour only when it is logged."""
    report.write_report(fake_run)
    plot_path = fake_run / report.LOSS_PLOT_NAME
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(plot_path) as plot:
        assert plot.format == "PNG" and plot.size == report.PLOT_SIZE
        pixels = np.asarray(plot.convert("RGB"), dtype=np.int16)
    assert pixels.std() > 10, "the plot is blank"
    for color in (report.RAW_COLOR, report.MEAN_COLOR, report.VAL_COLOR):
        assert (np.abs(pixels - color).sum(-1) == 0).sum() > 50, f"no line drawn in {color}"

    (fake_run / report.VAL_LOSS_LOG_NAME).unlink()
    report.write_report(fake_run)
    with Image.open(plot_path) as plot:
        without_val = np.asarray(plot.convert("RGB"), dtype=np.int16)
    assert (np.abs(without_val - report.VAL_COLOR).sum(-1) == 0).sum() == 0


def test_train_loss_curve_keeps_the_last_row_per_step_and_drops_skipped_updates():
    """A resumed step takes the value written last; a skipped (non-finite) update is counted, not plotted."""
    rows = [{"step": 1, "loss": 0.5}, {"step": 2, "loss": float("nan"), "skipped": True}, {"step": 3, "loss": 0.4},
            {"step": 3, "loss": 0.3}, {"step": 2, "loss": 0.45}]
    assert report.train_loss_curve(rows) == ([1, 2, 3], [0.5, 0.45, 0.3], 0)
    assert report.train_loss_curve(rows[:4]) == ([1, 3], [0.5, 0.3], 1)


def test_a_run_folder_with_missing_pieces_gets_notes_and_no_broken_links(tmp_path):
    """With only config.json (a run just started) the report is written, says what is missing, links nothing."""
    (tmp_path / "config.json").write_text(json.dumps({"rank": 4}), encoding="utf-8")
    page = report.write_report(tmp_path)
    parsed = parse(page)
    text = " ".join(parsed.text)
    assert parsed.errors == [] and parsed.references == [] and not (tmp_path / report.LOSS_PLOT_NAME).exists()
    assert "No loss logged yet" in text and "No sample grids yet" in text and "No readable data_report.json" in text


def test_a_graded_run_shows_both_gradings_the_current_first(tmp_path):
    """A learning.json with a palette_grading block shows the current grading's rows, then the palette grading's."""
    (tmp_path / "config.json").write_text(json.dumps({"rank": 4}), encoding="utf-8")
    figures = {"concept_base": 0.0, "concept_lora": 0.75, "prior_base": 0.9, "prior_lora": 0.5}
    learned = {"concept": "sks-purple", "kind": "style", "reads": "colour == purple", "grading": "classify (new)",
               "concept_prompts": ["a sks circle"], "known_prompts": ["a red square"], "samples_per_prompt": 4,
               **figures, "palette_grading": {"grading": "classify_by_palette (old)", **figures,
                                              "concept_lora": 0.62, "prior_lora": 0.25}}
    (tmp_path / report.LEARNING_NAME).write_text(json.dumps(learned), encoding="utf-8")
    parsed = parse(report.write_report(tmp_path))
    text = " ".join(parsed.text)
    assert parsed.errors == [] and "classify (new)" in text and "classify_by_palette (old)" in text
    assert text.index("75%") < text.index("50%") < text.index("palette grading") < text.index("62%") < text.index("25%")


def test_cli_writes_the_report_and_refuses_a_missing_folder_in_one_line(fake_run, tmp_path):
    """`python evaluate.py report RUN` writes RUN/report.html; a missing folder exits 1 with one `error:` line."""
    done = subprocess.run([sys.executable, "evaluate.py", "report", str(fake_run)], capture_output=True, text=True,
                          cwd=Path(report.__file__).parents[1], timeout=60)
    assert done.returncode == 0 and (fake_run / report.REPORT_NAME).is_file(), done.stderr
    failed = subprocess.run([sys.executable, "evaluate.py", "report", str(tmp_path / "nope")], capture_output=True, text=True,
                            cwd=Path(report.__file__).parents[1], timeout=60)
    assert failed.returncode == 1 and failed.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nope'} is not a folder; pass the output_dir of a training run"]


def test_headless_chromium_renders_the_report_with_every_image_loaded(fake_run, tmp_path):
    """Chromium, offline, screenshots a non-blank page, and every <img> has loaded (naturalWidth > 0), while a
    planted missing image in a copy of the page is reported as not loaded (the check can fail)."""
    page = report.write_report(fake_run)
    image_count = sum(tag == "img" for tag in parse(page).tags)
    screenshot = tmp_path / "report.png"
    shot = run_chromium(tmp_path / "profile-shot", f"--screenshot={screenshot}", "--window-size=1200,2000",
                        page.as_uri())
    assert screenshot.is_file(), f"no screenshot; chromium said: {shot.stderr[-2000:]}"
    with Image.open(screenshot) as image:
        assert image.size == (1200, 2000)
        assert np.asarray(image.convert("L"), dtype=np.float32).std() > 5, "the rendered page is blank"

    # A copy beside the report (same relative paths) with a planted missing image and a script that writes, once
    # the page has loaded, how many images have pixels into the title, where --dump-dom shows it.
    probe = page.with_name("report-probe.html")
    probe_script = ("<img src=\"samples/missing.png\" alt=\"planted\"><script>window.addEventListener('load', () => {"
                    "const images = Array.from(document.images);"
                    "document.title = 'loaded ' + images.filter(i => i.complete && i.naturalWidth > 0).length"
                    " + ' of ' + images.length;});</script></body>")
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", probe_script), encoding="utf-8")
    dom = run_chromium(tmp_path / "profile-dom", "--dump-dom", "--virtual-time-budget=5000", probe.as_uri())
    assert f"<title>loaded {image_count} of {image_count + 1}</title>" in dom.stdout, dom.stdout[:500] + dom.stderr


def test_without_chromium_the_browser_test_fails_with_the_install_command(tmp_path):
    """With no `chromium` on PATH the browser test fails (never skips), saying in one line how to install it."""
    test = f"{Path(__file__).name}::test_headless_chromium_renders_the_report_with_every_image_loaded"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
                          cwd=Path(__file__).parent, env={"PATH": str(tmp_path), "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "1 failed" in done.stdout, done.stdout[-2000:]
    assert CHROMIUM_MISSING in done.stdout.splitlines(), done.stdout[-2000:]  # the message alone: no traceback
