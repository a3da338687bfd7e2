"""Procedural, captioned images of shapes: the training set of the tiny model and its concept.

Every image is one shape (circle, square, triangle, star, heart, cross, ring, diamond, moon)
with a colour, an optional pattern (striped, dotted, checked), a size and a position, on a
background that is plain, striped, dotted, checked or a gradient. Everything is drawn from
a seed, so the data set and the demo concept can be rebuilt bit for bit.

    s = render(sample_attributes(np.random.default_rng(0)))
    s.image     PIL RGB image, resolution x resolution
    s.mask      bool [H, W]: the pixels of the shape (foreground)
    s.caption   "a small red striped star on the left on a dotted blue background"
    s.attributes  the structured Attributes the caption was made from

Caption words are single tokens of CLIP's vocabulary (tests check it), so the tiny text
encoder learns one embedding per attribute value. Images are drawn at SUPERSAMPLE x the
resolution and box-filtered down: edges are antialiased like real images, and the mask is
the shape's coverage >= 1/2.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "heart", "cross", "ring", "diamond", "moon")
# sRGB values chosen to be far apart; names are the caption words
COLOURS = {
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (245, 220, 40), "green": (40, 165, 60),
    "blue": (40, 80, 220), "purple": (140, 60, 190), "pink": (245, 130, 190), "brown": (125, 75, 35),
    "white": (245, 245, 245), "black": (25, 25, 25), "gray": (128, 128, 128),
}
SHAPE_COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown")
BACKGROUND_COLOURS = tuple(COLOURS)
PATTERNS = ("plain", "striped", "dotted", "checked")  # on the shape
BACKGROUNDS = ("plain", "striped", "dotted", "checked", "gradient")
SIZES = {"small": 0.26, "large": 0.5}  # diameter of the shape's bounding circle / image side
# shape centre as a fraction of the image side; a large shape with the most jitter still
# keeps 2 px from the edge at 64 px, so the image border is background (the concept score
# relies on it)
POSITIONS = {"center": (0.5, 0.5), "left": (0.3, 0.5), "right": (0.7, 0.5),
             "top": (0.5, 0.3), "bottom": (0.5, 0.7)}
POSITION_PHRASES = {"center": "in the center", "left": "on the left", "right": "on the right",
                    "top": "at the top", "bottom": "at the bottom"}
# filler the trainer's prompt templates may put around the object ("a photo of a ...")
PREFIXES = ("a photo of", "a picture of", "an image of", "a drawing of", "a rendering of")
SUPERSAMPLE = 4
MIN_CONTRAST = 90.0  # min RGB distance between any shape tone and any background tone

# The demo concept (weights/demo-concept/): a combination the model can draw but has no one
# word for. Its (shape, colour, pattern) triple never appears in the training set.
CONCEPT = dict(shape="heart", colour="orange", pattern="striped", size="large", position="center",
               background="dotted", bg_colour="blue")
CONCEPT_CAPTION_INIT = "shape"  # init word for textual inversion: captions use it as "any shape"


@dataclass(frozen=True)
class Attributes:
    shape: str
    colour: str
    pattern: str
    size: str
    position: str
    background: str
    bg_colour: str
    # continuous jitter, so that no two images are the same
    dx: float = 0.0  # centre offset, fraction of the side
    dy: float = 0.0
    scale: float = 1.0  # multiplies the size
    angle: float = 0.0  # degrees
    phase: float = 0.0  # pattern phase in [0, 1)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Sample:
    image: Image.Image
    mask: np.ndarray
    caption: str
    attributes: Attributes


def _tones(attrs: Attributes) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(shape colour, its pattern tone, background colour, its pattern tone) as float RGB."""
    fg = np.array(COLOURS[attrs.colour], np.float32)
    fg2 = fg + 0.6 * (255.0 - fg)  # light tint: stripes/dots/checks on the shape
    bg = np.array(COLOURS[attrs.bg_colour], np.float32)
    # background pattern: darker shade on light colours, lighter tint on dark ones
    bg2 = bg * 0.6 if bg.mean() > 100 else bg + 0.35 * (255.0 - bg)
    return fg, fg2, bg, bg2


def contrast_ok(colour: str, bg_colour: str) -> bool:
    """True when every tone of the shape is far from every tone of the background."""
    a = Attributes("circle", colour, "striped", "small", "center", "gradient", bg_colour)
    fg, fg2, bg, bg2 = _tones(a)
    return min(float(np.linalg.norm(f - b)) for f in (fg, fg2) for b in (bg, bg2)) >= MIN_CONTRAST


def is_concept_combination(attrs: Attributes) -> bool:
    """The (shape, colour, pattern) triple of the demo concept, held out of the training set."""
    return (attrs.shape, attrs.colour, attrs.pattern) == (CONCEPT["shape"], CONCEPT["colour"], CONCEPT["pattern"])


def sample_attributes(rng: np.random.Generator, exclude_concept: bool = True) -> Attributes:
    """Uniform over the discrete attributes (background colour among those with contrast),
    plus small jitter. With exclude_concept, never returns the concept's triple."""
    while True:
        colour = SHAPE_COLOURS[rng.integers(len(SHAPE_COLOURS))]
        bgs = [c for c in BACKGROUND_COLOURS if contrast_ok(colour, c)]
        attrs = Attributes(
            shape=SHAPES[rng.integers(len(SHAPES))], colour=colour,
            pattern=PATTERNS[rng.integers(len(PATTERNS))], size=tuple(SIZES)[rng.integers(len(SIZES))],
            position=tuple(POSITIONS)[rng.integers(len(POSITIONS))],
            background=BACKGROUNDS[rng.integers(len(BACKGROUNDS))], bg_colour=bgs[rng.integers(len(bgs))],
            dx=float(rng.uniform(-0.02, 0.02)), dy=float(rng.uniform(-0.02, 0.02)),
            scale=float(rng.uniform(0.9, 1.0)), angle=float(rng.uniform(-15, 15)), phase=float(rng.uniform()),
        )
        if not (exclude_concept and is_concept_combination(attrs)):
            return attrs


def concept_attributes(rng: np.random.Generator) -> Attributes:
    """One jittered draw of the demo concept."""
    return Attributes(**CONCEPT, dx=float(rng.uniform(-0.02, 0.02)), dy=float(rng.uniform(-0.02, 0.02)),
                      scale=float(rng.uniform(0.95, 1.0)), angle=float(rng.uniform(-8, 8)),
                      phase=float(rng.uniform()))


# ---- caption ----------------------------------------------------------------------------------

def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(attrs: Attributes, rng: np.random.Generator | None = None, drop: float = 0.0,
            generic: float = 0.0, prefix: float = 0.0) -> str:
    """The caption of an image. Without rng: the full, deterministic caption.

    With rng (training): each of size, colour, pattern, position and background is left out
    with probability `drop`, the shape's name becomes the generic word "shape" with
    probability `generic`, and a filler prefix ("a photo of") is added with probability
    `prefix`. Partial captions teach the model to fill in what a prompt leaves open."""
    def keep() -> bool:
        return rng is None or rng.uniform() >= drop

    words = []
    if keep():
        words.append(attrs.size)
    if keep():
        words.append(attrs.colour)
    if attrs.pattern != "plain" and keep():
        words.append(attrs.pattern)
    use_generic = rng is not None and rng.uniform() < generic
    words.append(CONCEPT_CAPTION_INIT if use_generic else attrs.shape)
    text = f"{_article(words[0])} {' '.join(words)}"
    if keep():
        text += " " + POSITION_PHRASES[attrs.position]
    if keep():
        bg = [attrs.background] if attrs.background != "plain" else []
        bg = " ".join(bg + [attrs.bg_colour])
        text += f" on {_article(bg)} {bg} background"
    if rng is not None and rng.uniform() < prefix:
        text = f"{PREFIXES[rng.integers(len(PREFIXES))]} {text}"
    return text


# ---- drawing ----------------------------------------------------------------------------------

def _outline(shape: str, n: int = 64) -> list[np.ndarray]:
    """Polygons of the shape in unit coordinates (fits the circle of radius 1); the first is
    filled, later ones are cut out (ring, moon)."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    circle = np.stack([np.cos(t), np.sin(t)], 1)
    if shape == "circle":
        return [circle]
    if shape == "ring":
        return [circle, 0.55 * circle]
    if shape == "moon":
        return [circle, 0.85 * circle + np.array([0.45, -0.2])]
    if shape == "square":
        return [np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64) * 0.78]
    if shape == "diamond":
        return [np.array([[0, -1], [0.75, 0], [0, 1], [-0.75, 0]], np.float64)]
    if shape == "triangle":
        a = np.deg2rad(np.array([-90, 30, 150]))
        return [np.stack([np.cos(a), np.sin(a)], 1) + np.array([0, 0.15])]
    if shape == "star":
        a = np.deg2rad(-90 + 36 * np.arange(10))
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        return [np.stack([r * np.cos(a), r * np.sin(a)], 1) + np.array([0, 0.08])]
    if shape == "cross":
        w = 0.32
        return [np.array([[-w, -1], [w, -1], [w, -w], [1, -w], [1, w], [w, w], [w, 1], [-w, 1],
                          [-w, w], [-1, w], [-1, -w], [-w, -w]], np.float64)]
    if shape == "heart":
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pts = np.stack([x, y], 1) / 17.0
        return [pts + np.array([0, 0.1])]
    raise ValueError(f"unknown shape {shape!r}")


def _pattern(kind: str, h: int, period: float, phase: float) -> np.ndarray:
    """Float [h, h] in {0, 1} (1 = second tone), at the supersampled resolution."""
    y, x = np.mgrid[0:h, 0:h].astype(np.float32) + 0.5
    p = period
    if kind == "striped":  # diagonal stripes
        return (((x + y) / (p * 1.41421) + phase) % 1.0 < 0.5).astype(np.float32)
    if kind == "checked":
        off = phase * p
        return ((np.floor((x + off) / p) + np.floor((y + off) / p)) % 2).astype(np.float32)
    if kind == "dotted":
        off = phase * p
        u, v = (x + off) % p - p / 2, (y + off) % p - p / 2
        return (u * u + v * v < (0.27 * p) ** 2).astype(np.float32)
    if kind == "gradient":
        return np.broadcast_to(x / h, (h, h)).astype(np.float32)
    return np.zeros((h, h), np.float32)


def render(attrs: Attributes, resolution: int = 64) -> Sample:
    """Draw one image and its mask. Deterministic in the attributes."""
    ss = SUPERSAMPLE
    h = resolution * ss
    cx, cy = POSITIONS[attrs.position]
    cx, cy = (cx + attrs.dx) * h, (cy + attrs.dy) * h
    radius = SIZES[attrs.size] * attrs.scale * h / 2
    a = np.deg2rad(attrs.angle)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    cover = Image.new("L", (h, h), 0)
    draw = ImageDraw.Draw(cover)
    for i, poly in enumerate(_outline(attrs.shape)):
        pts = poly @ rot.T * radius + np.array([cx, cy])
        draw.polygon([tuple(p) for p in pts], fill=255 if i == 0 else 0)
    m = np.asarray(cover, np.float32)[..., None] / 255.0

    fg, fg2, bg, bg2 = _tones(attrs)
    # pattern periods in output pixels: finer on the shape so a small shape shows a few
    f = _pattern(attrs.pattern, h, 6.0 * ss, attrs.phase)[..., None]
    b = _pattern(attrs.background, h, 8.0 * ss, attrs.phase)[..., None]
    img = m * (fg + f * (fg2 - fg)) + (1 - m) * (bg + b * (bg2 - bg))
    # box filter down to the output resolution (antialiasing)
    img = img.reshape(resolution, ss, resolution, ss, 3).mean((1, 3))
    cov = m[..., 0].reshape(resolution, ss, resolution, ss).mean((1, 3))
    image = Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8), "RGB")
    return Sample(image=image, mask=cov >= 0.5, caption=caption(attrs), attributes=attrs)


def generate(seed: int, resolution: int = 64, exclude_concept: bool = True) -> Sample:
    """Image number `seed` of the data set (independent of every other index)."""
    return render(sample_attributes(np.random.default_rng(seed), exclude_concept), resolution)


def dataset(n: int, seed: int = 0, resolution: int = 64) -> tuple[np.ndarray, list[Attributes]]:
    """n training images as uint8 [n, H, W, 3] and their attributes; concept triple excluded.
    Image i depends only on (seed, i), so a prefix of a larger set is the smaller set."""
    images = np.empty((n, resolution, resolution, 3), np.uint8)
    attrs = []
    for i in range(n):
        s = generate(seed * 1_000_003 + i, resolution)
        images[i] = np.asarray(s.image)
        attrs.append(s.attributes)
    return images, attrs


def concept_samples(n: int = 5, seed: int = 0, resolution: int = 64) -> list[Sample]:
    """The demo concept's images (weights/demo-concept/), reproducible from the seed."""
    rng = np.random.default_rng([seed, 7])
    return [render(concept_attributes(rng), resolution) for _ in range(n)]


def perturb(attrs: Attributes, **changes) -> Attributes:
    """A copy with some attributes changed (tests and the concept score's checks)."""
    return replace(attrs, **changes)
