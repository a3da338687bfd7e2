"""Reading Stable Diffusion checkpoints: where is each weight, read one tensor at a time.

Three inputs, one key space. Everything downstream sees single-file key names
(`model.diffusion_model.…`, `first_stage_model.…`, `cond_stage_model.…`, `conditioner.embedders.N.…`;
each family's prefixes and diffusers folders are in minti.loading.families):

    .safetensors   safetensors.safe_open: header read at open, tensors memory-mapped one by one
    .ckpt / .pt    torch.load(weights_only=True, mmap=True): a pickle that would run code is refused;
                   pytorch_lightning objects (SD 1.x releases pickle its callbacks) become inert
                   placeholders, as A1111/ComfyUI/Forge load them
    diffusers dir  model_index.json + unet/ vae/ text_encoder/ (text_encoder_2/); names are
                   converted with minti.loading.diffusers_keys.to_single_file and given single-file prefixes

Nothing here materialises a weight until `Checkpoint.read(part, names, …)` is asked for it, so
`minti inspect` reads headers only, and keys nobody needs (EMA copies, DDPM schedule buffers)
are never touched. Which file this is, which family, and what a file that is none looks like
are minti.loading.detect's.
"""
from __future__ import annotations

import json
import pickle
import re
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open

from minti.errors import missing_path
from minti.loading.detect import (EMBEDDING_NOT_MODEL, CheckpointError, detect_family, file_format,
                                  what_it_is_instead)
from minti.loading.diffusers_keys import to_single_file
from minti.loading.families import FAMILIES, UNET_PREFIX

# keys inside a part that minti's modules may not have and never need: buffers that the
# reference code recomputes (position ids, the causal mask) and CLIP's contrastive temperature.
UNUSED_SUFFIXES = ("position_ids", "attn_mask", "logit_scale")

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


# ---- the checkpoint -----------------------------------------------------------------------------

@dataclass
class Checkpoint:
    """An opened checkpoint. shapes/dtypes are in single-file key space; parts maps each part
    ('unet', 'vae', 'text', 'text_2') to {module key: source key}."""

    path: Path
    format: str  # "safetensors" | "pickle" | "diffusers"
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    family: str = ""
    parts: dict[str, dict[str, str]] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    prediction: str | None = None  # what the checkpoint says (diffusers scheduler config), else None
    _reader: object = None

    @property
    def dtype(self) -> torch.dtype:
        """The file's weight dtype: the floating dtype holding most elements."""
        count: Counter = Counter()
        for k, dt in self.dtypes.items():
            if dt.is_floating_point:
                n = 1
                for s in self.shapes[k]:
                    n *= s
                count[dt] += n
        return count.most_common(1)[0][0] if count else torch.float32

    def part_shapes(self, part: str) -> dict[str, tuple[int, ...]]:
        return {name: self.shapes[src] for name, src in self.parts[part].items()}

    def read(self, part: str, names: Iterable[str], dtype: torch.dtype, device: torch.device | str
             ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (module key, tensor) for each name, converted to dtype (floating tensors only)
        and device one at a time, so at most one source tensor is alive beside the model."""
        return self._reader.read(self, part, list(names), dtype, device)

    def mark_unused(self, part: str, name: str) -> None:
        """A part key the module does not have (see UNUSED_SUFFIXES): report it, never read it."""
        self.ignored.append(self.parts[part].pop(name))

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()


def _convert(t: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
    if t.is_floating_point():
        return t.to(device=device, dtype=dtype)
    return t.to(device=device)


class _SafetensorsReader:
    def __init__(self, path: Path):
        if (instead := what_it_is_instead(path)) is not None:  # e.g. a diffusers folder cloned without git-lfs
            raise CheckpointError(path, instead)
        try:
            self.f = safe_open(str(path), framework="pt", device="cpu")
            keys = list(self.f.keys())
            slices = {k: self.f.get_slice(k) for k in keys}
            self.shapes = {k: tuple(s.get_shape()) for k, s in slices.items()}
            self.dtypes = {k: _DTYPES.get(s.get_dtype(), torch.float32) for k, s in slices.items()}
        except Exception as e:  # safetensors raises its own SafetensorError for bad headers/sizes
            raise CheckpointError(path, f"cannot be read as .safetensors ({_short(e)}): the file is truncated or "
                                  "corrupt; download it again") from None
        self.path = path

    def tensor(self, key: str) -> torch.Tensor:
        try:
            return self.f.get_tensor(key)
        except Exception as e:
            raise CheckpointError(self.path, f"tensor {key!r} cannot be read ({_short(e)}); download it again") from None

    def read(self, ckpt: Checkpoint, part, names, dtype, device):
        for name in names:
            yield name, _convert(self.tensor(ckpt.parts[part][name]), dtype, device)

    def close(self):
        self.f = None


def _short(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


# ---- pickles ------------------------------------------------------------------------------------

# Lightning pickles its callbacks into the checkpoints it writes (SD 1.x's original releases and many
# fine-tunes: `callbacks` holds a ModelCheckpoint class as a dict key, or its state). minti needs none
# of it; A1111, ComfyUI and Forge map these names to empty classes, and so do we.
LIGHTNING_MODULES = ("pytorch_lightning.", "lightning.pytorch.", "lightning_fabric.", "lightning.fabric.")


class LightningPlaceholder:
    """Stands in for a pytorch_lightning class or object named in a checkpoint's pickle. Inert: the
    named code is never imported nor called; whatever the pickle hands an instance is dropped."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass


def _lightning_placeholders(path: Path) -> list[tuple[type, str]]:
    """(placeholder class, pickled name) for each Lightning name the pickle refers to, found by
    reading its opcodes without running any; one class per name, so dict keys stay distinct."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # the legacy (non-zip) format or a damaged zip: torch.load will say what is wrong
        return []
    return [(type(name.rsplit(".", 1)[-1], (LightningPlaceholder,), {"__module__": __name__}), name)
            for name in sorted(names) if name.startswith(LIGHTNING_MODULES)]


def torch_load(path: Path) -> dict:
    """torch.load that can never run code: weights_only, memory-mapped, on the CPU. Lightning's
    objects load as inert placeholders; any other name a pickle would import is refused."""
    if (instead := what_it_is_instead(path)) is not None:
        raise CheckpointError(path, instead)
    try:
        with torch.serialization.safe_globals(_lightning_placeholders(path)):
            if path.suffix.lower() == ".safetensors":  # torch.load would go by the name, not the bytes
                with open(path, "rb") as f:
                    obj = torch.load(f, map_location="cpu", weights_only=True)
            else:
                try:
                    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as e:
                    if "mmap" not in str(e):
                        raise
                    # the pre-1.6 (non-zip) torch format cannot be memory-mapped; still weights_only
                    obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"(?:GLOBAL|global|class|function) ([\w.]+)", str(e))
        what = f" (it references {found.group(1)})" if found else ""
        raise CheckpointError(path, f"refusing to load: this pickle would run code when unpickled{what}; "
                              "minti only loads plain tensors. Convert it to .safetensors with a trusted "
                              "tool, or download the .safetensors release") from None
    except (EOFError, zipfile.BadZipFile, RuntimeError, OSError, ValueError, KeyError, IndexError) as e:
        raise CheckpointError(path, f"cannot be read as a PyTorch checkpoint ({_short(e)}): the file is "
                              "truncated or corrupt; download it again") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # Lightning-style wrapper (global_step etc. beside it)
    if not isinstance(obj, dict):
        raise CheckpointError(path, f"holds a {type(obj).__name__}, not a dict of tensors")
    if "string_to_param" in obj:  # A1111's embedding .pt: its tensors sit one dict deeper
        raise CheckpointError(path, EMBEDDING_NOT_MODEL)
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


class _PickleReader:
    def __init__(self, path: Path):
        self.tensors = torch_load(path)  # memory-mapped: nothing is read until used
        self.shapes = {k: tuple(v.shape) for k, v in self.tensors.items()}
        self.dtypes = {k: v.dtype for k, v in self.tensors.items()}

    def read(self, ckpt: Checkpoint, part, names, dtype, device):
        for name in names:
            yield name, _convert(self.tensors[ckpt.parts[part][name]], dtype, device)

    def close(self):
        self.tensors = {}


# ---- single files ------------------------------------------------------------------------------

def _open_single(path: Path, ema: bool) -> Checkpoint:
    # the bytes decide, not the name: a .safetensors file saved as .ckpt (or the reverse) still loads
    with open(path, "rb") as f:
        fmt = file_format(f.read(16), path.stat().st_size)
    if fmt is None:
        raise CheckpointError(path, what_it_is_instead(path))
    if fmt == "safetensors":
        reader = _SafetensorsReader(path)
    else:
        reader = _PickleReader(path)
    return assign_parts(Checkpoint(path, fmt, reader.shapes, reader.dtypes, _reader=reader), ema)


def assign_parts(ckpt: Checkpoint, ema: bool = False) -> Checkpoint:
    """Detect the family of a single file and map its keys to parts (shapes only: tests call
    this on the real layouts' manifests)."""
    path = ckpt.path
    ckpt.family = detect_family(ckpt.shapes, path)
    family = FAMILIES[ckpt.family]
    prefixes = {part: spec.prefix for part, spec in family.parts.items()}
    parts: dict[str, dict[str, str]] = {p: {} for p in prefixes}
    for key in ckpt.shapes:
        part = next((p for p, pre in prefixes.items() if key.startswith(pre)), None)
        if part is None:
            ckpt.ignored.append(key)  # DDPM buffers, model_ema.*, logvar, denoiser.sigmas, v_pred, …
            continue
        name = key[len(prefixes[part]):]
        if family.parts[part].layout == "hf" and not name.startswith("text_model."):
            name = "text_model." + name  # transformers < 4.x saved CLIP-L without the text_model. level
        parts[part][name] = key
    if ema:
        # LitEma stores the UNet as model_ema.<"diffusion_model." + name with the dots removed>
        ema_keys = {n: "model_ema." + ("diffusion_model." + n).replace(".", "") for n in parts["unet"]}
        missing = [k for k in ema_keys.values() if k not in ckpt.shapes]
        if missing:
            raise CheckpointError(path, f"has no EMA UNet weights ({len(missing)} model_ema.* keys missing, e.g. "
                                  f"{missing[0]!r}); load it without ema=True")
        ckpt.ignored = [k for k in ckpt.ignored if k not in set(ema_keys.values())] + list(parts["unet"].values())
        parts["unet"] = ema_keys
    ckpt.parts = {p: m for p, m in parts.items() if m}
    ckpt.prediction = "v" if "v_pred" in ckpt.shapes else None
    return ckpt


# ---- diffusers folders ----------------------------------------------------------------------------

_WEIGHT_NAMES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
                 "text_encoder": "model", "text_encoder_2": "model"}


def _weight_files(folder: Path, component: str, prefer_half: bool) -> list[Path]:
    """The weight file(s) of one component: .safetensors before .bin, the fp16 variant first
    when loading in half precision (half the bytes to read) or when it is the only one."""
    stems = [_WEIGHT_NAMES[component]] + (["pytorch_model"] if component.startswith("text") else [])
    variants = ["fp16.", ""] if prefer_half else ["", "fp16."]
    for ext in ("safetensors", "bin"):
        for variant in variants:
            for stem in stems:
                single = folder / f"{stem}.{variant}{ext}"
                if single.is_file():
                    return [single]
                index = folder / f"{stem}.{variant}{ext}.index.json"
                if index.is_file():  # sharded: {"weight_map": {key: shard file}}
                    weight_map = read_json(index, "the shard index").get("weight_map")
                    if not isinstance(weight_map, dict):
                        raise CheckpointError(index, "has no \"weight_map\" of shard files: the diffusers folder "
                                              "is damaged; download it again")
                    return [folder / s for s in sorted(set(map(str, weight_map.values())))]
    raise CheckpointError(folder, f"has no weights (looked for {stems[0]}[.fp16].safetensors/.bin); "
                          "the diffusers folder is incomplete")


class _DiffusersReader:
    """Per component: source names and readers; converted names come from to_single_file on
    meta tensors (shapes only), the weights from to_single_file on real ones when loading."""

    def __init__(self, root: Path, prefer_half: bool):
        self.root = root
        self.prefer_half = prefer_half
        self.sources: dict[str, dict[str, object]] = {}  # component -> {source key: reader}
        self.layouts: dict[str, str] = {}

    def open_component(self, component: str) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        folder = self.root / component
        info, sources = {}, {}
        for f in _weight_files(folder, component, self.prefer_half):
            if not f.is_file():
                raise CheckpointError(f, "is listed in the shard index but missing; the diffusers folder is incomplete")
            reader = _SafetensorsReader(f) if f.suffix == ".safetensors" else _PickleReader(f)
            for k in reader.shapes:
                info[k] = (reader.dtypes[k], reader.shapes[k])
                sources[k] = reader
        self.sources[component] = sources
        return info

    def convert(self, component: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        kw = {"layout": self.layouts[component]} if component.startswith("text") else {}
        try:
            return to_single_file(component, tensors, **kw)
        except (ValueError, KeyError) as e:
            raise CheckpointError(self.root / component, f"has weights minti cannot map ({_short(e)})") from None

    def read(self, ckpt: Checkpoint, part, names, dtype, device):
        # Renaming may merge tensors (q/k/v -> in_proj), so a component is converted as a whole:
        # every tensor is read and cast one at a time, then renamed; peak = one component in `dtype`.
        spec = FAMILIES[ckpt.family].parts[part]
        component = spec.component
        src = {}
        for k, reader in self.sources[component].items():
            t = reader.tensor(k) if isinstance(reader, _SafetensorsReader) else reader.tensors[k]
            src[k] = _convert(t, dtype, "cpu")
        converted = self.convert(component, src)
        del src
        for name in names:
            t = converted.pop(ckpt.parts[part][name][len(spec.prefix):])
            yield name, t.to(device)

    def close(self):
        self.sources = {}


def read_json(path: Path, what: str) -> dict:
    """A JSON object from a diffusers folder's file, or CheckpointError saying how it is damaged."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        instead = what_it_is_instead(path, noun="JSON file")
        problem = instead if instead and "git-LFS" in instead else f"is not valid JSON ({_short(e)})"
        raise CheckpointError(path, f"{problem}: {what} of the diffusers folder is damaged; download it "
                              "again") from None
    if not isinstance(value, dict):
        raise CheckpointError(path, f"holds a JSON {type(value).__name__}, not an object: {what} of the "
                              "diffusers folder is damaged; download it again")
    return value


def _open_diffusers(root: Path, prefer_half: bool) -> Checkpoint:
    index = read_json(root / "model_index.json", "the pipeline index")
    cls = str(index.get("_class_name", ""))
    if "transformer" in index and "unet" not in index:
        raise CheckpointError(root, f"is a {cls or 'transformer-based'} diffusers pipeline (SD3/Flux-style "
                              "transformer/), not an SD 1.x/2.x/XL UNet pipeline")
    if not (root / "unet").is_dir():
        raise CheckpointError(root, "diffusers folder has no unet/ folder; minti needs the full pipeline")
    if "Inpaint" in cls:
        raise CheckpointError(root, f"is an inpainting pipeline ({cls}); use a txt2img base model")
    reader = _DiffusersReader(root, prefer_half)
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, torch.dtype] = {}

    def add(component: str, prefix: str) -> None:
        info = reader.open_component(component)
        meta = {k: torch.empty(s, dtype=dt, device="meta") for k, (dt, s) in info.items()}
        for k, t in reader.convert(component, meta).items():
            shapes[prefix + k] = tuple(t.shape)
            dtypes[prefix + k] = t.dtype

    add("unet", UNET_PREFIX)
    family = FAMILIES[detect_family(shapes, root)]
    text_components = [family.parts[p].component for p in family.text_parts]
    if len(text_components) > 1 and not all((root / c).is_dir() for c in text_components):
        folders = " and ".join(f"{c}/" for c in text_components)
        raise CheckpointError(root, f"has an {family.label} UNet but not both {folders} (the refiner has only one); "
                              f"use the {family.label} base pipeline")
    parts_of = {"unet": UNET_PREFIX}
    for part, spec in family.parts.items():
        if part != "unet" and (root / spec.component).is_dir():
            if spec.layout is not None:
                reader.layouts[spec.component] = spec.layout
            add(spec.component, spec.prefix)
            parts_of[part] = spec.prefix
    ckpt = Checkpoint(root, "diffusers", shapes, dtypes, family=family.name, _reader=reader)
    ckpt.parts = {p: {k[len(pre):]: k for k in shapes if k.startswith(pre)} for p, pre in parts_of.items()}
    sched = root / "scheduler" / "scheduler_config.json"
    if sched.is_file():
        prediction_type = read_json(sched, "the scheduler config").get("prediction_type")
        ckpt.prediction = {"epsilon": "eps", "v_prediction": "v"}.get(str(prediction_type))
    return ckpt


def open_checkpoint(path: str | Path, ema: bool = False, prefer_half: bool = False) -> Checkpoint:
    """Open a single file or diffusers folder: headers only, no weights read."""
    path = Path(path).expanduser()
    if not path.exists():
        reason = missing_path(path)
        raise CheckpointError(path, "no such file or directory" if reason == "does not exist" else reason)
    try:
        return _open(path, ema, prefer_half)
    except OSError as e:  # unreadable (permissions), or a disk or network mount failing under it
        raise CheckpointError(path, f"cannot be read ({e.strerror or _short(e)}): check the file's "
                              "permissions and the disk") from None


def _open(path: Path, ema: bool, prefer_half: bool) -> Checkpoint:
    if path.is_dir():
        if (path / "model_index.json").is_file():
            if ema:
                raise CheckpointError(path, "diffusers folders hold no separate EMA weights; load without ema=True")
            return _open_diffusers(path, prefer_half)
        found = sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", ".ckpt", ".pt"))
        hint = f"; it contains {', '.join(found[:3])}: pass that file" if found else ""
        raise CheckpointError(path, f"is a directory but not a diffusers model (no model_index.json){hint}")
    if path.suffix.lower() not in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
        raise CheckpointError(path, "unknown file type: expected .safetensors, .ckpt/.pt, or a diffusers folder")
    return _open_single(path, ema)


DDPM_BUFFERS = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                "posterior_mean_coef1", "posterior_mean_coef2"}


def summarize_ignored(keys: list[str]) -> list[str]:
    """Group ignored keys for display: 'DDPM schedule buffers (12 keys)', 'model_ema.* (688 keys)'."""
    groups: Counter = Counter()
    for k in keys:
        if k in DDPM_BUFFERS:
            groups["DDPM schedule buffers"] += 1
        elif k.startswith(("model_ema.", "model.diffusion_model.")):
            groups[k.split(".")[0] + ".*"] += 1
        else:
            groups[k] += 1
    return [f"{g} ({n} keys)" if n > 1 else g for g, n in sorted(groups.items())]
