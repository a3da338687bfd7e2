"""report.html: one self-contained page per run folder, to look at while and after training.

It shows the loss (every logged step, and smoothed) and the learning rate over the steps, the
previews in order with their step numbers, the settings and the model, and the files the run
wrote. Everything it needs is read back from the run folder (config.json, loss.jsonl,
previews/), so the trainer calls it in one line after each preview and at the end. The page is
plain HTML with inline SVG curves and base64 PNG images: no server, no JavaScript, no files
beside it, so it can be mailed or attached to an issue as it is.

The polylines carry ids (loss-raw, loss-smooth, lr) and the images a data-step attribute, which
is how the tests count what the page draws.
"""
from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import re
from pathlib import Path

from PIL import Image

import minti.atomic as atomic

log = logging.getLogger("minti")

REPORT_FILE = "report.html"
SMOOTHING = 0.9  # exponential moving average of the loss; the raw curve of a diffusion loss is mostly noise
THUMBNAIL = 512  # previews larger than this (SDXL's 1024²) are embedded scaled down, to keep the page light
WIDTH, HEIGHT, PAD, LEFT = 760, 240, 40, 80  # SVG chart size, margin and left margin (the y labels), in CSS px

_PREVIEW_STEP = re.compile(r"-(\d+)\.png$")


def previews(folder: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every preview in folder/previews, in step order."""
    found = []
    for path in (Path(folder) / "previews").glob("*.png"):
        match = _PREVIEW_STEP.search(path.name)
        if match and not path.name.startswith("."):
            found.append((int(match.group(1)), path))
    return sorted(found)


def newest_preview(folder: str | Path) -> Path | None:
    found = previews(folder)
    return found[-1][1] if found else None


def read_loss_log(folder: str | Path) -> list[dict]:
    """The records of loss.jsonl (a torn or foreign line is skipped)."""
    path = Path(folder) / "loss.jsonl"
    records = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
    return records


def smoothed(values: list[float], factor: float = SMOOTHING) -> list[float]:
    """Debiased exponential moving average (the first values are not pulled towards 0)."""
    out, average = [], 0.0
    for i, v in enumerate(values, start=1):
        average = factor * average + (1 - factor) * v
        out.append(average / (1 - factor ** i))
    return out


# ------------------------------------------------------------------------------- drawing


def _scale(lo: float, hi: float, size: float, flip: bool):
    span = (hi - lo) or 1.0
    return lambda v: (size - (v - lo) / span * size) if flip else ((v - lo) / span * size)


def _chart(title: str, steps: list[int], series: list[tuple[str, str, list[float]]], y_format: str) -> str:
    """One SVG chart: x = steps, one polyline per (id, colour, values) series, sharing a y axis."""
    values = [v for _, _, vs in series for v in vs]
    if not steps or not values:
        return f"<p class='empty'>{html.escape(title)}: nothing logged yet</p>"
    x_lo, x_hi = min(steps), max(steps)
    y_lo, y_hi = min(values), max(values)
    if y_lo == y_hi:
        y_lo, y_hi = y_lo - 0.5 * (abs(y_lo) or 1.0), y_hi + 0.5 * (abs(y_hi) or 1.0)
    w, h = WIDTH - LEFT - PAD, HEIGHT - 2 * PAD
    x = _scale(x_lo, x_hi if x_hi > x_lo else x_lo + 1, w, flip=False)
    y = _scale(y_lo, y_hi, h, flip=True)
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{WIDTH}' height='{HEIGHT}' "
             f"viewBox='0 0 {WIDTH} {HEIGHT}' role='img' aria-label='{html.escape(title)}'>",
             f"<text x='{LEFT}' y='{PAD - 20}' class='title'>{html.escape(title)}</text>",
             f"<g transform='translate({LEFT},{PAD})'>",
             f"<rect width='{w}' height='{h}' class='frame'/>"]
    for frac in (0.0, 0.5, 1.0):  # three y ticks and the two x ends are enough to read a trend
        v = y_lo + frac * (y_hi - y_lo)
        parts.append(f"<text x='-6' y='{y(v):.1f}' class='tick' text-anchor='end'>{format(v, y_format)}</text>")
    parts.append(f"<text x='0' y='{h + 16}' class='tick'>step {x_lo}</text>")
    parts.append(f"<text x='{w}' y='{h + 16}' class='tick' text-anchor='end'>step {x_hi}</text>")
    for ident, colour, vs in series:
        points = " ".join(f"{x(s):.2f},{y(v):.2f}" for s, v in zip(steps, vs))
        parts.append(f"<polyline id='{ident}' points='{points}' fill='none' stroke='{colour}' stroke-width='1.2'/>")
    legend = " &#160; ".join(f"<tspan fill='{c}'>&#9473; {html.escape(i)}</tspan>" for i, c, _ in series)
    parts.append(f"<text x='{w}' y='-8' class='tick' text-anchor='end'>{legend}</text>")
    parts.append("</g></svg>")
    return "".join(parts)


def _png_data(path: Path) -> str:
    """The image as a data: URL, scaled down when larger than THUMBNAIL."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as img:
        if max(img.size) > THUMBNAIL:
            img.thumbnail((THUMBNAIL, THUMBNAIL))
            buffer = io.BytesIO()
            img.save(buffer, format="PNG")
            data = buffer.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _table(rows: list[tuple[str, object]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; max-width: 1100px; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 28px; }
svg .title { font-weight: 600; font-size: 13px; } svg .tick { font-size: 11px; fill: #555; }
svg .frame { fill: #fafafa; stroke: #ccc; }
.previews { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; text-align: center; } figure img { max-width: 256px; image-rendering: auto; border: 1px solid #ddd; }
table { border-collapse: collapse; } th, td { text-align: left; padding: 2px 12px 2px 0; vertical-align: top; }
th { font-weight: 500; color: #555; } td { font-family: ui-monospace, monospace; font-size: 12px; }
"""


def render(folder: str | Path) -> str:
    """The report page of the run in `folder`, as HTML text."""
    folder = Path(folder)
    try:
        record = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = {}
    config = record.get("config", {}) if isinstance(record, dict) else {}
    token = config.get("token", folder.name)
    records = read_loss_log(folder)
    finite = [r for r in records if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
    steps = [r["step"] for r in finite]
    losses = [float(r["loss"]) for r in finite]
    lr_records = [r for r in records if isinstance(r.get("lr"), (int, float))]
    body = [f"<h1>minti textual inversion: {html.escape(str(token))}</h1>"]
    if records:
        last = records[-1]
        body.append(f"<p>step {last['step']} of {config.get('steps', '?')}; {len(records)} steps logged"
                    + (f", {len(records) - len(finite)} of them with a non-finite loss (not drawn)"
                       if len(finite) < len(records) else "") + "</p>")
    body.append("<h2>Loss</h2>")
    body.append(_chart("loss per step", steps, [("loss-raw", "#9bb7d4", losses),
                                               ("loss-smooth", "#1f4e8c", smoothed(losses))], ".4g"))
    body.append(_chart("learning rate", [r["step"] for r in lr_records],
                       [("lr", "#b5542b", [float(r["lr"]) for r in lr_records])], ".2e"))
    shown = previews(folder)
    body.append(f"<h2>Previews ({len(shown)})</h2><div class='previews'>")
    for step, path in shown:
        try:
            src = _png_data(path)
        except Exception as e:  # a preview being replaced or damaged must not cost the page
            body.append(f"<figure><figcaption>step {step}: unreadable ({html.escape(str(e))})</figcaption></figure>")
            continue
        body.append(f"<figure><img src='{src}' alt='preview at step {step}' data-step='{step}'>"
                    f"<figcaption>step {step}</figcaption></figure>")
    body.append("</div>")
    body.append("<h2>Settings</h2>")
    model = [("model", record.get("model", "?")), ("dtype", record.get("dtype", "?")),
             ("weights", record.get("weights") or "dtype"), ("device", record.get("device", "?")),
             ("minti", record.get("minti", "?"))]
    if isinstance(record.get("identity"), dict):
        model += [(k, v) for k, v in record["identity"].items()]
    body.append(_table(model + sorted(config.items())))
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.name != REPORT_FILE) if folder.is_dir() else []
    body.append(f"<h2>Files</h2>")
    body.append(_table([(p.name, _size(p.stat().st_size)) for p in files]
                       + ([("previews/", f"{len(shown)} images")] if shown else [])))
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>minti: {html.escape(str(token))}</title><style>{STYLE}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def write(folder: str | Path) -> Path:
    """Write folder/report.html atomically; -> its path."""
    path = Path(folder) / REPORT_FILE
    atomic.write_text(path, render(folder))
    return path


def write_quietly(folder: str | Path) -> None:
    """write(), where a failure is a warning: the report must never cost the run."""
    try:
        write(folder)
    except Exception as e:  # a full disk, a vanished folder, a damaged preview: the run goes on
        log.warning("could not write %s (%s: %s); training goes on", Path(folder) / REPORT_FILE,
                    type(e).__name__, e)
