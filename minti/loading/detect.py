"""What a file is: from its first bytes, from its key names and shapes, and from its name.

Bytes that are no checkpoint at all (an HTML page, a git-LFS pointer, JSON, text, an empty file)
are named for what they are before any parser sees them (what_it_is_instead); the embedding
reader asks the same question of its files.

Family detection uses structure first and widths second, so that narrow test models of the
real layouts are recognised too (the structures are the family table's presets:
minti.loading.families.family_with_unet):
    sdxl  UNet has label_emb and 3 levels (base; real context 2048)
    sd2   no label_emb, linear proj_in (real context 1024)
    sd1   no label_emb, 1x1-conv proj_in (real context 768)
Refused with a message naming what the file looks like: inpainting/depth/pix2pix UNets (input
channels != 4), the SDXL refiner (label_emb with 4 levels, context 1280, adm 2560), SD3/Flux/
Cascade/DiT transformers, LoRAs, textual-inversion embeddings, VAE-only and text-encoder-only files,
empty/unknown files.

v-prediction is invisible in the weights: guess_prediction reads the markers a file can carry.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

from minti.errors import UserError
from minti.loading.families import FAMILIES, UNET_PREFIX, Family, family_with_unet


class CheckpointError(UserError):
    """A checkpoint minti cannot use; the message is one line that names the file."""

    def __init__(self, path: str | Path, message: str):
        super().__init__(f"{path}: " + " ".join(str(message).split()))


# ---- what a file is, from its first bytes ----------------------------------------------------------

ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6
PICKLE_PROTOCOLS = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")  # torch's pre-1.6 format: a bare pickle


def file_format(head: bytes, size: int) -> str | None:
    """"pickle" (torch.save, zip or legacy) or "safetensors" from a file's first bytes; None when
    they are neither."""
    # safetensors first: its 8-byte little-endian header length may well start with a pickle's bytes
    if len(head) > 8 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    if head.startswith(ZIP_MAGIC) or head.startswith(PICKLE_PROTOCOLS):
        return "pickle"
    return None


def what_it_is_instead(path: str | Path, noun: str = "checkpoint") -> str | None:
    """For a file whose bytes are no model or embedding at all: what it is, in words, with the fix
    (an HTML page, a git-LFS pointer, JSON, text, an empty or unrecognisable file); None for a file
    that starts like a torch or safetensors file. Reads the first kilobyte only."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(1024)
        size = f.seek(0, 2)
    a_noun = ("an " if noun[0] in "aeiou" else "a ") + noun
    if size == 0:
        return f"is empty (0 bytes), not {a_noun}: the download or copy did not finish; get the file again"
    if head.startswith(b"version https://git-lfs"):
        return (f"is a git-LFS pointer ({size} bytes of text), not the {noun} itself: run `git lfs pull` in the "
                "repository it came from, or download the file directly")
    if file_format(head, size) is not None:
        return None
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in text[:512]:
        return (f"is an HTML page ({size} bytes: a login, error or download page saved under this name), not "
                f"{a_noun}: download the file itself (on Hugging Face: the download link, not the file's page)")
    if text.startswith((b"{", b"[")):
        return f"holds JSON text ({_snippet(head)}), not {a_noun}: download the {noun} file itself"
    if _is_text(head):
        return f"is a text file ({size} bytes: {_snippet(head)}), not {a_noun}"
    return (f"is not {a_noun} (its first bytes {head[:8].hex(' ')} are neither a PyTorch zip/pickle nor a "
            "safetensors header): the file is damaged or something else; download it again")


def _is_text(head: bytes) -> bool:
    try:
        decoded = head.decode("utf-8")
    except UnicodeDecodeError:  # possibly cut inside a character at the 1 KiB boundary
        decoded = head[:-3].decode("utf-8", errors="replace")
    return bool(decoded) and sum(c.isprintable() or c in "\r\n\t" for c in decoded) >= 0.95 * len(decoded)


def _snippet(head: bytes, n: int = 40) -> str:
    text = " ".join(head.decode("utf-8", errors="replace").split())
    return "starts " + repr(text[:n] + ("..." if len(text) > n else ""))


# ---- family detection -------------------------------------------------------------------------

_FOREIGN = [  # (key pattern, what the file is) for architectures minti does not load
    (r"(^|\.)joint_blocks\.", "an SD3 model (MMDiT joint_blocks)"),
    (r"(^|\.)double_blocks\.", "a Flux model (double_blocks)"),
    (r"(^|\.)single_transformer_blocks\.|(^|\.)transformer_blocks\.\d+\.attn\.add_q_proj", "an SD3/Flux transformer (diffusers layout)"),
    (r"(^|\.)(effnet_mapper|clip_txt_pooled_mapper|clf)\.", "a Stable Cascade model"),
    (r"(^|\.)(x_embedder|context_embedder)\.", "a DiT-style transformer (SD3/Flux/PixArt)"),
]
_LORA = re.compile(r"(^|[._])lora_|\.lora_(up|down)\.|\.lora_[AB]\.|\.alpha$|^lora_te|hada_w|lokr_")


def detect_family(shapes: dict[str, tuple[int, ...]], path: str | Path) -> str:
    """The family's name (a key of FAMILIES) from single-file key names and shapes, or
    CheckpointError saying what the file looks like instead."""
    if not shapes:
        raise CheckpointError(path, "contains no tensors: not a Stable Diffusion checkpoint")
    keys = list(shapes)
    if _looks_like_embedding(shapes):
        raise CheckpointError(path, EMBEDDING_NOT_MODEL)
    if any(_LORA.search(k) for k in keys):
        raise CheckpointError(path, "looks like a LoRA (lora_* keys), not a full checkpoint: "
                              "minti needs a complete SD 1.x/2.x/XL model file")
    for pattern, what in _FOREIGN:
        if any(re.search(pattern, k) for k in keys):
            raise CheckpointError(path, f"looks like {what}; minti supports SD 1.x, SD 2.x and SDXL base only")
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        raise CheckpointError(path, _what_without_unet(keys))
    if conv_in[1] != 4:
        what = {9: "an inpainting model", 8: "an instruct-pix2pix model", 5: "a depth-conditioned model"}
        raise CheckpointError(path, f"looks like {what.get(conv_in[1], 'a non-txt2img model')} (the UNet takes "
                              f"{conv_in[1]} input channels, not 4); use a txt2img base checkpoint")
    unet = [(k, s) for k, s in shapes.items() if k.startswith(UNET_PREFIX)]
    context = next((s[1] for k, s in unet if k.endswith("attn2.to_k.weight")), None)
    proj_in = next((s for k, s in unet if k.endswith(".proj_in.weight")), None)
    label = shapes.get(UNET_PREFIX + "label_emb.0.0.weight")
    downsamples = sum(1 for k in keys if k.startswith(UNET_PREFIX + "input_blocks.") and k.endswith(".op.weight"))
    if label is not None:
        if context == 1280 or label[1] == 2560 or downsamples != 2:
            raise CheckpointError(path, "looks like the SDXL refiner (label_emb with 4 UNet levels, context 1280); "
                                  "textual inversion needs the SDXL base model")
    elif proj_in is None:
        raise CheckpointError(path, "UNet has no cross-attention transformers: not a text-to-image SD model")
    family = family_with_unet(label_emb=label is not None, linear_proj=proj_in is not None and len(proj_in) == 2)

    def has_text_of(f: Family) -> bool:
        return any(k.startswith(tuple(f.parts[p].prefix for p in f.text_parts)) for k in keys)

    # a file whose text encoder belongs to another family of the same parts is a broken merge, not a model
    for other in FAMILIES.values():
        if other is not family and other.text_parts == family.text_parts and has_text_of(other) \
                and not has_text_of(family):
            raise CheckpointError(path, f"mixes an {family.name} UNet with an {other.name} text encoder; "
                                  "not a standard checkpoint")
    return family.name


EMBEDDING_NOT_MODEL = ("is a textual-inversion embedding, not a model: give it to `sample --embedding` or "
                       "`train --init`, and pass a Stable Diffusion checkpoint as --model")


def _looks_like_embedding(shapes: dict[str, tuple[int, ...]]) -> bool:
    """The layouts of minti.training.embedding: {"emb_params"}, {"clip_l", "clip_g"}, or a single
    [N, dim] tensor named after its token (diffusers' learned_embeds)."""
    keys = set(shapes)
    if keys in ({"emb_params"}, {"clip_l", "clip_g"}):
        return True
    if len(keys) == 1:
        shape = next(iter(shapes.values()))
        return 1 <= len(shape) <= 2 and "." not in next(iter(keys))
    return False


def _what_without_unet(keys: list[str]) -> str:
    def has(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in keys)

    if has("first_stage_model.", "encoder.", "decoder.", "vae.") and not has("cond_stage_model.", "conditioner."):
        return "looks like a VAE-only file (encoder./decoder. keys, no UNet); minti needs a full checkpoint"
    if has("cond_stage_model.", "conditioner.", "text_model.", "transformer.resblocks.", "token_embedding.",
           "embeddings.token_embedding."):
        return "looks like a text-encoder-only file (no UNet keys); minti needs a full checkpoint"
    if has("down_blocks.", "up_blocks.", "mid_block.") and has("conv_in."):
        return ("looks like a single diffusers component file (down_blocks/up_blocks names); "
                "pass the diffusers folder that holds model_index.json")
    return f"no Stable Diffusion UNet keys (model.diffusion_model.*) among its {len(keys)} tensors (first: {keys[0]!r})"


# v-prediction is invisible in the weights. Markers: a `v_pred` key (ComfyUI saves one), or
# the file name: "768" (v2-1_768-ema-pruned, 768-v-ema), "v-pred"/"vpred"/"v_pred"/
# "v-prediction", or a lone "v" word ("sd21_v.safetensors", "model-v.ckpt").
_V_NAME = re.compile(r"768|v[-_ ]?pred|(^|[-_. ])v($|[-_. ])", re.IGNORECASE)


def guess_prediction(family: str, keys: Iterable[str], name: str) -> str:
    """'eps' or 'v' from what a file can tell; only SD 2.x ships both (2.x-base eps, 2.x-768 v)."""
    if any(k == "v_pred" for k in keys):
        return "v"
    if FAMILIES[family].v_size is None:
        return "eps"
    return "v" if _V_NAME.search(Path(name).stem) else "eps"
