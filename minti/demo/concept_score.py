"""The concept score: how close a set of generated images is to a set of concept images.

Computed from the pixels only, with what we know about how minti.demo.toy_images draws: one shape on
a background whose colours reach the image border. Never from a training loss, so it can
judge textual inversion from the outside. Lower is closer; identical sets score 0.

Per image we estimate
    background   colours of the 2-pixel border, clustered (k-means, k=4); a pixel is
                 background when it lies within BG_TOL of a cluster centre or of a segment
                 between two centres (that covers two-tone patterns, their antialiased
                 edges and gradients)
    mask         the rest, cleaned: largest 4-connected component
and from it six features, each compared between the two sets by a component metric:
    fg_colour    colour distribution of the mask pixels: sliced Wasserstein-1 over 13
                 fixed RGB directions, in units of 255
    bg_colour    the same for the background pixels
    position     the mask's centroid (fractions of the side), Euclidean
    size         sqrt(mask area / image area), absolute difference
    shape        the mask re-centred on its centroid and rescaled by its RMS radius to a
                 32x32 grid (position and size removed): 1 - soft IoU
    pattern      texture inside the (eroded) mask: density of luminance edges and their
                 orientation histogram (4 bins), L1

A component compares the two sets as distributions, by the energy distance
    D = E d(a, b) - E d(a, a')/2 - E d(b, b')/2     (a, a' from one set, b from the other,
                                                     all pairs incl. a = a')
which is 0 for identical sets, >= 0 for these metrics, and (unlike comparing set means)
tells "every image at the centre" from "images everywhere, centred on average".
score = sum(WEIGHTS[c] * D_c). The weights put each component on the same footing: each is
1 / (that component between 64 random training images and the demo concept's images), so
those 64 score 6 (calibrate() recomputes them). Small sets score a little higher (the
within-set terms include each image with itself): 6 random images score ~8.5, 6 new draws of
the concept ~0.25, the concept with one attribute changed 1.1 (background style) to 5.6.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from minti.demo import toy_images
from minti.training.data import IMAGE_EXTENSIONS

RES = 64  # images are compared at this resolution (the tiny model's)
BORDER = 2
BG_TOL = 30.0  # RGB distance (0..255 scale) from the background's colour set
N_QUANTILES = 32
SHAPE_GRID = 32
EDGE = 20.0  # luminance gradient (0..255 per pixel) that counts as a pattern edge

# 1 / (component between toy_images.dataset(64, seed=1) and toy_images.concept_samples(5)), from
# calibrate(); rounded. Recompute if the generator's look changes.
WEIGHTS = {"fg_colour": 8.7, "bg_colour": 6.4, "position": 25.0, "size": 19.0, "shape": 6.9, "pattern": 1.3}


def _directions() -> np.ndarray:
    d = [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, -1, 0), (1, 0, 1), (1, 0, -1), (0, 1, 1),
         (0, 1, -1), (1, 1, 1), (1, 1, -1), (1, -1, 1), (-1, 1, 1)]
    d = np.array(d, np.float64)
    return d / np.linalg.norm(d, axis=1, keepdims=True)


DIRECTIONS = _directions()


@dataclass
class Features:
    mask: np.ndarray  # bool [RES, RES]
    fg_colour: np.ndarray  # [13, N_QUANTILES] quantiles of the projected fg colours
    bg_colour: np.ndarray
    position: np.ndarray  # [2] centroid (x, y), fractions
    size: np.ndarray  # [1]
    shape: np.ndarray  # [SHAPE_GRID, SHAPE_GRID] float
    pattern: np.ndarray  # [5]


@dataclass
class ConceptScore:
    total: float
    components: dict[str, float]

    def __str__(self) -> str:
        parts = " ".join(f"{k}={v:.3f}" for k, v in self.components.items())
        return f"concept score {self.total:.3f} ({parts})"


# ---- input -----------------------------------------------------------------------------------

def to_arrays(images) -> list[np.ndarray]:
    """PIL images, uint8 [H,W,3] arrays, a float tensor/array [B,3,H,W] in [-1, 1], or a folder
    of image files -> float [RES, RES, 3] arrays on the 0..255 scale."""
    if isinstance(images, (str, Path)):
        files = sorted(p for p in Path(images).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(f"no images in {images}")
        images = [Image.open(p) for p in files]
    if hasattr(images, "detach"):  # torch tensor
        images = images.detach().float().cpu().numpy()
    if isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[1] == 3:
        images = [np.clip((x.transpose(1, 2, 0) + 1) * 127.5, 0, 255) for x in images]
    out = []
    for im in images:
        if isinstance(im, Image.Image):
            im = im.convert("RGB")
        else:
            im = Image.fromarray(np.clip(np.asarray(im, np.float64) + 0.5, 0, 255).astype(np.uint8), "RGB")
        if im.size != (RES, RES):
            im = im.resize((RES, RES), Image.BILINEAR)
        out.append(np.asarray(im, np.float64))
    return out


# ---- segmentation ---------------------------------------------------------------------------

def _kmeans(x: np.ndarray, k: int = 4, iters: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic k-means (farthest-point init) -> (centres [k', 3], share of each)."""
    centres = [np.median(x, axis=0)]
    for _ in range(k - 1):
        d = np.min(np.linalg.norm(x[:, None] - np.array(centres)[None], axis=2), axis=1)
        if d.max() < 1e-6:
            break
        centres.append(x[d.argmax()])
    c = np.array(centres)
    for _ in range(iters):
        assign = np.linalg.norm(x[:, None] - c[None], axis=2).argmin(1)
        c = np.array([x[assign == j].mean(0) if np.any(assign == j) else c[j] for j in range(len(c))])
    assign = np.linalg.norm(x[:, None] - c[None], axis=2).argmin(1)
    share = np.bincount(assign, minlength=len(c)) / len(x)
    return c, share


def _distance_to_palette(img: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Per pixel: distance to the nearest centre or segment between two centres."""
    p = img.reshape(-1, 3)
    best = np.min(np.linalg.norm(p[:, None] - centres[None], axis=2), axis=1)
    for i in range(len(centres)):
        for j in range(i + 1, len(centres)):
            a, b = centres[i], centres[j]
            ab = b - a
            t = np.clip((p - a) @ ab / max(ab @ ab, 1e-9), 0, 1)
            best = np.minimum(best, np.linalg.norm(p - (a + t[:, None] * ab), axis=1))
    return best.reshape(img.shape[:2])


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 4-connected component of a bool mask (iterative flood fill, no scipy)."""
    h, w = mask.shape
    labels = np.zeros((h, w), np.int32)
    best, best_size, n = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        n += 1
        labels[y0, x0] = n
        stack, size = [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not labels[yy, xx]:
                    labels[yy, xx] = n
                    stack.append((yy, xx))
        if size > best_size:
            best, best_size = n, size
    return labels == best if best else np.zeros_like(mask)


def segment(img: np.ndarray) -> np.ndarray:
    """Foreground mask of one image (float [H, W, 3], 0..255), estimated against its border."""
    border = np.concatenate([img[:BORDER].reshape(-1, 3), img[-BORDER:].reshape(-1, 3),
                             img[:, :BORDER].reshape(-1, 3), img[:, -BORDER:].reshape(-1, 3)])
    centres, share = _kmeans(border)
    # tiny clusters are noise (or a shape touching the border), not the background; the
    # generator keeps shapes 2 px off the edge, and a pattern tone covers >= ~10% of the border
    centres = centres[share >= 0.03]
    fg = _distance_to_palette(img, centres) > BG_TOL
    return _largest_component(fg)


# ---- features --------------------------------------------------------------------------------

def _quantiles(pixels: np.ndarray) -> np.ndarray:
    proj = pixels @ DIRECTIONS.T  # [N, 13]
    q = (np.arange(N_QUANTILES) + 0.5) / N_QUANTILES
    return np.quantile(proj, q, axis=0).T


def _canonical_shape(mask: np.ndarray, centroid: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return np.zeros((SHAPE_GRID, SHAPE_GRID))
    c = centroid * RES
    rms = np.sqrt(np.mean((xs + 0.5 - c[0]) ** 2 + (ys + 0.5 - c[1]) ** 2)) + 1e-6
    # the grid spans +-2.2 RMS radii around the centroid: every shape here fits
    u = (np.arange(SHAPE_GRID) + 0.5) / SHAPE_GRID * 2 - 1
    gx = np.clip(np.floor(c[0] + u[None, :] * 2.2 * rms), 0, RES - 1).astype(int)
    gy = np.clip(np.floor(c[1] + u[:, None] * 2.2 * rms), 0, RES - 1).astype(int)
    inside = (c[0] + u[None, :] * 2.2 * rms >= 0) & (c[0] + u[None, :] * 2.2 * rms < RES) & \
             (c[1] + u[:, None] * 2.2 * rms >= 0) & (c[1] + u[:, None] * 2.2 * rms < RES)
    return (mask[gy, gx] & inside).astype(np.float64)


def _pattern(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    lum = img @ np.array([0.299, 0.587, 0.114])
    gx = np.zeros_like(lum)
    gy = np.zeros_like(lum)
    gx[:, 1:-1] = (lum[:, 2:] - lum[:, :-2]) / 2
    gy[1:-1] = (lum[2:] - lum[:-2]) / 2
    inner = mask.copy()  # erode by one pixel: the shape's outline is not its pattern
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    mag = np.hypot(gx, gy)[inner]
    if mag.size == 0:
        return np.array([0.0, 0.25, 0.25, 0.25, 0.25])
    density = float(np.mean(mag > EDGE))
    ang = np.arctan2(gy[inner], gx[inner]) % np.pi
    bins = np.floor(ang / (np.pi / 4) + 0.5).astype(int) % 4  # 0, 45, 90, 135 degrees
    w = mag * (mag > EDGE)
    hist = np.bincount(bins, weights=w, minlength=4)
    # few edges -> no orientation evidence -> lean to uniform
    hist = (hist + 0.25 * EDGE * 4) / (hist.sum() + EDGE * 4)
    return np.concatenate([[density], hist])


def features(img: np.ndarray) -> Features:
    mask = segment(img)
    pix = img.reshape(-1, 3)
    fg = pix[mask.reshape(-1)]
    bg = pix[~mask.reshape(-1)]
    if len(bg) == 0:
        bg = pix
    if len(fg) == 0:  # nothing found: the "shape" is the background, at the centre, size 0
        fg = bg
        centroid = np.array([0.5, 0.5])
    else:
        ys, xs = np.nonzero(mask)
        centroid = np.array([xs.mean() + 0.5, ys.mean() + 0.5]) / RES
    return Features(mask=mask, fg_colour=_quantiles(fg), bg_colour=_quantiles(bg), position=centroid,
                    size=np.array([np.sqrt(mask.mean())]), shape=_canonical_shape(mask, centroid),
                    pattern=_pattern(img, mask))


# ---- comparison -------------------------------------------------------------------------------

def _metric(name: str, a: Features, b: Features) -> float:
    x, y = getattr(a, name), getattr(b, name)
    if name in ("fg_colour", "bg_colour"):
        return float(np.mean(np.abs(x - y))) / 255.0
    if name in ("position", "size"):
        return float(np.linalg.norm(x - y))
    if name == "shape":
        union = np.maximum(x, y).sum()
        return 0.0 if union == 0 else 1.0 - float(np.minimum(x, y).sum() / union)
    if name == "pattern":
        return float(np.abs(x - y).sum())
    raise KeyError(name)


def _energy(name: str, A: list[Features], B: list[Features]) -> float:
    def mean(P, Q):
        return float(np.mean([_metric(name, p, q) for p in P for q in Q]))
    return max(0.0, mean(A, B) - 0.5 * mean(A, A) - 0.5 * mean(B, B))


def score_features(gen: list[Features], concept: list[Features],
                   weights: dict[str, float] | None = None) -> ConceptScore:
    weights = WEIGHTS if weights is None else weights
    comps = {name: _energy(name, gen, concept) for name in weights}
    return ConceptScore(total=sum(weights[k] * v for k, v in comps.items()), components=comps)


def concept_score(generated, concept, weights: dict[str, float] | None = None) -> ConceptScore:
    """Score a set of generated images against the concept images (lower = closer).

    Both arguments take anything to_arrays() reads: PIL images, uint8 HWC arrays, a [B,3,H,W]
    tensor in [-1, 1] (the sampler's output) or a folder such as weights/demo-concept/."""
    gen = [features(x) for x in to_arrays(generated)]
    ref = [features(x) for x in to_arrays(concept)]
    return score_features(gen, ref, weights)


def calibrate(n: int = 64, seed: int = 1) -> dict[str, float]:
    """The weights that make each component 1 between n random training images and the demo
    concept's images (how WEIGHTS was made)."""
    images, _ = toy_images.dataset(n, seed=seed, resolution=RES)
    ones = {k: 1.0 for k in WEIGHTS}
    s = concept_score(list(images), [c.image for c in toy_images.concept_samples(5)], ones)
    return {k: 1.0 / max(v, 1e-9) for k, v in s.components.items()}
