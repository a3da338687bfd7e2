"""Training data: read a folder of images, crop/flip them into variants (square, or each in its
aspect-ratio bucket), cache their latents, and draw batches (latent, prompt, loss weight) that
depend only on (seed, sample index).

Why the last point: a resumed run must draw exactly the batches the uninterrupted run would
have drawn, so nothing here keeps hidden RNG state between steps.
"""
from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from minti.loading.families import Family
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


def augment_caption(caption: str, shuffle: bool, dropout: float, keep: int, gen: torch.Generator) -> str:
    """One sample's caption with kohya's tag options: the first `keep` tags stay in place, the rest
    are shuffled (`shuffle`) and each dropped with probability `dropout`. Draws come from `gen`
    only (the caller derives it from (seed, sample)), so a resumed run draws the same captions."""
    if not shuffle and dropout <= 0:
        return caption
    tags = tpl.split_tags(caption)
    fixed, free = tags[:keep], tags[keep:]
    if shuffle and len(free) > 1:
        free = [free[i] for i in torch.randperm(len(free), generator=gen).tolist()]
    if dropout > 0 and free:
        drawn = torch.rand(len(free), generator=gen).tolist()
        free = [t for t, u in zip(free, drawn) if u >= dropout]
    return ", ".join(fixed + free)


# ------------------------------------------------------------------------------- reading


@dataclass
class SourceImage:
    path: Path
    rgb: torch.Tensor  # [3,H,W] float32 in [0,1], composited on white if it had alpha
    alpha: torch.Tensor | None  # [1,H,W] float32 in [0,1] when the file had transparency
    caption: str = ""  # what [filewords] becomes: the .txt sidecar's text, else the file name's words
    caption_from: str = ""  # "txt" (a sidecar), "name" (the file name, as A1111 does) or "" (neither)


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
        if path.with_suffix(".txt").is_file():  # as in A1111, a sidecar is the caption even when empty
            images.append(SourceImage(path, rgb, alpha, read_caption(path), "txt"))
        else:
            words = tpl.filename_words(path)
            images.append(SourceImage(path, rgb, alpha, words, "name" if words else ""))
    if not images:
        raise ValueError(f"no readable image in {folder}: every file failed to decode (see the warnings "
                         "above); re-export them as png or jpg")
    return images


# ------------------------------------------------------------------------------- variants

# Bucket sides are multiples of 64 px: every supported UNet needs latent sides divisible by 8
# (three halvings of the 8x-downsampled latent).
BUCKET_MULTIPLE = 64


def make_buckets(resolution: int, multiple: int = BUCKET_MULTIPLE) -> list[tuple[int, int]]:
    """Aspect-ratio buckets for `resolution`: (height, width) pairs with sides multiples of
    `multiple` between resolution/2 and 2*resolution (aspect ratios up to 4:1), each the tallest
    such bucket for its width with at most resolution^2 pixels, and their transposes; sorted
    from the tallest to the widest.

    Never more pixels than resolution^2, so the memory plan made for resolution x resolution holds
    for every bucket: with sides divisible by 64 (every UNet level halves them exactly), the size of
    each tensor of the training step depends on the pixel count alone, not on the aspect ratio,
    and grows with it.
    """
    area = resolution * resolution
    lo = max(multiple, resolution // 2 // multiple * multiple)
    hi = 2 * resolution
    found = set()
    for width in range(lo, hi + 1, multiple):
        height = min(hi, area // width // multiple * multiple)
        if height >= lo:
            found.update({(height, width), (width, height)})
    return sorted(found, key=lambda hw: (hw[1] / hw[0], hw[1]))


def buckets_on(setting: bool | None, family: Family) -> bool:
    """--buckets, where None means the family's default: on for SDXL (its size conditioning was
    trained on bucketed images), off for SD 1.x/2.x (trained on square crops)."""
    return family.buckets_by_default if setting is None else bool(setting)


def nearest_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the image's (compared as log ratios, so 2:1 and 1:2
    are equally far from 1:1); the first of equals."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda hw: abs(math.log(hw[1] / hw[0]) - aspect))


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
    target_size: tuple[int, int] = (0, 0)  # (H, W) of the crop: the square, or the image's bucket


def resize_to_cover(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[C,H,W] -> scaled (aspect kept) to the smallest size covering height x width; antialiased
    bicubic in float (no 8-bit round trip)."""
    h, w = x.shape[-2:]
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    if (nh, nw) == (h, w):
        return x
    y = F.interpolate(x.unsqueeze(0), size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    return y.squeeze(0).clamp(0.0, 1.0)


def resize_short_side(x: torch.Tensor, size: int) -> torch.Tensor:
    """[C,H,W] -> short side == size, aspect kept."""
    return resize_to_cover(x, size, size)


def crop_offsets(h: int, w: int, height: int, width: int, crop: str, n_random: int,
                 gen: torch.Generator) -> list[tuple[int, int]]:
    """Crop positions of a height x width window in a resized h x w image: the centre, or
    n_random seeded random ones."""
    if crop == "center" or (h == height and w == width):
        return [((h - height) // 2, (w - width) // 2)]
    out = []
    for _ in range(n_random):
        top = int(torch.randint(0, h - height + 1, (1,), generator=gen))
        left = int(torch.randint(0, w - width + 1, (1,), generator=gen))
        out.append((top, left))
    return out


@dataclass
class TrainingData:
    """Images -> cached latents -> deterministic batches.

    Construct, then call encode(sd) once; after that the VAE is not needed. With buckets, each
    image is cropped to its aspect-ratio bucket (make_buckets) instead of the square, and every
    batch holds images of one bucket.
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
    buckets: bool = False
    shuffle_tags: bool = False  # caption tag options (augment_caption)
    tag_dropout: float = 0.0
    keep_tokens: int = 0
    variants: list[Variant] = field(default_factory=list)
    latents: list[torch.Tensor] | None = None  # per variant [C,h,w] float32 on CPU (h, w: its target size / 8)
    weights: list[torch.Tensor] | None = None  # per variant [1,h,w] loss weights (alpha mask), or None
    sizes: list[tuple[int, int]] = field(default_factory=list)  # original (H, W) per image
    targets: list[tuple[int, int]] = field(default_factory=list)  # (H, W) each image is cropped to

    def __post_init__(self) -> None:
        if self.crop not in ("center", "random"):
            raise ValueError(f"unknown crop {self.crop!r}: use center or random")
        if self.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {self.repeats}")
        if self.random_crops < 1:
            raise ValueError(f"random crops per image must be >= 1, got {self.random_crops}")
        if not 0.0 <= self.tag_dropout < 1.0:
            raise ValueError(f"--tag-dropout {self.tag_dropout} is a probability: use 0 <= P < 1")
        if self.keep_tokens < 0:
            raise ValueError(f"--keep-tokens must be >= 0, got {self.keep_tokens}")
        self.sizes = [tuple(im.rgb.shape[-2:]) for im in self.images]
        square = (self.resolution, self.resolution)
        table = make_buckets(self.resolution) if self.buckets else [square]
        self.targets = [nearest_bucket(h, w, table) for h, w in self.sizes]
        for im, (h, w), (th, tw) in zip(self.images, self.sizes, self.targets):
            if h < th or w < tw:
                into = f"its bucket {tw}x{th}" if self.buckets else f"the training resolution {self.resolution}"
                log.warning("%s is %dx%d, smaller than %s: upscaled (it will look soft; use images with a short "
                            "side of at least %d px)", im.path, w, h, into, self.resolution)
        if self.buckets:
            log.info(self.describe_buckets())
        if self.alpha_mask and not any(im.alpha is not None for im in self.images):
            log.warning("--alpha-mask is set but no image has transparency: every pixel counts fully")
        self.has_captions = any(im.caption for im in self.images)
        if any("[filewords]" in t for t in self.templates):
            if not self.has_captions:
                log.warning("the templates use [filewords] but no image has a .txt caption next to it or words "
                            "in its file name: [filewords] will be empty")
            elif any(im.caption_from == "name" for im in self.images):
                log.info("[filewords]: %d of %d images have no .txt caption and use the words of their file name",
                         sum(im.caption_from == "name" for im in self.images), len(self.images))
        if (self.shuffle_tags or self.tag_dropout > 0) and not any(
                len(tpl.split_tags(im.caption)) > self.keep_tokens for im in self.images):
            log.warning("--shuffle-tags/--tag-dropout: no caption has more than %d comma-separated tags "
                        "(--keep-tokens), so nothing is shuffled or dropped", self.keep_tokens)

    def describe_buckets(self) -> str:
        """One line: each bucket in use (width x height) and its number of images."""
        counts: dict[tuple[int, int], int] = {}
        for t in self.targets:
            counts[t] = counts.get(t, 0) + 1
        listed = ", ".join(f"{w}x{h}: {n}" for (h, w), n in sorted(counts.items(), key=lambda kv: kv[0][1] / kv[0][0]))
        return f"aspect-ratio buckets (width x height: images): {listed}"

    def _pixels(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        im = self.images[index]
        th, tw = self.targets[index]
        rgb = resize_to_cover(im.rgb, th, tw)
        alpha = resize_to_cover(im.alpha, th, tw) if im.alpha is not None else None
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
            th, tw = self.targets[index]
            pending = []
            for top, left in crop_offsets(h, w, th, tw, self.crop, self.random_crops, crops_gen):
                for flip in ((False, True) if self.flip else (False,)):
                    px = rgb[:, top:top + th, left:left + tw]
                    a = alpha[:, top:top + th, left:left + tw] if alpha is not None else None
                    if flip:
                        px = px.flip(-1)
                        a = a.flip(-1) if a is not None else None
                    crop_left = w - tw - left if flip else left
                    pending.append((Variant(index, top, left, flip, self.sizes[index], (top, crop_left), (th, tw)),
                                    px, a))
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
                        a = torch.ones(1, th, tw)
                    # The loss lives in latent space: average the mask over each latent pixel's area.
                    weights.append(F.adaptive_avg_pool2d(a.unsqueeze(0), zi.shape[-2:]).squeeze(0))
        self.variants = variants
        self.latents = latents
        if not all(torch.isfinite(z).all() for z in self.latents):
            raise ValueError("the VAE produced non-finite latents (an fp16 VAE overflow is the usual cause): "
                             "train with --dtype float32 or bfloat16")
        self.weights = weights if self.alpha_mask else None
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

    def _bucket_epoch(self, epoch: int, batch_size: int) -> list[list[int]]:
        """The batches (image indices) of one epoch with buckets: each bucket's images (x repeats)
        shuffled and cut into batches, the last one topped up from the start of the same bucket
        so every batch is full, then the batches of all buckets shuffled together."""
        gen = generator(self.seed, "bucket-epoch", epoch)
        batches = []
        for target in sorted(set(self.targets)):
            pool = [i for i, t in enumerate(self.targets) if t == target for _ in range(self.repeats)]
            pool = [pool[p] for p in torch.randperm(len(pool), generator=gen).tolist()]
            n = math.ceil(len(pool) / batch_size)
            pool = [pool[k % len(pool)] for k in range(n * batch_size)]
            batches += [pool[k * batch_size:(k + 1) * batch_size] for k in range(n)]
        return [batches[p] for p in torch.randperm(len(batches), generator=gen).tolist()]

    def _images(self, first_index: int, batch_size: int) -> list[int]:
        """The image of each sample first_index .. first_index+batch_size-1."""
        if not self.buckets:
            epoch_len = len(self.images) * self.repeats
            return [self._epoch_order(i // epoch_len)[i % epoch_len] for i in range(first_index, first_index + batch_size)]
        if first_index % batch_size:
            raise ValueError(f"with buckets, batches start at multiples of the batch size, not at sample {first_index}")
        number = first_index // batch_size
        per_epoch = sum(math.ceil(self.targets.count(t) * self.repeats / batch_size) for t in set(self.targets))
        return self._bucket_epoch(number // per_epoch, batch_size)[number % per_epoch]

    def _pick(self, index: int, image: int) -> tuple[int, str]:
        """Sample number `index` of image `image` -> (variant index, prompt), drawn from (seed, index)."""
        gen = generator(self.seed, "sample", index)
        choices = [i for i, v in enumerate(self.variants) if v.image == image]
        variant = choices[int(torch.randint(len(choices), (1,), generator=gen))]
        template = self.templates[int(torch.randint(len(self.templates), (1,), generator=gen))]
        caption = augment_caption(self.images[image].caption, self.shuffle_tags, self.tag_dropout,
                                  self.keep_tokens, generator(self.seed, "caption", index))
        return variant, tpl.fill(template, self.token, caption)

    def sample(self, index: int) -> tuple[int, str]:
        """Sample number `index` (global, from 0; with buckets, as in batches of 1) -> (variant index, prompt)."""
        return self._pick(index, self._images(index, 1)[0])

    def batch(self, first_index: int, batch_size: int):
        """Samples first_index .. first_index+batch_size-1 -> (latents, prompts, weights|None, variants).
        With buckets, first_index is a multiple of batch_size and all samples share one bucket."""
        if self.latents is None:
            raise RuntimeError("TrainingData.encode(sd) must run before batches are drawn")
        images = self._images(first_index, batch_size)
        picks = [self._pick(first_index + b, image) for b, image in enumerate(images)]
        latents = torch.stack([self.latents[v] for v, _ in picks])
        weights = torch.stack([self.weights[v] for v, _ in picks]) if self.weights is not None else None
        return latents, [p for _, p in picks], weights, [self.variants[v] for v, _ in picks]

    def preview_size(self) -> tuple[int, int]:
        """(H, W) of previews: the square, or with buckets the bucket holding the most images (of
        equals, the one nearest to square)."""
        return max(set(self.targets), key=lambda t: (self.targets.count(t), -abs(math.log(t[1] / t[0])), -t[0]))

    def preview_latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of a cached latent of preview_size() (encode must have run)."""
        size = self.preview_size()
        return next(tuple(z.shape) for z, v in zip(self.latents, self.variants) if v.target_size == size)
