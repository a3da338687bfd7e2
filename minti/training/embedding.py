"""A learned embedding, and the file formats the rest of the ecosystem reads.

FORMATS, the one table of them (all hold float32 [N, dim] tensors, N = vectors per token):
  safetensors  <name>.safetensors          {"emb_params": [N, dim]}        A1111, ComfyUI, kohya --weights
                                           SDXL (two text encoders): {"clip_l": [N, 768], "clip_g": [N, 1280]}
                                                                           kohya / ComfyUI / A1111 / diffusers
  pt           <name>.pt                   A1111's pickle-free dict:        A1111, diffusers (token = "name")
                                           string_to_token {"*": 265}, string_to_param {"*": [N, dim]},
                                           name, step, sd_checkpoint, sd_checkpoint_name
  diffusers    learned_embeds.safetensors  {"<token>": [N, dim]}            diffusers' own format

A1111 and ComfyUI take the trigger word from the file name, so `<name>` is the token with
the angle brackets removed, and load_embedding() names a file's token after its stem. A1111's
PNG card (a preview carrying the .pt dict in a text chunk) is read and written at the end.
"""
from __future__ import annotations

import base64
import binascii
import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin, UnidentifiedImageError
from safetensors import SafetensorError
from safetensors.torch import load_file

import minti.atomic as atomic
from minti.errors import missing_path
from minti.loading.checkpoint import file_format, what_it_is_instead
from minti.loading.families import family_with_text_widths

STAR_TOKEN_ID = 265  # CLIP's id for "*": A1111 stores it in every .pt, nothing reads it back
SDXL_KEYS = ("clip_l", "clip_g")  # order = sd.text_encoders order (CLIP-L, then bigG)
# Token vectors are of order 1 (trained ones rarely pass 10); a value past this cannot have come from
# training that went well, and in float16 the text encoder would overflow on it.
MAX_ABS_VALUE = 1e4
CARD_SUFFIX = ".png"


def file_stem(token: str) -> str:
    """The file name for a token: "<my-cat>" -> "my-cat" (A1111/ComfyUI trigger on the stem)."""
    name = token.strip()
    if name.startswith("<") and name.endswith(">") and len(name) > 2:
        name = name[1:-1]
    name = re.sub(r'[\\/:*?"<>|\s]+', "_", name).strip("._")
    return name or "embedding"


@dataclass
class Embedding:
    """The learned vectors for one token: one [N, dim] float32 tensor per text encoder."""
    token: str
    vectors: list[torch.Tensor]
    step: int = 0
    sd_checkpoint: str | None = None  # A1111 short hash of the model file (first 10 hex of sha256)
    sd_checkpoint_name: str | None = None
    source: Path | None = field(default=None, compare=False)  # file it was loaded from, if any

    def __post_init__(self) -> None:
        if not self.vectors or len(self.vectors) > 2:
            raise ValueError(f"an embedding has one tensor per text encoder (1 or 2), got {len(self.vectors)}")
        vecs = []
        for v in self.vectors:
            v = v.detach().to("cpu", torch.float32)
            if v.ndim == 1:
                v = v.unsqueeze(0)
            if v.ndim != 2:
                raise ValueError(f"embedding vectors must be [N, dim], got shape {tuple(v.shape)}")
            vecs.append(v.contiguous())
        if len({v.shape[0] for v in vecs}) != 1:
            raise ValueError(f"every text encoder needs the same number of vectors, got {[v.shape[0] for v in vecs]}")
        self.vectors = vecs

    @property
    def name(self) -> str:
        return file_stem(self.token)

    @property
    def n_vectors(self) -> int:
        return self.vectors[0].shape[0]

    @property
    def dims(self) -> list[int]:
        return [v.shape[1] for v in self.vectors]

    @property
    def is_sdxl(self) -> bool:
        return len(self.vectors) == 2

    # ------------------------------------------------------------------- saving

    @property
    def formats(self) -> list[str]:
        """The FORMATS that can hold this embedding (SDXL's: safetensors only), in the table's order."""
        return [f.name for f in FORMATS.values() if len(self.vectors) in f.encoders]

    def state_dicts(self) -> dict[str, dict]:
        """format -> what that file holds (tensors are CPU float32)."""
        return {name: FORMATS[name].layout(self) for name in self.formats}

    def save(self, path: str | Path, formats: tuple[str, ...] | None = None) -> list[Path]:
        """Save atomically. `path` is a folder (-> every format, each under its FORMATS file name)
        or a file whose suffix picks the format (.safetensors -> emb_params, .pt/.bin -> A1111;
        `formats=("diffusers",)` with a file path -> {token: tensor}). SDXL embeddings have one
        format ({"clip_l", "clip_g"}) and are saved as .safetensors only. Returns the files written.
        """
        path = Path(path)
        data = self.state_dicts()
        meta = {"token": self.token, "step": str(self.step), "format": "minti"}
        suffix = path.suffix.lower()
        if suffix in FILE_SUFFIXES:
            fmt = formats or (next(f.name for f in FORMATS.values() if suffix in f.suffixes),)
            if len(fmt) != 1 or fmt[0] not in data:
                raise ValueError(f"{path}: a file path takes one of the formats {', '.join(data)}; "
                                 "pass a folder to write them all")
            fmt = fmt[0]
            if suffix not in FORMATS[fmt].suffixes:
                raise ValueError(f"{path}: format {fmt!r} cannot be written with the suffix {path.suffix}")
            _write(data[fmt], path, meta)
            return [path]
        written = []
        for fmt in formats or FORMATS:
            if fmt not in FORMATS:
                raise ValueError(f"unknown embedding format {fmt!r}: use {', '.join(FORMATS)}")
            if fmt not in data:
                continue
            target = path / FORMATS[fmt].file_name(self.name)
            _write(data[fmt], target, meta)
            written.append(target)
        return written


def _write(data: dict, path: Path, meta: dict[str, str]) -> None:
    """The suffix says how the file is encoded: .safetensors, else a torch pickle."""
    if path.suffix.lower() != ".safetensors":
        atomic.torch_save(data, path)
    else:
        atomic.save_safetensors(data, path, metadata=meta)


# ----------------------------------------------------------------------------- the formats


@dataclass
class Read:
    """What a format's reader takes out of a file's dict."""
    vectors: list[torch.Tensor]
    token: str | None = None  # the token the file names itself (diffusers' key); None: the file's stem
    step: int = 0
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None


@dataclass(frozen=True)
class Format:
    """One embedding file format: the file a folder save writes, the suffixes a file of it may have
    (the first is that file's), the embeddings it can hold (by number of text encoders), the dict
    written for one, and the reader that takes a loaded dict apart (None: not this format)."""
    name: str
    file_pattern: str  # {name}: the token's file stem
    suffixes: tuple[str, ...]
    encoders: tuple[int, ...]
    layout: Callable[[Embedding], dict]
    read: Callable[[dict, Path], Read | None]

    def file_name(self, name: str) -> str:
        return self.file_pattern.format(name=name)


def _a1111_safetensors(emb: Embedding) -> dict:
    return dict(zip(SDXL_KEYS, emb.vectors)) if emb.is_sdxl else {"emb_params": emb.vectors[0]}


def _read_a1111_safetensors(data: dict, path: Path) -> Read | None:
    if all(k in data for k in SDXL_KEYS):
        return Read([_as_tensor(data[k], path, k) for k in SDXL_KEYS])
    if "emb_params" in data:
        return Read([_as_tensor(data["emb_params"], path, "emb_params")])
    return None


def _a1111_pt(emb: Embedding) -> dict:
    v = emb.vectors[0]
    return {"string_to_token": {"*": STAR_TOKEN_ID}, "string_to_param": {"*": v},
            # diffusers takes the token from "name": keep the brackets so it matches the token
            # used in training and in learned_embeds.safetensors.
            "name": emb.token, "step": emb.step, "sd_checkpoint": emb.sd_checkpoint,
            "sd_checkpoint_name": emb.sd_checkpoint_name}


def _read_a1111_pt(data: dict, path: Path) -> Read | None:
    if "string_to_param" not in data:
        return None
    params = data["string_to_param"]
    if not isinstance(params, dict) or len(params) != 1:
        raise _bad(path, "string_to_param must hold exactly one tensor")
    return Read([_as_tensor(next(iter(params.values())), path, "string_to_param")], step=int(data.get("step") or 0),
                sd_checkpoint=data.get("sd_checkpoint"), sd_checkpoint_name=data.get("sd_checkpoint_name"))


def _read_diffusers(data: dict, path: Path) -> Read | None:
    if len(data) != 1:
        return None
    key, value = next(iter(data.items()))
    return Read([_as_tensor(value, path, repr(key))], token=str(key))


# The order is that of a folder save, and of reading: the first reader that recognises a dict wins
# (diffusers' {token: tensor} last, as any one-key dict looks like it).
FORMATS = {f.name: f for f in (
    Format("safetensors", "{name}.safetensors", (".safetensors",), (1, 2), _a1111_safetensors,
           _read_a1111_safetensors),
    Format("pt", "{name}.pt", (".pt", ".bin"), (1,), _a1111_pt, _read_a1111_pt),
    Format("diffusers", "learned_embeds.safetensors", (".safetensors", ".pt", ".bin"), (1,),
           lambda emb: {emb.token: emb.vectors[0]}, _read_diffusers),
)}
FILE_SUFFIXES = tuple(dict.fromkeys(s for f in FORMATS.values() for s in f.suffixes))
# What load_embedding reads: the formats' suffixes, the other names of a torch pickle, A1111's card
EMBEDDING_SUFFIXES = (*FILE_SUFFIXES, ".ckpt", ".pth", CARD_SUFFIX)


# ----------------------------------------------------------------------------- families

def _what(dims: list[int]) -> str:
    family = family_with_text_widths(dims)
    if family is None:
        return f"{list(dims)}-wide"
    if len(dims) == 2:
        return f"{list(dims)}-wide ({family.label}: clip_l [N, {dims[0]}] + clip_g [N, {dims[1]}])"
    return f"{list(dims)}-wide ({family.label})"


def mismatch(path: str | Path, emb: Embedding, sd) -> str:
    """One line for an embedding file whose vectors do not fit the model: what each is and the fix."""
    label = sd.family_facts.label
    return (f"{path} holds {_what(emb.dims)} vectors but this {label} model needs "
            f"{_what(list(sd.embedding_dims))}: use an embedding trained for {label}")


# ----------------------------------------------------------------------------- loading


def _bad(path: Path, what: str) -> ValueError:
    return ValueError(f"{path} is not a textual-inversion embedding ({what}); expected an A1111 .pt/.safetensors, "
                      "a diffusers learned_embeds file, or an SDXL clip_l/clip_g file")


def _read(path: Path) -> dict:
    if not path.exists():
        reason = missing_path(path)
        raise ValueError(f"embedding file {path} {reason}" + (": check the path" if reason == "does not exist" else ""))
    if path.is_dir():
        diffusers = Path(FORMATS["diffusers"].file_pattern).stem  # also as diffusers' older .bin
        for name in (f"{diffusers}.safetensors", f"{diffusers}.bin"):
            if (path / name).is_file():
                return _read(path / name)
        raise ValueError(f"{path} is a folder without learned_embeds.safetensors: pass the embedding file itself")
    suffix = path.suffix.lower()
    if suffix == CARD_SUFFIX:
        return read_png_card(path)
    if suffix not in EMBEDDING_SUFFIXES:
        raise ValueError(f"{path}: unknown embedding file type {path.suffix!r}; use .safetensors, .pt, .bin or an "
                         "A1111 .png card")
    try:
        # before any parser: torch would answer text or HTML with an essay about weights_only
        instead = what_it_is_instead(path, noun="embedding")
        with open(path, "rb") as f:
            fmt = file_format(f.read(16), path.stat().st_size)  # the bytes decide, not the suffix
    except OSError as e:
        raise ValueError(f"cannot read {path} ({e.strerror or e}): check the file's permissions") from None
    if instead is not None:
        raise ValueError(f"{path} {instead}")
    if fmt == "safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"cannot read {path}: {_first_line(e)}; the file is damaged or not a safetensors "
                             "file") from None
    try:
        # weights_only: an embedding from the internet must never run code on load. A file object:
        # torch.load would take a .safetensors name for safetensors bytes.
        with open(path, "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"(?:GLOBAL|global|class|function) ([\w.]+)", str(e))
        what = f" (it references {found.group(1)})" if found else ""
        raise ValueError(f"refusing to load {path}: its pickle would run code when unpickled{what}, and "
                         "minti only loads plain tensors. Convert it to .safetensors with a trusted tool "
                         "first") from None
    except Exception as e:  # torch raises many kinds (struct.error, RuntimeError, EOFError, ...) for junk
        raise ValueError(f"cannot read {path}: {type(e).__name__}: {_first_line(e)}; the file is damaged or not "
                         "a torch file") from None


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


def _as_tensor(x, path: Path, where: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    raise _bad(path, f"{where} is a {type(x).__name__}, not a tensor")


def load_embedding(path: str | Path, token: str | None = None) -> Embedding:
    """Read an embedding in any supported format.

    The token is, unless given: the key of a diffusers {token: tensor} file, else the file
    stem (as A1111 and ComfyUI do: `my-cat.pt` triggers on "my-cat").
    """
    path = Path(path)
    data = _read(path)
    if not isinstance(data, dict) or not data:
        raise _bad(path, "it holds no dict of tensors")
    stem = path.stem if not path.is_dir() else path.name
    if path.suffix.lower() == CARD_SUFFIX and isinstance(data.get("name"), str) and data["name"]:
        stem = data["name"]  # A1111 triggers a card by the name inside it, not its file name
    read = next((found for f in FORMATS.values() if (found := f.read(data, path)) is not None), None)
    if read is None:
        raise _bad(path, f"unexpected keys {sorted(map(str, data))[:6]}")
    try:
        emb = Embedding(token or read.token or stem, read.vectors, step=read.step, sd_checkpoint=read.sd_checkpoint,
                        sd_checkpoint_name=read.sd_checkpoint_name)
    except ValueError as e:
        raise _bad(path, str(e)) from None
    if not all(torch.isfinite(v).all() for v in emb.vectors):
        raise ValueError(f"{path} holds NaN or infinite values: the embedding is broken; use an earlier save")
    largest = max(float(v.abs().max()) for v in emb.vectors)
    if largest > MAX_ABS_VALUE:
        raise ValueError(f"{path} holds values up to {largest:.3g}, far beyond any trained embedding's: it would "
                         "turn the text encoder's output into NaN (a diverged training run?); use an earlier save")
    emb.source = path
    return emb


# ----------------------------------------------------------------------------- PNG card
#
# A1111's embedding card: a PNG (a preview of the concept) whose tEXt chunk "sd-ti-embedding"
# holds base64 of a JSON object, the same dict as its .pt, with every tensor written as
# {"TORCHTENSOR": nested lists of numbers}. A1111 takes the trigger word from its "name". A1111
# also hides a zlib copy in coloured strips beside the picture, for cards whose text chunk a
# website stripped; minti writes and reads the text chunk only.

PNG_CARD_KEY = "sd-ti-embedding"
_TENSOR_KEY = "TORCHTENSOR"


def card_data(emb: Embedding) -> dict:
    """What a card holds: the A1111 .pt dict (SDXL: its clip_l and clip_g, and the step), named after
    the file stem."""
    if emb.is_sdxl:
        return dict(emb.state_dicts()["safetensors"], name=emb.name, step=emb.step)
    return dict(emb.state_dicts()["pt"], name=emb.name)


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        # float32 -> Python float -> JSON keeps every bit: the shortest repr of the double reads back exactly
        return {_TENSOR_KEY: value.detach().float().cpu().tolist()}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def _from_json(obj: dict):
    if set(obj) == {_TENSOR_KEY}:
        return torch.tensor(obj[_TENSOR_KEY], dtype=torch.float32)
    return obj


def save_png_card(emb: Embedding, image, path: str | Path) -> Path:
    """Write `image` (a PIL image or a PNG file) to `path` with the embedding in its text chunk
    and a strip naming the embedding and its step under the picture; atomic."""
    if not isinstance(image, Image.Image):
        with Image.open(image) as opened:
            image = opened.convert("RGB")
    label = f"{emb.name}  step {emb.step}" + (f"  {emb.sd_checkpoint_name}" if emb.sd_checkpoint_name else "")
    strip = max(14, image.height // 16)
    card = Image.new("RGB", (image.width, image.height + strip), "black")
    card.paste(image.convert("RGB"), (0, 0))
    try:  # Pillow >= 10.1 scales its bundled font
        font = ImageFont.load_default(size=strip - 4)
    except TypeError:
        font = ImageFont.load_default()
    ImageDraw.Draw(card).text((3, image.height + 1), label, fill="white", font=font)
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_CARD_KEY, base64.b64encode(json.dumps(_jsonable(card_data(emb))).encode("utf-8")))
    path = Path(path)
    with atomic.atomic_path(path) as tmp:
        card.save(tmp, format="PNG", pnginfo=info)
    return path


def read_png_card(path: str | Path) -> dict:
    """The embedding dict of an A1111 PNG card (tensors as float32); ValueError naming the file
    when it has no readable sd-ti-embedding text chunk."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            text = getattr(img, "text", {}).get(PNG_CARD_KEY)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"cannot read {path} as a PNG ({e}); the file is damaged or not an image") from None
    if text is None:
        raise ValueError(f"{path} is a PNG without the {PNG_CARD_KEY!r} text chunk, so not an embedding card (an "
                         "A1111 card whose text was stripped keeps its data only in the pixels, which minti does "
                         "not read): use the embedding's .pt or .safetensors file")
    try:
        return json.loads(base64.b64decode(text, validate=False), object_hook=_from_json)
    except (binascii.Error, ValueError, TypeError, RuntimeError) as e:
        raise ValueError(f"{path}: its {PNG_CARD_KEY!r} text chunk is damaged ({type(e).__name__}: {e}); use the "
                         "embedding's .pt or .safetensors file") from None
