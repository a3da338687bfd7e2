"""TrainConfig: everything a training run needs besides the model.

Each field carries its own help text in its metadata, and, when it is also a command-line flag,
the `--help` group it belongs to and the argparse details (type, choices, action). `python -m
minti train` builds its training flags from these fields (minti.cli.train), so a field, its
flag, its help and the default the help names cannot drift apart. Fields with no group are
API-only. This module imports nothing heavy: `--help` reads it.
"""
from __future__ import annotations

from argparse import BooleanOptionalAction
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

# The `python -m minti train --help` groups, in the order they are listed.
WHAT, TRAINING, DATA, OUTPUT, DEVICE = "what to train", "training", "data", "output", "device"
GROUPS = (WHAT, TRAINING, DATA, OUTPUT, DEVICE)

# Fields renamed since a run folder's config.json may have been written: old name -> new name.
RENAMED_FIELDS = {"preview_cfg": "preview_guidance"}


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
