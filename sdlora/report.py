"""Write report.html into a training run's output folder: loss plot, sample grids, evaluation metrics, dataset
summary and configuration, in one page that opens from disk (no server, no network, nothing external).

    python evaluate.py report out/dog   # writes out/dog/report.html and out/dog/loss.png

It reads what train_lora.py leaves in output_dir (config.json, data_report.json, loss_log.jsonl,
samples/step<NNNNNN>-grid.png) plus two optional files: val_loss_log.jsonl (one {"step", "val_loss"} row per
validation), evaluation/metrics.csv (`python evaluate.py sweep --output_dir out/dog/evaluation ...`) and
learning.json with learning.png (what the demo measured the LoRA learned on the tiny model).
Images are linked by relative path, so the folder can be moved or zipped whole. A piece that is missing (a run
still starting, no evaluation yet) gives a note in its section instead of an error.
"""

import csv
import html
import json
import math
import re
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

from PIL import Image, ImageDraw, ImageFont

from sdlora.healing import read_heals
from sdlora.judge import BEST_FILE_NAME, GRID_NAME, JUDGE_DIR, RECOMMENDATION_NAME, TABLE_NAME
from sdlora.run_files import (CONFIG_NAME, DATA_REPORT_NAME, HEALS_LOG_NAME, LOSS_LOG_NAME, SAMPLES_DIR,
                              VAL_LOSS_LOG_NAME)

REPORT_NAME = "report.html"
LOSS_PLOT_NAME = "loss.png"
METRICS_PATH = "evaluation/metrics.csv"  # where `evaluate.py sweep --output_dir <run>/evaluation` writes its table
LEARNING_NAME = "learning.json"  # demo.py: concept and prior shares, base vs LoRA, by both of the world's readers
LEARNING_GRID_NAME = "learning.png"  # demo.py: base vs LoRA rows on the concept and the known prompts
GRID_PATTERN = re.compile(r"step(\d+)-grid\.png")  # train_lora.py's samples/step<NNNNNN>-grid.png
PLOT_SIZE = (900, 420)  # px, width x height of loss.png
PLOT_MARGINS = (70, 20, 20, 50)  # px: left, top, right, bottom, around the plotting area
RAW_COLOR = (166, 199, 232)  # train loss per step: light, it is noisy
MEAN_COLOR = (31, 119, 180)  # train loss moving average
VAL_COLOR = (214, 39, 40)  # validation loss
GRID_LINE_COLOR = (225, 225, 225)
TEXT_COLOR = (40, 40, 40)


class ReportError(ValueError):
    """A user mistake; the message names it and the fix."""


# ---------------------------------------------------------------------------------------------------------------
# Reading the run


def read_json(path: Path) -> dict | None:
    """The JSON object in `path`, or None when the file is missing or unreadable (the report notes it)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file; a torn last line (a run killed mid-write) and blank lines are left out."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def train_loss_curve(rows: list[dict]) -> tuple[list[int], list[float], int]:
    """(steps, losses, skipped) from loss_log.jsonl rows, sorted by step.

    A resumed run logs the steps after its checkpoint again: the last row written for a step wins. Skipped
    updates (non-finite loss or gradient) are left out of the curve and counted.
    """
    last_row = {}
    for row in rows:
        if isinstance(row.get("step"), int) and isinstance(row.get("loss"), (int, float)):
            last_row[row["step"]] = row
    steps, losses, skipped = [], [], 0
    for step in sorted(last_row):
        loss = float(last_row[step]["loss"])
        if last_row[step].get("skipped") or not math.isfinite(loss):
            skipped += 1
            continue
        steps.append(step)
        losses.append(loss)
    return steps, losses, skipped


def val_loss_curve(rows: list[dict]) -> tuple[list[int], list[float]]:
    """(steps, validation losses) from val_loss_log.jsonl rows, sorted by step, last row per step, finite only."""
    last = {row["step"]: float(row["val_loss"]) for row in rows
            if isinstance(row.get("step"), int) and isinstance(row.get("val_loss"), (int, float))}
    steps = [step for step in sorted(last) if math.isfinite(last[step])]
    return steps, [last[step] for step in steps]


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start): the trend under a noisy diffusion loss."""
    averaged, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        averaged.append(total / min(index + 1, window))
    return averaged


def sample_grids(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every samples/step<NNNNNN>-grid.png, in step order."""
    found = [(int(match.group(1)), path) for path in (output_dir / SAMPLES_DIR).glob("step*-grid.png")
             if (match := GRID_PATTERN.fullmatch(path.name))]
    return sorted(found)


# ---------------------------------------------------------------------------------------------------------------
# Loss plot, drawn with Pillow


def nice_ticks(low: float, high: float, target: int = 6) -> list[float]:
    """About `target` round tick values (1, 2 or 5 times a power of ten apart) covering [low, high]."""
    if high <= low:
        high = low + 1
    raw_step = (high - low) / target
    power = 10 ** math.floor(math.log10(raw_step))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw_step)
    first = math.floor(low / step) * step
    count = math.ceil(high / step) - math.floor(low / step)
    return [round(first + i * step, 12) for i in range(count + 1)]


def tick_label(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.4g}"


def draw_loss_plot(series: list[tuple[str, tuple[int, int, int], list[int], list[float], bool]], path: Path,
                   size: tuple[int, int] = PLOT_SIZE) -> Path:
    """Line plot of `series` (label, colour, steps, values, with markers) with ticked axes and a legend."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)
    left, top, right, bottom = PLOT_MARGINS
    x0, y0, x1, y1 = left, top, size[0] - right, size[1] - bottom
    all_steps = [s for _, _, steps, _, _ in series for s in steps]
    all_values = [v for _, _, _, values, _ in series for v in values]
    x_ticks = nice_ticks(min(all_steps), max(all_steps))
    y_ticks = nice_ticks(min(all_values), max(all_values))

    def to_pixel(step: float, value: float) -> tuple[float, float]:
        px = x0 + (step - x_ticks[0]) / (x_ticks[-1] - x_ticks[0]) * (x1 - x0)
        py = y1 - (value - y_ticks[0]) / (y_ticks[-1] - y_ticks[0]) * (y1 - y0)
        return px, py

    # Grid lines and tick labels first, so the curves are drawn over them.
    for tick in x_ticks:
        px, _ = to_pixel(tick, y_ticks[0])
        draw.line([(px, y0), (px, y1)], fill=GRID_LINE_COLOR)
        draw.text((px, y1 + 6), tick_label(tick), fill=TEXT_COLOR, font=font, anchor="mt")
    for tick in y_ticks:
        _, py = to_pixel(x_ticks[0], tick)
        draw.line([(x0, py), (x1, py)], fill=GRID_LINE_COLOR)
        draw.text((x0 - 6, py), tick_label(tick), fill=TEXT_COLOR, font=font, anchor="rm")
    draw.rectangle([x0, y0, x1, y1], outline=TEXT_COLOR)
    draw.text(((x0 + x1) / 2, size[1] - 6), "optimizer step", fill=TEXT_COLOR, font=font, anchor="mb")
    draw.text((6, y0), "loss", fill=TEXT_COLOR, font=font, anchor="lt")

    for _, color, steps, values, markers in series:
        points = [to_pixel(s, v) for s, v in zip(steps, values)]
        if len(points) > 1:
            draw.line(points, fill=color, width=2, joint="curve")
        if markers or len(points) == 1:
            for px, py in points:
                draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)

    # Legend, top right inside the plotting area.
    line_height = 18
    width = max(draw.textlength(label, font=font) for label, *_ in series) + 40
    lx, ly = x1 - width - 8, y0 + 8
    draw.rectangle([lx, ly, x1 - 8, ly + line_height * len(series) + 6], fill="white", outline=GRID_LINE_COLOR)
    for index, (label, color, *_rest) in enumerate(series):
        cy = ly + 3 + line_height * index + line_height / 2
        draw.line([(lx + 6, cy), (lx + 28, cy)], fill=color, width=3)
        draw.text((lx + 34, cy), label, fill=TEXT_COLOR, font=font, anchor="lm")
    image.save(path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# HTML sections


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def link(output_dir: Path, path: Path) -> str:
    """`path` relative to the report (which lives in output_dir), URL-quoted, for src and href attributes."""
    return esc(quote(path.relative_to(output_dir).as_posix()))


def table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{esc(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def facts_table(rows: list[list]) -> str:
    """A two-column table: a name (as a row header) and its value."""
    body = "".join(f"<tr><th>{esc(name)}</th><td>{esc(value)}</td></tr>" for name, value in rows)
    return f"<table><tbody>{body}</tbody></table>"


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def loss_section(output_dir: Path) -> str:
    rows = read_jsonl(output_dir / LOSS_LOG_NAME)
    steps, losses, skipped = train_loss_curve(rows)
    val_steps, val_losses = val_loss_curve(read_jsonl(output_dir / VAL_LOSS_LOG_NAME))
    (output_dir / LOSS_PLOT_NAME).unlink(missing_ok=True)  # never show a plot left from an older report
    if not steps and not val_steps:
        return "<h2>Loss</h2>" + note("No loss logged yet (loss_log.jsonl is missing or empty).")
    series = []
    if steps:
        window = max(2, len(steps) // 20)  # a twentieth of the run: smooth enough to read a trend, still local
        series.append(("train loss", RAW_COLOR, steps, losses, False))
        if len(steps) > window:
            series.append((f"train loss, mean of {window} steps", MEAN_COLOR, steps,
                           moving_average(losses, window), False))
    if val_steps:
        series.append(("validation loss", VAL_COLOR, val_steps, val_losses, True))
    draw_loss_plot(series, output_dir / LOSS_PLOT_NAME)
    attempts = len({row.get("run") for row in rows})
    facts = [f"{len(steps)} optimizer steps plotted (last step {steps[-1]}, last loss {losses[-1]:.4g})" if steps
             else "no train loss logged", f"skipped updates (non-finite loss or gradient): {skipped}",
             f"{attempts} attempt(s) wrote the log (a resume starts a new one)"]
    if val_steps:
        facts.append(f"last validation loss {val_losses[-1]:.4g} at step {val_steps[-1]}")
    image = output_dir / LOSS_PLOT_NAME
    return (f'<h2>Loss</h2><img class="plot" src="{link(output_dir, image)}" alt="loss over optimizer steps" '
            f'width="{PLOT_SIZE[0]}" height="{PLOT_SIZE[1]}"><p>{esc("; ".join(facts))}.</p>')


def healing_section(output_dir: Path) -> str:
    """Only for runs that rolled back (heals.jsonl): each rollback of a diverging run, in order."""
    heals = read_heals(output_dir / HEALS_LOG_NAME)
    if not heals:
        return ""
    rows = [[heal["step"], heal["streak"], f"{heal['checkpoint']} (step {heal['rolled_back_to']})",
             f"x{heal['lr_factor']:g}", ", ".join(f"{rate:.3g}" for rate in heal.get("learning_rates", [])),
             f"{heal['retry']} of {heal['retries']}", ", ".join(heal.get("dropped", [])) or "none"] for heal in heals]
    legend = note("max_nonfinite_steps non-finite steps in a row sent the run back to the newest valid checkpoint "
                  "saved before them, at a lower learning rate (nonfinite_lr_factor per rollback).")
    return "<h2>Healing</h2>" + legend + table(
        ["at step", "non-finite in a row", "rolled back to", "learning rate", "new base rates", "retry",
         "checkpoints removed (saved during the streak)"], rows)


def samples_section(output_dir: Path, config: dict | None) -> str:
    grids = sample_grids(output_dir)
    if not grids:
        return "<h2>Samples</h2>" + note("No sample grids yet (samples/step<NNNNNN>-grid.png).")
    config = config or {}
    # A run from before the rename saved its sample prompts as validation_prompts.
    prompts = list(config.get("sample_prompts", config.get("validation_prompts")) or [])
    if config.get("sample_prompts_file"):
        caption = note(f"Prompts, left to right: the lines of {config['sample_prompts_file']}")
    else:
        caption = note("Prompts, left to right: " + " | ".join(prompts)) if prompts else ""
    figures = []
    for step, path in grids:
        label = f"step {step}" + (" (base model, before training)" if step == 0 else "")
        href = link(output_dir, path)
        figures.append(f'<figure><a href="{href}"><img src="{href}" alt="{esc(label)}"></a>'
                       f"<figcaption>{esc(label)}</figcaption></figure>")
    return f'<h2>Samples</h2>{caption}<div class="grids">{"".join(figures)}</div>'


def metrics_section(output_dir: Path) -> str:
    path = output_dir / METRICS_PATH
    if not path.is_file():
        return ("<h2>Evaluation</h2>" + note(f"No {METRICS_PATH} yet; `python evaluate.py sweep --output_dir "
                                             f"{output_dir / 'evaluation'} ...` writes one."))
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows:
        return "<h2>Evaluation</h2>" + note(f"{METRICS_PATH} is empty.")
    header, body = rows[0], [[format_cell(cell) for cell in row] for row in rows[1:]]
    legend = note(f"From {METRICS_PATH}: FID lower is closer to the reference images, CLIP score higher "
                  f"follows the prompt better.")
    return f"<h2>Evaluation</h2>{legend}{table(header, body)}"


def judge_section(output_dir: Path) -> str:
    """Only for judged runs (judge/recommendation.json): the pick and its rule, the table, the grid."""
    folder = output_dir / JUDGE_DIR
    recommendation = read_json(folder / RECOMMENDATION_NAME)
    if recommendation is None:
        return ""
    with open(folder / TABLE_NAME, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    pick = (f"Recommended: {recommendation['checkpoint']} at multiplier {recommendation['multiplier']:g}, copied to "
            f"{BEST_FILE_NAME}. Rule: {recommendation['rule']}.")
    skipped = note("Skipped: " + "; ".join(recommendation["skipped"])) if recommendation.get("skipped") else ""
    prompts = recommendation.get("prompts", {})
    legend = note(f"{recommendation.get('samples_per_prompt', '?')} images per prompt, the same seeds in every row. "
                  + " ".join(f"{kind} prompts: {' | '.join(texts)}." for kind, texts in prompts.items() if texts))
    grid = folder / GRID_NAME
    figure = (f'<figure><img src="{link(output_dir, grid)}" alt="checkpoint x multiplier grid">'
              f"<figcaption>rows: the base model, then each checkpoint; columns: the multipliers</figcaption></figure>"
              if grid.is_file() else "")
    body = [[format_cell(cell) for cell in row] for row in rows[1:]]
    return (f"<h2>Which checkpoint to use</h2><p>{esc(pick)}</p>{skipped}{legend}"
            f"{table(rows[0], body) if rows else ''}{figure}")


def learning_section(output_dir: Path) -> str:
    """Only for runs that were graded (the demo): a run with no learning.json has no such section."""
    learned = read_json(output_dir / LEARNING_NAME)
    if learned is None:
        return ""
    rows = [["concept prompts", f"{learned['concept_base']:.0%}", f"{learned['concept_lora']:.0%}",
             f"{learned['reads']}: " + " | ".join(learned["concept_prompts"])],
            ["known prompts", f"{learned['prior_base']:.0%}", f"{learned['prior_lora']:.0%}",
             "the attributes each prompt names: " + " | ".join(learned["known_prompts"])]]
    earlier = learned.get("palette_grading")  # the same images under the earlier reader, while both are reported
    if earlier:
        rows += [["concept prompts, palette grading", f"{earlier['concept_base']:.0%}",
                  f"{earlier['concept_lora']:.0%}", earlier["grading"]],
                 ["known prompts, palette grading", f"{earlier['prior_base']:.0%}", f"{earlier['prior_lora']:.0%}",
                  "the same images"]]
    legend = note(f"{learned['kind'].capitalize()} concept {learned['concept']}: share of samples "
                  f"({learned['samples_per_prompt']} per prompt, same seeds with and without the LoRA) in which the "
                  f"tiny world's classifier sees what the prompt asks"
                  + (f" ({learned['grading']})." if "grading" in learned else "."))
    grid = output_dir / LEARNING_GRID_NAME
    figure = (f'<figure><img src="{link(output_dir, grid)}" alt="base model and LoRA rows, same seeds">'
              f"<figcaption>each pair of rows: base model, then with the LoRA</figcaption></figure>"
              if grid.is_file() else "")
    return (f"<h2>What the LoRA learned</h2>{legend}"
            f"{table(['prompts', 'base model', 'with the LoRA', 'graded on'], rows)}{figure}")


def format_cell(cell: str) -> str:
    """Numbers with a fraction to 4 significant digits (the CSV keeps full precision), anything else as written."""
    try:
        value = float(cell)
    except ValueError:
        return cell
    return cell if value.is_integer() or not math.isfinite(value) else f"{value:.4g}"


def dataset_section(output_dir: Path) -> str:
    report = read_json(output_dir / DATA_REPORT_NAME)
    if report is None:
        return "<h2>Dataset</h2>" + note("No readable data_report.json.")
    skipped = report.get("skipped") or []
    facts = [["dataset", report.get("dataset_path", "?")], ["usable images", report.get("usable", "?")],
             ["skipped images", report.get("skipped_count", len(skipped))]]
    facts += [[f"note: {text}", count] for text, count in sorted((report.get("notes") or {}).items())]
    parts = ["<h2>Dataset</h2>", facts_table(facts)]
    if skipped:
        parts += ["<h3>Skipped files</h3>",
                  table(["file", "reason"], [[item.get("file", "?"), item.get("reason", "?")] for item in skipped])]
    return "".join(parts)


def config_section(config: dict | None) -> str:
    if config is None:
        return "<h2>Configuration</h2>" + note("No readable config.json.")
    rows = [[name, value if isinstance(value, str) else json.dumps(value)] for name, value in config.items()]
    return "<h2>Configuration</h2>" + note("From config.json: the resolved settings of the run.") + \
        table(["setting", "value"], rows)


STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1150px; color: #222; padding: 0 16px; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 32px; }
table { border-collapse: collapse; font-size: 0.9em; } td, th { border: 1px solid #ddd; padding: 3px 8px;
text-align: left; vertical-align: top; } th { background: #f4f4f4; } td { word-break: break-word; }
.note { color: #666; } .plot { max-width: 100%; height: auto; }
.grids { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
figure { margin: 0; } figure img { max-height: 300px; max-width: 100%; border: 1px solid #ddd; }
figcaption { text-align: center; font-size: 0.9em; color: #444; }
"""


def write_report(output_dir: str | Path) -> Path:
    """Write output_dir/report.html (and output_dir/loss.png) and return the report's path."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise ReportError(f"{output_dir} is not a folder; pass the output_dir of a training run")
    config = read_json(output_dir / CONFIG_NAME)
    written = datetime.now().strftime("%Y-%m-%d %H:%M")
    sections = [learning_section(output_dir), judge_section(output_dir), loss_section(output_dir),
                healing_section(output_dir),
                samples_section(output_dir, config),
                metrics_section(output_dir),
                dataset_section(output_dir), config_section(config)]
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>LoRA run {esc(output_dir.name)}'
            f"</title><style>{STYLE}</style></head><body><h1>LoRA run: {esc(output_dir.name)}</h1>"
            f'{note(f"Report written {written}; python evaluate.py report on this folder rewrites it.")}'
            + "".join(f"<section>{section}</section>" for section in sections if section) + "</body></html>\n")
    path = output_dir / REPORT_NAME
    path.write_text(page, encoding="utf-8")
    return path

