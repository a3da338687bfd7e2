"""Training data: read a folder of images, crop/flip them into variants, cache their latents,
and draw batches (latent, prompt, loss weight) that depend only on (seed, sample index).

Why the last point: a resumed run must draw exactly the batches the uninterrupted run would
have drawn, so nothing here keeps hidden RNG state between steps.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from minti.training import templates as tpl

log = logging.getLogger("minti")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# Files that live next to training images on purpose; never worth a warning.
SIDECAR_EXTENSIONS = (".txt", ".caption", ".json", ".md", ".npz", ".toml", ".yaml", ".yml")


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from any parts: independent streams for (seed, epoch), (seed, sample), ..."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(*parts: int | str) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


# ------------------------------------------------------------------------------- reading


@dataclass
class SourceImage:
    path: Path
    rgb: torch.Tensor  # [3,H,W] float32 in [0,1], composited on white if it had alpha
    alpha: torch.Tensor | None  # [1,H,W] float32 in [0,1] when the file had transparency
    caption: str = ""


def find_images(folder: str | Path) -> list[Path]:
    """The image files directly inside `folder`, sorted; ValueError naming the folder if none."""
    folder = Path(folder)
    if not folder.exists():
        raise ValueError(f"image folder {folder} does not exist: pass --images with a folder of "
                         f"{'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} files")
    if not folder.is_dir():
        raise ValueError(f"--images {folder} is a file, not a folder: put the training images in a folder "
                         "and pass that folder")
    found, other = [], []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.is_dir():
            continue
        ext = p.suffix.lower()
        if ext in IMAGE_EXTENSIONS:
            found.append(p)
        elif ext not in SIDECAR_EXTENSIONS:
            other.append(p)
    for p in other:
        log.warning("skipping %s: not a supported image type (use %s)", p,
                    ", ".join(e[1:] for e in IMAGE_EXTENSIONS))
    if not found:
        raise ValueError(f"image folder {folder} has no images: put 3-20 "
                         f"{'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} files of your concept in it")
    return found


def read_image(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decode any supported file to ([3,H,W] RGB in [0,1], [1,H,W] alpha or None), not composited.

    EXIF orientation applied; grayscale, palette, CMYK and 16-bit images converted. Raises
    OSError/ValueError (from PIL) for unreadable files.
    """
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        img.load()
        try:
            img = ImageOps.exif_transpose(img)  # phone photos store rotation as a tag
        except Exception:  # a broken EXIF block must not cost the user an image
            log.warning("%s: cannot read its EXIF orientation, using the pixels as stored", path)
        return _to_float(img)


def _to_float(img) -> tuple[torch.Tensor, torch.Tensor | None]:
    mode = img.mode
    if mode == "P" or mode == "PA":
        img = img.convert("RGBA" if (mode == "PA" or "transparency" in img.info) else "RGB")
    elif mode in ("LA", "La", "RGBa"):
        img = img.convert("RGBA")
    elif mode.startswith("I") or mode == "F":
        # 16-bit (and 32-bit/float) grayscale: scale by the range the values use, not by 255,
        # which would saturate every pixel above 255.
        arr = np.asarray(img, dtype=np.float64)
        peak = float(arr.max()) if arr.size else 0.0
        if mode.startswith("I;16") or peak > 255:
            arr = arr / 65535.0
        elif mode != "F" or peak > 1.0:
            arr = arr / 255.0
        gray = torch.from_numpy(np.clip(arr, 0.0, 1.0).astype(np.float32))
        return gray.unsqueeze(0).expand(3, -1, -1).contiguous(), None
    if img.mode not in ("RGB", "RGBA", "L"):
        img = img.convert("RGB")  # CMYK, YCbCr, LAB, HSV, 1-bit, RGBX ...
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).float() / 255.0
    if arr.ndim == 2:
        return arr.unsqueeze(0).expand(3, -1, -1).contiguous(), None
    arr = arr.permute(2, 0, 1).contiguous()
    if arr.shape[0] == 4:
        return arr[:3], arr[3:]
    return arr, None


def read_caption(image_path: Path) -> str:
    """The sidecar caption `<stem>.txt` next to the image (for [filewords]); '' when absent."""
    txt = image_path.with_suffix(".txt")
    if not txt.is_file():
        return ""
    try:
        return " ".join(txt.read_text(encoding="utf-8", errors="replace").split())
    except OSError as e:
        log.warning("cannot read caption %s (%s): using no caption", txt, e)
        return ""


def load_images(folder: str | Path) -> list[SourceImage]:
    """Every readable image in `folder` with its caption; unreadable files are skipped with a
    warning naming them, and it is an error only when none is left."""
    images = []
    for path in find_images(folder):
        try:
            rgb, alpha = read_image(path)
        except Exception as e:  # PIL raises many types for broken files
            log.warning("skipping %s: not a readable image (%s)", path, e)
            continue
        if rgb.shape[1] < 1 or rgb.shape[2] < 1:
            log.warning("skipping %s: the image is empty", path)
            continue
        if alpha is not None:
            # composite before any resampling: filtering the composite has no dark fringes at edges
            rgb = rgb * alpha + (1.0 - alpha)
        images.append(SourceImage(path, rgb, alpha, read_caption(path)))
    if not images:
        raise ValueError(f"no readable image in {folder}: every file failed to decode (see the warnings "
                         "above); re-export them as png or jpg")
    return images


# ------------------------------------------------------------------------------- variants


@dataclass
class Variant:
    """One crop/flip of one image, encoded once into the latent cache, with what SDXL's size and
    crop conditioning says about it (SDXL was trained on these, so training uses the real ones)."""
    image: int  # index into the image list
    top: int  # crop offset in the resized image
    left: int
    flip: bool
    original_size: tuple[int, int] = (0, 0)  # (H, W) of the image before resizing
    # (top, left) of the crop in the resized image; for a mirrored variant `left` is measured in
    # the mirrored image (its distance from the crop's right edge to the image's), as kohya does
    crop_top_left: tuple[int, int] = (0, 0)


def resize_short_side(x: torch.Tensor, size: int) -> torch.Tensor:
    """[C,H,W] -> short side == size, aspect kept; antialiased bicubic in float (no 8-bit round trip)."""
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) == (h, w):
        return x
    y = F.interpolate(x.unsqueeze(0), size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    return y.squeeze(0).clamp(0.0, 1.0)


def crop_offsets(h: int, w: int, size: int, crop: str, n_random: int, gen: torch.Generator) -> list[tuple[int, int]]:
    """Crop positions for a resized image: the centre, or n_random seeded random ones."""
    if crop == "center" or (h == size and w == size):
        return [((h - size) // 2, (w - size) // 2)]
    out = []
    for _ in range(n_random):
        top = int(torch.randint(0, h - size + 1, (1,), generator=gen))
        left = int(torch.randint(0, w - size + 1, (1,), generator=gen))
        out.append((top, left))
    return out


@dataclass
class TrainingData:
    """Images -> cached latents -> deterministic batches.

    Construct, then call encode(sd) once; after that the VAE is not needed.
    """
    images: list[SourceImage]
    resolution: int
    templates: list[str]
    token: str
    seed: int = 0
    crop: str = "center"  # "center" | "random"
    random_crops: int = 4  # crop variants per image for crop="random"
    flip: bool = False
    alpha_mask: bool = False
    repeats: int = 1
    variants: list[Variant] = field(default_factory=list)
    latents: torch.Tensor | None = None  # [V,C,h,w] float32 on CPU
    weights: torch.Tensor | None = None  # [V,1,h,w] loss weights (alpha mask) or None
    sizes: list[tuple[int, int]] = field(default_factory=list)  # original (H, W) per image

    def __post_init__(self) -> None:
        if self.crop not in ("center", "random"):
            raise ValueError(f"unknown crop {self.crop!r}: use center or random")
        if self.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {self.repeats}")
        if self.random_crops < 1:
            raise ValueError(f"random crops per image must be >= 1, got {self.random_crops}")
        self.sizes = [tuple(im.rgb.shape[-2:]) for im in self.images]
        for im, (h, w) in zip(self.images, self.sizes):
            if min(h, w) < self.resolution:
                log.warning("%s is %dx%d, smaller than the training resolution %d: upscaled (it will look soft; "
                            "use images with a short side of at least %d px)", im.path, w, h, self.resolution,
                            self.resolution)
        if self.alpha_mask and not any(im.alpha is not None for im in self.images):
            log.warning("--alpha-mask is set but no image has transparency: every pixel counts fully")
        self.has_captions = any(im.caption for im in self.images)
        if any("[filewords]" in t for t in self.templates) and not self.has_captions:
            log.warning("the templates use [filewords] but no image has a .txt caption next to it: "
                        "[filewords] will be empty")

    def _pixels(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        im = self.images[index]
        rgb = resize_short_side(im.rgb, self.resolution)
        alpha = resize_short_side(im.alpha, self.resolution) if im.alpha is not None else None
        return rgb, alpha

    @torch.no_grad()
    def encode(self, sd, latent_sampling: str = "mean", batch_size: int = 4) -> None:
        """Encode every crop/flip variant once with the VAE encoder (the only time it runs)."""
        if latent_sampling not in ("mean", "sample"):
            raise ValueError(f"unknown latent sampling {latent_sampling!r}: use mean or sample")
        crops_gen = generator(self.seed, "crops")
        sample_gen = generator(self.seed, "latent-sample")
        latents, weights, variants = [], [], []
        for index in range(len(self.images)):
            rgb, alpha = self._pixels(index)
            h, w = rgb.shape[-2:]
            pending = []
            for top, left in crop_offsets(h, w, self.resolution, self.crop, self.random_crops, crops_gen):
                for flip in ((False, True) if self.flip else (False,)):
                    r = self.resolution
                    px = rgb[:, top:top + r, left:left + r]
                    a = alpha[:, top:top + r, left:left + r] if alpha is not None else None
                    if flip:
                        px = px.flip(-1)
                        a = a.flip(-1) if a is not None else None
                    crop_left = w - r - left if flip else left
                    pending.append((Variant(index, top, left, flip, self.sizes[index], (top, crop_left)), px, a))
            for start in range(0, len(pending), batch_size):
                chunk = pending[start:start + batch_size]
                pixels = torch.stack([px for _, px, _ in chunk]) * 2.0 - 1.0
                pixels = pixels.to(device=sd.device, dtype=sd.dtype)
                if latent_sampling == "sample":
                    z = sd.encode_image(pixels, sample=True, generator=sample_gen)
                else:
                    z = sd.encode_image(pixels)
                z = z.float().cpu()
                for (variant, _, a), zi in zip(chunk, z):
                    variants.append(variant)
                    latents.append(zi)
                    if a is None:
                        a = torch.ones(1, self.resolution, self.resolution)
                    # The loss lives in latent space: average the mask over each latent pixel's area.
                    weights.append(F.adaptive_avg_pool2d(a.unsqueeze(0), zi.shape[-2:]).squeeze(0))
        self.variants = variants
        self.latents = torch.stack(latents)
        if not torch.isfinite(self.latents).all():
            raise ValueError("the VAE produced non-finite latents (an fp16 VAE overflow is the usual cause): "
                             "train with --dtype float32 or bfloat16")
        self.weights = torch.stack(weights) if self.alpha_mask else None
        if self.weights is not None:
            for v, wgt in zip(self.variants, self.weights):
                if float(wgt.sum()) == 0.0:
                    raise ValueError(f"{self.images[v.image].path} is fully transparent: with --alpha-mask it "
                                     "would teach nothing; remove it or drop --alpha-mask")

    # ------------------------------------------------------------------- batches

    def _epoch_order(self, epoch: int) -> list[int]:
        pool = [i for i in range(len(self.images)) for _ in range(self.repeats)]
        perm = torch.randperm(len(pool), generator=generator(self.seed, "epoch", epoch)).tolist()
        return [pool[p] for p in perm]

    def sample(self, index: int) -> tuple[int, str]:
        """Sample number `index` (global, from 0) -> (variant index, prompt)."""
        epoch_len = len(self.images) * self.repeats
        image = self._epoch_order(index // epoch_len)[index % epoch_len]
        gen = generator(self.seed, "sample", index)
        choices = [i for i, v in enumerate(self.variants) if v.image == image]
        variant = choices[int(torch.randint(len(choices), (1,), generator=gen))]
        template = self.templates[int(torch.randint(len(self.templates), (1,), generator=gen))]
        return variant, tpl.fill(template, self.token, self.images[image].caption)

    def batch(self, first_index: int, batch_size: int):
        """Samples first_index .. first_index+batch_size-1 -> (latents, prompts, weights|None, variants)."""
        if self.latents is None:
            raise RuntimeError("TrainingData.encode(sd) must run before batches are drawn")
        picks = [self.sample(first_index + b) for b in range(batch_size)]
        idx = torch.tensor([v for v, _ in picks])
        weights = self.weights[idx] if self.weights is not None else None
        return self.latents[idx], [p for _, p in picks], weights, [self.variants[v] for v, _ in picks]
