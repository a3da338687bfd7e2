"""A learned embedding, and the file formats the rest of the ecosystem reads.

Formats (all hold float32 [N, dim] tensors, N = vectors per token):
  <name>.safetensors          {"emb_params": [N, dim]}              A1111, ComfyUI, kohya --weights
  <name>.pt                   A1111's pickle-free dict:              A1111, diffusers (token = "name")
                              string_to_token {"*": 265}, string_to_param {"*": [N, dim]},
                              name, step, sd_checkpoint, sd_checkpoint_name
  learned_embeds.safetensors  {"<token>": [N, dim]}                  diffusers' own format
  SDXL (two text encoders)    {"clip_l": [N, 768], "clip_g": [N, 1280]}  kohya / ComfyUI / A1111 / diffusers

A1111 and ComfyUI take the trigger word from the file name, so `<name>` is the token with
the angle brackets removed, and load_embedding() names a file's token after its stem.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minti import atomic

STAR_TOKEN_ID = 265  # CLIP's id for "*": A1111 stores it in every .pt, nothing reads it back
SDXL_KEYS = ("clip_l", "clip_g")  # order = sd.text_encoders order (CLIP-L, then bigG)
FORMATS = ("safetensors", "pt", "diffusers")
# Token vectors are of order 1 (trained ones rarely pass 10); a value past this cannot have come from
# training that went well, and in float16 the text encoder would overflow on it.
MAX_ABS_VALUE = 1e4


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

    def state_dicts(self) -> dict[str, dict]:
        """format -> what that file holds (tensors are CPU float32)."""
        if self.is_sdxl:
            return {"safetensors": dict(zip(SDXL_KEYS, self.vectors))}
        v = self.vectors[0]
        return {
            "safetensors": {"emb_params": v},
            "pt": {
                "string_to_token": {"*": STAR_TOKEN_ID},
                "string_to_param": {"*": v},
                # diffusers takes the token from "name": keep the brackets so it matches the
                # token used in training and in learned_embeds.safetensors.
                "name": self.token,
                "step": self.step,
                "sd_checkpoint": self.sd_checkpoint,
                "sd_checkpoint_name": self.sd_checkpoint_name,
            },
            "diffusers": {self.token: v},
        }

    def save(self, path: str | Path, formats: tuple[str, ...] | None = None) -> list[Path]:
        """Save atomically. `path` is a folder (-> every format: <name>.safetensors, <name>.pt,
        learned_embeds.safetensors) or a file whose suffix picks the format (.safetensors ->
        emb_params, .pt/.bin -> A1111; `formats=("diffusers",)` with a file path -> {token: tensor}).
        SDXL embeddings have one format ({"clip_l", "clip_g"}) and are saved as .safetensors only.
        Returns the files written.
        """
        path = Path(path)
        data = self.state_dicts()
        meta = {"token": self.token, "step": str(self.step), "format": "minti"}
        suffix = path.suffix.lower()
        if suffix in (".safetensors", ".pt", ".bin"):
            fmt = formats or (("safetensors",) if suffix == ".safetensors" else ("pt",))
            if len(fmt) != 1 or fmt[0] not in data:
                raise ValueError(f"{path}: a file path takes one of the formats {', '.join(data)}; "
                                 "pass a folder to write them all")
            fmt = fmt[0]
            # The suffix must say how the file is encoded: .safetensors or a torch pickle.
            if (fmt == "pt" and suffix == ".safetensors") or (fmt == "safetensors" and suffix != ".safetensors"):
                raise ValueError(f"{path}: format {fmt!r} cannot be written with the suffix {path.suffix}")
            self._write(data[fmt], path, meta)
            return [path]
        written = []
        for fmt in formats or FORMATS:
            if fmt not in FORMATS:
                raise ValueError(f"unknown embedding format {fmt!r}: use {', '.join(FORMATS)}")
            if fmt not in data:
                continue
            target = path / ("learned_embeds.safetensors" if fmt == "diffusers" else f"{self.name}.{'pt' if fmt == 'pt' else 'safetensors'}")
            self._write(data[fmt], target, meta)
            written.append(target)
        return written

    @staticmethod
    def _write(data: dict, path: Path, meta: dict[str, str]) -> None:
        if path.suffix.lower() != ".safetensors":
            atomic.torch_save(data, path)
        else:
            atomic.save_safetensors(data, path, metadata=meta)


# ----------------------------------------------------------------------------- families

FAMILY_LABELS = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}


def family_of(dims: list[int]) -> str | None:
    """The model family whose text encoders are `dims` wide (the family table's presets), or None."""
    from minti.loading.families import FAMILIES

    for family in FAMILIES.values():
        if [family.parts[p].preset.width for p in family.text_parts] == list(dims):
            return family.name
    return None


def _what(dims: list[int]) -> str:
    family = family_of(dims)
    if family is None:
        return f"{list(dims)}-wide"
    if len(dims) == 2:
        return f"{list(dims)}-wide ({FAMILY_LABELS[family]}: clip_l [N, {dims[0]}] + clip_g [N, {dims[1]}])"
    return f"{list(dims)}-wide ({FAMILY_LABELS[family]})"


def mismatch(path: str | Path, emb: Embedding, sd) -> str:
    """One line for an embedding file whose vectors do not fit the model: what each is and the fix."""
    label = FAMILY_LABELS.get(sd.family, sd.family)
    return (f"{path} holds {_what(emb.dims)} vectors but this {label} model needs "
            f"{_what(list(sd.embedding_dims))}: use an embedding trained for {label}")


# ----------------------------------------------------------------------------- loading


def _bad(path: Path, what: str) -> ValueError:
    return ValueError(f"{path} is not a textual-inversion embedding ({what}); expected an A1111 .pt/.safetensors, "
                      "a diffusers learned_embeds file, or an SDXL clip_l/clip_g file")


def _read(path: Path) -> dict:
    from minti.errors import missing_path
    from minti.loading.checkpoint import file_format, what_it_is_instead

    if not path.exists():
        reason = missing_path(path)
        raise ValueError(f"embedding file {path} {reason}" + (": check the path" if reason == "does not exist" else ""))
    if path.is_dir():
        for name in ("learned_embeds.safetensors", "learned_embeds.bin"):
            if (path / name).is_file():
                return _read(path / name)
        raise ValueError(f"{path} is a folder without learned_embeds.safetensors: pass the embedding file itself")
    suffix = path.suffix.lower()
    if suffix == ".png":
        return read_png_card(path)
    if suffix not in (".safetensors", ".pt", ".bin", ".ckpt", ".pth"):
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
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"cannot read {path}: {_first_line(e)}; the file is damaged or not a safetensors "
                             "file") from None
    import pickle
    import re

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
    if path.suffix.lower() == ".png" and isinstance(data.get("name"), str) and data["name"]:
        stem = data["name"]  # A1111 triggers a card by the name inside it, not its file name
    step = 0
    checkpoint = checkpoint_name = None
    if "string_to_param" in data:  # A1111 .pt
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise _bad(path, "string_to_param must hold exactly one tensor")
        vectors = [_as_tensor(next(iter(params.values())), path, "string_to_param")]
        step = int(data.get("step") or 0)
        checkpoint, checkpoint_name = data.get("sd_checkpoint"), data.get("sd_checkpoint_name")
        name = token or stem
    elif all(k in data for k in SDXL_KEYS):
        vectors = [_as_tensor(data[k], path, k) for k in SDXL_KEYS]
        name = token or stem
    elif "emb_params" in data:
        vectors = [_as_tensor(data["emb_params"], path, "emb_params")]
        name = token or stem
    elif len(data) == 1:  # diffusers {token: tensor}
        key, value = next(iter(data.items()))
        vectors = [_as_tensor(value, path, repr(key))]
        name = token or str(key)
    else:
        raise _bad(path, f"unexpected keys {sorted(map(str, data))[:6]}")
    try:
        emb = Embedding(name, vectors, step=step, sd_checkpoint=checkpoint, sd_checkpoint_name=checkpoint_name)
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
    """What a card holds: the A1111 .pt dict (SDXL: clip_l and clip_g), named after the file stem."""
    if emb.is_sdxl:
        data = dict(zip(SDXL_KEYS, emb.vectors))
        data.update(name=emb.name, step=emb.step)
    else:
        data = dict(emb.state_dicts()["pt"], name=emb.name)
    return data


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
    from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

    import base64
    import json

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
    from PIL import Image, UnidentifiedImageError

    import base64
    import binascii
    import json

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
