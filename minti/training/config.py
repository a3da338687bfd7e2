"""TrainConfig: everything a training run needs besides the model.

Each field carries its own help text in its metadata, and, when it is also a command-line flag,
the `--help` group it belongs to and the argparse details (type, choices, action). `python -m
minti train` builds its training flags from these fields (minti.cli.train), so a field, its
flag, its help and the default the help names cannot drift apart. Fields with no group are
API-only. `TrainConfig.validate()` refuses what a run cannot take before the model loads, and
`validate_together` what several concepts trained in one run cannot share.

This module imports nothing heavy at its top: `--help` reads it (measured: 0.2 s to import it,
3 s and more with torch on a busy 2-core machine), so validate() imports what it checks against.
"""
from __future__ import annotations

import logging
import math
import re
from argparse import BooleanOptionalAction
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from minti.errors import UserError, missing_path

log = logging.getLogger("minti")

# The `python -m minti train --help` groups, in the order they are listed.
WHAT, TRAINING, DATA, OUTPUT, DEVICE = "what to train", "training", "data", "output", "device"
GROUPS = (WHAT, TRAINING, DATA, OUTPUT, DEVICE)

# Fields renamed since a run folder's config.json may have been written: old name -> new name.
RENAMED_FIELDS = {"preview_cfg": "preview_guidance"}

MAX_VECTORS = 75  # a prompt holds 75 content tokens; more vectors than that can never be used
# The largest training size accepted: four times SDXL's, past any published fine-tune; larger is a typo
# that would otherwise end in an out-of-memory crash while resizing the images.
MAX_RESOLUTION = 4096


def _field(default: Any, help: str, group: str | None = None, default_help: str | None = None,
           **argparse_kwargs: Any) -> Any:
    """A field with its help in the metadata. group None: API-only, no flag. default_help: what the
    help names as the default where the field's own default does not say it (None meaning "depends
    on the model"), or where the command line's default differs from the API's. argparse_kwargs:
    the flag's type, choices, action or metavar."""
    return field(default=default, metadata={"help": help, "group": group, "default_help": default_help,
                                            "argparse": argparse_kwargs})


@dataclass
class TrainConfig:
    """Everything a training run needs besides the model. Defaults follow A1111 where users expect them."""
    token: str = _field("<concept>", "the new word, e.g. '<my-cat>'; files are named after it without <> "
                        "(A1111/ComfyUI trigger on the file name; SDXL files hold clip_l and clip_g)", WHAT,
                        default_help="the demo's when no --model is given")
    images: str | Path | None = _field(None, "folder with 3-20 images of the concept (jpg/png/webp/bmp; optional "
                                       "<image>.txt captions for [filewords])", WHAT,
                                       default_help="the demo's when no --model is given")
    init: str = _field("*", "word(s) whose token vectors start the embedding, e.g. 'cat' (SDXL: each text "
                       "encoder's own vectors), or an embedding file of the same family to continue from", WHAT)
    vectors: int | None = _field(None, "vectors per token, 1-75 (more = more capacity, more prompt space)", WHAT,
                                 default_help="1, or the --init file's count", type=int)
    steps: int = _field(3000, "total optimizer steps, also when resuming", TRAINING, type=int)
    resolution: int | None = _field(None, "training size in pixels: the short side is resized to it, then "
                                    "cropped square (with --buckets: at most resolution^2 pixels in the image's "
                                    "aspect ratio)", TRAINING, default_help="512; 768 for SD 2.x v models; "
                                    "1024 for SDXL", type=int)
    batch_size: int = _field(1, "images per micro-batch", TRAINING, type=int)
    grad_accum: int = _field(1, "micro-batches per optimizer step", TRAINING, type=int)
    lr: float | str = _field(5e-3, "learning rate, or A1111's schedule '0.005:100, 1e-3:1000, 1e-5'", TRAINING)
    lr_schedule: str = _field("constant", "constant, cosine or linear decay to 0, or A1111's syntax", TRAINING)
    warmup_steps: int = _field(0, "linear warm-up steps", TRAINING, type=int)
    weight_decay: float = _field(0.0, "AdamW weight decay", TRAINING, type=float)
    adam_betas: tuple[float, float] = _field((0.9, 0.999), "AdamW's (beta1, beta2)")
    adam_eps: float = _field(1e-8, "AdamW's epsilon")
    max_grad_norm: float | None = _field(None, "clip the vectors' gradient norm to this", TRAINING,
                                         default_help="none, no clipping", type=float)
    template: str = _field("object", "object, style, or a text file of prompts with [name] (and optionally "
                           "[filewords])", DATA)
    repeats: int = _field(1, "each image this many times per epoch", DATA, type=int)
    flip: bool = _field(False, "also train on mirrored images (leave off when text or logos must not mirror)",
                        DATA, action=BooleanOptionalAction)
    crop: str = _field("center", "square crop after resizing the short side", DATA, choices=("center", "random"))
    random_crops: int = _field(4, "crop variants cached per image with --crop random", DATA, type=int)
    alpha_mask: bool = _field(False, "PNG transparency weights the loss (transparent areas are always "
                              "composited on white)", DATA, action=BooleanOptionalAction)
    buckets: bool | None = _field(None, "aspect-ratio buckets: each image is resized and cropped to the bucket of "
                                  "nearest aspect ratio (sides multiples of 64, at most resolution^2 pixels) and "
                                  "each batch comes from one bucket", DATA,
                                  default_help="on for SDXL, off otherwise", action=BooleanOptionalAction)
    shuffle_tags: bool = _field(False, "shuffle the comma-separated tags of each caption for every sample (kohya's "
                                "shuffle_caption)", DATA, action=BooleanOptionalAction)
    tag_dropout: float = _field(0.0, "drop each caption tag with this probability, for every sample", DATA,
                                type=float, metavar="P")
    keep_tokens: int = _field(0, "the first N caption tags are never shuffled or dropped (kohya's keep_tokens)",
                              DATA, type=int, metavar="N")
    latent_sampling: str = _field("mean", "cache the VAE posterior mean or one sample per image variant (drawn "
                                  "once)", DATA, choices=("mean", "sample"))
    norm: str = _field("off", "preserve: after every step, rescale each trained vector to the median norm of its "
                       "text encoder's token table (OneTrainer's approach)", TRAINING, choices=("off", "preserve"))
    max_norm: float | None = _field(None, "after every step, clip each trained vector's norm to this (every text "
                                    "encoder; the start of the run logs each table's median norm)", TRAINING,
                                    default_help="none", type=float, metavar="X")
    loss_scale: float | None = _field(None, "fp16 dynamic loss scaling's starting scale; None: 2**16 for fp16 "
                                      "models, off otherwise")
    png_card: bool = _field(False, "also save <name>.png: a preview image carrying the embedding in its text chunk, "
                            "as A1111 writes it (A1111 and minti load it like the .pt)", OUTPUT,
                            action=BooleanOptionalAction)
    save_every: int = _field(500, "save <name>-<step>.safetensors and the state every N steps (0: only at the "
                             "end)", OUTPUT, type=int)
    preview_every: int = _field(500, "draw a preview image every N steps, and one before the first (0: never)",
                                OUTPUT, type=int)
    preview_prompt: str | None = _field(None, "prompt for previews", OUTPUT, default_help="the first template line")
    preview_steps: int = _field(20, "sampling steps per preview", OUTPUT, type=int)
    preview_guidance: float = _field(7.5, "classifier-free guidance scale of the previews")
    preview_sampler: str = _field("ddim", "sampler of the previews: ddim or euler")
    seed: int = _field(0, "makes batches, crops, timesteps and noise reproducible", TRAINING, type=int)
    # None in the API: train in memory and write nothing
    output: str | Path | None = _field(None, "run folder", OUTPUT, default_help="runs/<token without <>>")
    resume: str | Path | None = _field(None, "continue the run in DIR (settings not given are taken from its "
                                       "config.json)", OUTPUT, default_help="none, a new run", metavar="DIR")
    overwrite: bool = _field(False, "start a new run in an --output folder that already holds one", OUTPUT,
                             action="store_true")
    memory: str = _field("auto", "low: recompute each UNet block in backward (least VRAM, ~30% slower); fast: "
                         "store activations; auto: recompute the fewest UNet blocks that fit the free GPU memory (or --vram)", DEVICE,
                         choices=("auto", "low", "fast"))
    vram: float | None = _field(None, "GiB the training step may use: --memory auto plans against this instead of "
                                "the free GPU memory (also on the CPU, to see the plan)", DEVICE,
                                default_help="the free GPU memory", type=float, metavar="GiB")

    def validate(self) -> None:
        """UserError naming the flag and the fix for a setting no run can take, checked without
        the model (the CLI calls it before loading one, train_many again)."""
        # torch-importing modules, here rather than at the top: see the module docstring
        from minti.sampling import MAX_STEPS, SAMPLERS
        from minti.training.placeholder import init_embedding

        if self.vectors is not None and not 1 <= self.vectors <= MAX_VECTORS:
            raise UserError(f"--vectors {self.vectors} is outside 1-{MAX_VECTORS}: a prompt holds at most "
                            f"{MAX_VECTORS} tokens (A1111 uses 1-8 in practice)")
        for name in ("steps", "save_every", "preview_every", "warmup_steps"):  # steps=0: the init embedding (API)
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "grad_accum", "repeats", "preview_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.preview_steps > MAX_STEPS:
            raise UserError(f"--preview-steps {self.preview_steps} is more than the {MAX_STEPS} a sampler "
                            "can take (20-50 are usual)")
        if self.resolution is not None and not 1 <= self.resolution <= MAX_RESOLUTION:
            raise UserError(f"--resolution {self.resolution} is outside 1-{MAX_RESOLUTION}: pass the training size "
                            "in pixels (512 for SD 1.x, 768 for SD 2.x v models, 1024 for SDXL), or leave it out")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise UserError(f"--max-grad-norm must be > 0, got {self.max_grad_norm}")
        if self.vram is not None and not (self.vram > 0 and math.isfinite(self.vram)):
            raise UserError(f"--vram must be a positive number of GiB, got {self.vram}")
        if self.images is None:
            raise UserError("no training images: pass --images with a folder of 3-20 pictures of the concept")
        _check_images_folder(Path(self.images))
        init_embedding(self.init)  # a file --init names is read before the model loads, so it fails fast
        if not self.token or any(c.isspace() for c in self.token):
            raise UserError(f"--token {self.token!r} must be one word without spaces, e.g. <my-cat>")
        if not re.search(r"\w", self.token):  # the files are named after it: '<>' would make "embedding.pt"
            raise UserError(f"--token {self.token!r} has no letters or digits to name its files by: use a word "
                            "such as <my-cat>")
        if self.preview_sampler not in SAMPLERS:
            raise UserError(f"unknown preview sampler {self.preview_sampler!r}: use {' or '.join(SAMPLERS)}")

    def warn_if_unusual(self) -> None:
        """Log the settings that are valid but almost certainly not meant (once per run, where
        validate() may run twice)."""
        if isinstance(self.lr, (int, float)) and self.lr == 0:
            log.warning("--lr 0: the vectors will not change; pass a learning rate such as --lr 5e-3")


def validate_together(configs: list[TrainConfig]) -> None:
    """Concepts trained in one run: distinct tokens and output folders, one memory plan."""
    for name in ("token", "output"):
        seen: dict = {}
        for c in configs:
            value = getattr(c, name)
            if value is not None and str(value) in seen:
                raise UserError(f"two concepts use --{name} {value}: give each concept its own {name}")
            seen[str(value)] = c
    for name in ("memory", "vram"):
        values = [getattr(c, name) for c in configs]
        if len(set(values)) > 1:
            raise UserError(f"the concepts ask for different --{name} ({', '.join(map(str, values))}): they share "
                            "one model and one memory plan; give them the same value")


def _check_images_folder(folder: Path) -> None:
    """What the image reader (minti.training.data) cannot tell apart: a link that loops or points
    nowhere is not a missing folder, and a folder whose images all sit in subfolders is not empty."""
    from minti.training.data import IMAGE_EXTENSIONS  # imports torch: see the module docstring

    if not folder.exists():
        reason = missing_path(folder)
        if reason != "does not exist":
            raise UserError(f"--images {folder} {reason}")
        return  # the reader says it, with the formats it takes
    if not folder.is_dir() or any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.iterdir() if p.is_file()):
        return
    nested = sorted(p for p in folder.glob("*/*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if nested:
        subfolders = sorted({p.parent.name + "/" for p in nested})
        which = f"subfolders {', '.join(subfolders[:4])} hold" if len(subfolders) > 1 else f"subfolder {subfolders[0]} holds"
        raise UserError(f"--images {folder} has no images of its own, but its {which} {len(nested)}: pass one as "
                        "--images (minti reads only the images directly inside the folder)")


FIELD_NAMES = tuple(f.name for f in fields(TrainConfig))


def known_fields(values: dict) -> dict:
    """The TrainConfig fields among `values` (a config.json's "config", parsed flags), under their
    current names; other keys are dropped, JSON's lists become the tuples the fields hold."""
    out = {}
    for key, value in values.items():
        key = RENAMED_FIELDS.get(key, key)
        if key in FIELD_NAMES:
            out[key] = value
    if isinstance(out.get("adam_betas"), list):
        out["adam_betas"] = tuple(out["adam_betas"])
    return out
