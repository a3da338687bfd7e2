"""report.html from a run folder: structure checked by parsing it here, rendering checked in a real
headless Chromium when one is installed (the OS package; the test skips otherwise)."""
import base64
import io
import json
import logging
import math
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
from PIL import Image

from minti.training import report

STEPS = 7
PREVIEW_STEPS = (0, 3, 7)
COLOURS = {0: (250, 0, 0), 3: (0, 250, 0), 7: (0, 0, 250)}


def make_run(folder, nan_at=None):
    """What a run folder holds after 7 steps with previews at 0, 3 and 7."""
    folder.mkdir(exist_ok=True)
    config = {"token": "<leaf>", "steps": STEPS, "lr": 0.005, "batch_size": 2, "template": "object"}
    record = {"config": config, "model": "/models/v1-5.safetensors", "dtype": "float32", "device": "cpu",
              "weights": None, "identity": {"family": "sd1", "prediction": "eps"}, "minti": "0.1.0"}
    (folder / "config.json").write_text(json.dumps(record))
    lines = [{"step": s, "loss": (float("nan") if s == nan_at else 0.1 + 0.01 * math.sin(s)), "lr": 0.005 * (1 - s / 10)}
             for s in range(1, STEPS + 1)]
    (folder / "loss.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 8, "lo')  # torn
    (folder / "previews").mkdir(exist_ok=True)
    for step in PREVIEW_STEPS:
        Image.new("RGB", (64, 64), COLOURS[step]).save(folder / "previews" / f"leaf-{step:05d}.png")
    (folder / "leaf.safetensors").write_bytes(b"x" * 3000)
    return lines


class Page(HTMLParser):
    """The parts of the page the tests look at."""

    def __init__(self):
        super().__init__()
        self.polylines, self.images, self.captions, self.cells, self.tags = {}, [], [], [], set()
        self.probe = None
        self._in = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        if tag == "polyline":
            self.polylines[a["id"]] = a["points"].split()
        elif tag == "img":
            self.images.append(a)
        elif tag == "body" and "data-probe" in a:
            self.probe = json.loads(a["data-probe"])
        self._in = tag

    def handle_data(self, data):
        if self._in == "figcaption":
            self.captions.append(data)
        elif self._in in ("td", "th"):
            self.cells.append(data)

    def handle_endtag(self, tag):
        self._in = None


def parse(text):
    page = Page()
    page.feed(text)
    return page


def test_the_report_draws_every_logged_step_the_previews_in_order_the_settings_and_files(tmp_path):
    lines = make_run(tmp_path / "run")
    path = report.write(tmp_path / "run")
    text = path.read_text()
    page = parse(text)
    assert len(page.polylines["loss-raw"]) == len(page.polylines["loss-smooth"]) == len(lines)
    assert len(page.polylines["lr"]) == len(lines)
    # a point per step, left to right, and the lr falling (higher y = lower in SVG)
    xs = [float(p.split(",")[0]) for p in page.polylines["lr"]]
    ys = [float(p.split(",")[1]) for p in page.polylines["lr"]]
    assert xs == sorted(xs) and ys == sorted(ys) and len(set(xs)) == len(xs)
    assert [int(i["data-step"]) for i in page.images] == list(PREVIEW_STEPS)
    assert page.captions == [f"step {s}" for s in PREVIEW_STEPS]
    for img, step in zip(page.images, PREVIEW_STEPS):
        assert img["src"].startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1]))) as im:
            assert im.convert("RGB").getpixel((5, 5)) == COLOURS[step]
    assert "/models/v1-5.safetensors" in page.cells and "leaf.safetensors" in page.cells and "<leaf>" in page.cells
    assert "script" not in page.tags and "http" not in text.replace("http://www.w3.org/2000/svg", "")  # self-contained


def test_non_finite_losses_are_left_out_of_the_curve_and_said_so(tmp_path):
    lines = make_run(tmp_path / "run", nan_at=4)
    page = parse(report.render(tmp_path / "run"))
    assert len(page.polylines["loss-raw"]) == len(lines) - 1 and len(page.polylines["lr"]) == len(lines)
    assert "1 of them with a non-finite loss" in report.render(tmp_path / "run")


def test_a_report_that_cannot_be_written_is_a_warning(tmp_path, caplog):
    (tmp_path / "file").write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="minti"):
        report.write_quietly(tmp_path / "file")
    assert "could not write" in caplog.text and "training goes on" in caplog.text


BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
BROWSER = next((b for b in map(shutil.which, BROWSERS) if b), None)
# Added to a copy of the page, never to the report itself: after load, what the browser made of it.
PROBE = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images].map(i => (i.complete ? i.naturalWidth : -1));
  const points = Object.fromEntries(['loss-raw', 'loss-smooth', 'lr'].map(id => [id, document.getElementById(id).points.numberOfItems]));
  const box = document.getElementById('loss-raw').getBBox();
  document.body.setAttribute('data-probe', JSON.stringify({imgs, points, width: box.width, height: box.height}));
});</script>"""


@pytest.mark.skipif(BROWSER is None, reason="no headless Chromium installed (apt-get install chromium)")
def test_chromium_renders_the_report_with_every_point_and_every_image(tmp_path):
    lines = make_run(tmp_path / "run")
    text = report.write(tmp_path / "run").read_text()
    probed = tmp_path / "probed.html"
    probed.write_text(text.replace("</body>", PROBE + "</body>"))
    out = subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                          "--user-data-dir=" + str(tmp_path / "profile"), "--dump-dom", probed.as_uri()],
                         capture_output=True, text=True, timeout=120)
    page = parse(out.stdout)
    assert page.probe is not None, out.stderr[-2000:]
    assert page.probe["points"] == {"loss-raw": len(lines), "loss-smooth": len(lines), "lr": len(lines)}
    assert page.probe["imgs"] == [64] * len(PREVIEW_STEPS)  # every preview decoded, at its size
    assert page.probe["width"] > 100 and page.probe["height"] > 0  # the curve spans the chart
