"""minti.load and StableDiffusion: one loaded checkpoint, ready to encode, denoise, decode.

CONTRACT (the trainer and the CLI build on exactly these names):

    sd = minti.load(path, dtype=torch.float16, device="cuda", prediction=None, ema=False,
                    components=("unet", "vae", "text"), weights=None)
    sd.family            "sd1" | "sd2" | "sdxl"
    sd.family_facts      its row of the family table: minti.loading.families.FAMILIES[sd.family]
    sd.prediction        "eps" | "v";  sd.prediction_guessed: bool
    sd.dtype, sd.device
    sd.weights           None | "fp8": how the UNet's and text encoders' Linear/Conv weights are stored
    sd.unet              minti.models.unet.UNet: sd.unet(z_t, t, context, y=None) -> eps or v
    sd.vae               minti.models.vae.AutoencoderKL (may be None after sd.offload_vae())
    sd.vae_scale         0.18215 (SD 1/2) or 0.13025 (SDXL), from the family table
    sd.default_size      training/sampling resolution: 512, 768 (SD 2.x v models), 1024 (SDXL)
    sd.text_encoders     list of minti.models.clip text encoders (1, or 2 for SDXL: CLIP-L then bigG)
    sd.tokenizers        list of minti.loading.tokenizer.Tokenizer, one per text encoder
    sd.embedding_dims    token-embedding width per encoder: [768] | [1024] | [768, 1280]
    sd.source            Path of the checkpoint file or folder
    sd.add_placeholder(token: str, n_vectors: int) -> None
        registers `token` in every tokenizer; in a prompt it expands to n_vectors new ids
        >= vocab_size whose vectors come from `extra` below.
    sd.tokenize(prompts: list[str]) -> list[LongTensor [B,77]]    one per encoder
    sd.encode_tokens(tokens, extra: list[Tensor [n, dim]] | None = None) -> (context, pooled)
        context [B,77,768|1024|2048]; pooled [B,1280] for a family with pooled conditioning (SDXL) else None.
        Gradients flow into `extra` only.
    sd.encode_text(prompts, extra=None) -> (context, pooled)   = encode_tokens(tokenize(prompts), extra)
    sd.sdxl_vector(pooled, original_size=(H, W), crop=(0, 0), target_size=(H, W)) -> y [B,2816]
    sd.size_condition(pooled, original_size, crop=(0, 0), target_size=None) -> y or None
        the UNet's y: sdxl_vector for a family with size conditioning (SDXL), None for the others
    sd.encode_image(pixels [B,3,H,W] in [-1,1], sample=False, generator=None) -> scaled latents
    sd.decode_latents(z) -> pixels in [-1,1]
    sd.offload_vae() / sd.restore_vae(device)  move the VAE off / back onto the device
    sd.describe() -> dict   family, prediction, prediction_guessed, dtype (the file's), params
                            per part, tokenizers (their source), ignored keys (what `inspect` prints)
    random_model(family, dtype, device, weights=None) -> StableDiffusion   real size, random weights,
                                                              no file (the benchmarks)

Loading never holds two copies of a weight: the modules are built on the `meta` device and each
tensor is read from the memory-mapped file (minti.loading.checkpoint), cast to `dtype`, moved to
`device` and assigned (`load_state_dict(assign=True, strict=True)`). device="meta" reads no weights
at all (inspect). Parameters come back frozen (requires_grad=False) and every module is in eval mode.

weights="fp8": the UNet's and text encoders' Linear/Conv weights are stored as float8 with a scale
per output channel (minti.models.fp8), widened to `dtype` one layer at a time when used. The meta
modules are switched to their fp8 layers before filling, and each weight is quantised as it is
read, so the peak while loading is the fp8 model plus one full-precision tensor. The VAE, norms,
biases and embeddings stay in `dtype`. Never `.to(dtype)` such a module: Module.to widens float8.

Each part's config is its shapes (the models' `from_state_dict`) plus what the weights cannot tell,
from the family table (minti.loading.families): attention heads and upcast, which hidden layer
conditions the UNet, which parts stay fp32. Keys a file may lack or store differently (CLIP's
position_ids, OpenCLIP's logit_scale) are the business of the owning module's load hook.
"""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn

from minti.loading.checkpoint import UNUSED_SUFFIXES, Checkpoint, open_checkpoint, summarize_ignored
from minti.loading.detect import CheckpointError, guess_prediction
from minti.loading.families import FAMILIES, Config, Family
from minti.loading.tokenizer import Tokenizer
from minti.models.clip import build_text_encoder
from minti.models.fp8 import load_per_tensor, use_fp8_weights
from minti.models.unet import UNet, sdxl_conditioning_vector
from minti.models.vae import AutoencoderKL

PARTS = ("unet", "vae", "text")
SDXL_SIZE_EMBEDDINGS = 6 * 256  # original size, crop and target size, 2 numbers each, 256 features per number
_PREDICTIONS = {"eps": "eps", "epsilon": "eps", "v": "v", "v_prediction": "v", "v-prediction": "v"}


def _build(part: str, cfg: Config) -> nn.Module:
    if part == "unet":
        return UNet(cfg)
    if part == "vae":
        return AutoencoderKL(cfg)
    return build_text_encoder(cfg)


# ---- filling a meta module ----------------------------------------------------------------------

def _match(ckpt: Checkpoint, part: str, module: nn.Module) -> list[str]:
    """The names the meta module must read from the checkpoint. Extra keys that minti never needs
    are reported as ignored; anything else missing, unexpected or of another shape is an error.

    The key sets are matched by a dry run of the module's own load_state_dict on meta tensors of
    the file's shapes: the module's load hooks fill and fix what files may lack or store otherwise
    (CLIP's position_ids, OpenCLIP's logit_scale), and what is still off after them is the file's."""
    params, keys = dict(module.named_parameters()), set(module.state_dict())
    available = ckpt.parts[part]
    for name in [n for n in available if n not in keys and n.endswith(UNUSED_SUFFIXES)]:
        ckpt.mark_unused(part, name)
    for name, src in available.items():
        if name in params and tuple(params[name].shape) != ckpt.shapes[src]:
            raise CheckpointError(ckpt.path, f"{src!r} has shape {list(ckpt.shapes[src])}, the {ckpt.family} "
                                  f"{part} inferred from the other keys needs {list(params[name].shape)}")
    probe = {name: torch.empty(ckpt.shapes[src], dtype=ckpt.dtypes[src], device="meta")
             for name, src in available.items()}
    try:
        result = module.load_state_dict(probe, strict=False)  # meta into meta: copies nothing
    except RuntimeError as e:  # a buffer of a shape its module's hook cannot fix
        raise CheckpointError(ckpt.path, f"{part} weights do not match the {ckpt.family} layout: "
                              f"{str(e).splitlines()[-1].strip()}") from None
    missing, unexpected = result.missing_keys, result.unexpected_keys
    if unexpected or missing:
        detail = (f"{len(missing)} missing (e.g. {missing[0]!r})" if missing else "") + \
                 (", " if missing and unexpected else "") + \
                 (f"{len(unexpected)} unexpected (e.g. {available[unexpected[0]]!r})" if unexpected else "")
        raise CheckpointError(ckpt.path, f"{part} weights do not match the {ckpt.family} layout: {detail}")
    return list(available)


def _fill(ckpt: Checkpoint, part: str, module: nn.Module, dtype: torch.dtype, device: torch.device,
          fp8: bool = False) -> None:
    """fp8: the module's fp8 layers quantise their weights one tensor at a time as they are read."""
    names = _match(ckpt, part, module)
    if device.type == "meta":
        return
    if fp8:
        load_per_tensor(module, ckpt.read(part, names, dtype, device))
    else:
        module.load_state_dict(dict(ckpt.read(part, names, dtype, device)), strict=True, assign=True)
    leftover = [n for n, b in module.named_buffers() if b.is_meta]
    if leftover:  # a non-persistent buffer cannot come from the file; the module must not need one
        raise RuntimeError(f"minti bug: {type(module).__name__} buffer {leftover[0]!r} is not in its state dict "
                           "and stays on the meta device after loading")


# ---- the pipeline ------------------------------------------------------------------------------

class StableDiffusion:
    """A loaded checkpoint (see the CONTRACT above). Build it with minti.load."""

    def __init__(self, ckpt: Checkpoint, family: str, prediction: str, prediction_guessed: bool,
                 dtype: torch.dtype, device: torch.device, unet, vae, text_encoders: list, tokenizers: list,
                 weights: str | None = None):
        self.family = family
        self.prediction = prediction
        self.prediction_guessed = prediction_guessed
        self.dtype = dtype
        self.device = device
        self.weights = weights  # None: Linear/Conv weights in dtype; "fp8": stored in 8 bits
        self.unet = unet
        self.vae = vae
        self._vae_home = vae  # the VAE while offloaded (sd.vae is None then)
        self.vae_scale = self.family_facts.vae_scale
        self.text_encoders = text_encoders
        self.tokenizers = tokenizers
        self.source = ckpt.path
        self.file_dtype = ckpt.dtype
        self.format = ckpt.format
        self.ignored_keys = list(ckpt.ignored)
        self._n_extra = 0  # placeholder ids handed out so far (they start at vocab_size)

    @property
    def family_facts(self) -> Family:
        """The family's row of the table (minti.loading.families): what the weights cannot tell."""
        return FAMILIES[self.family]

    @property
    def default_size(self) -> int:
        """The resolution the family's models of this prediction type were trained at."""
        return self.family_facts.default_size(self.prediction)

    # -- text ---------------------------------------------------------------------------------------
    @property
    def embedding_dims(self) -> list[int]:
        return [enc.cfg.width for enc in self.text_encoders]

    @property
    def vocab_size(self) -> int:
        return self.text_encoders[0].cfg.vocab_size if self.text_encoders else 49408

    def add_placeholder(self, token: str, n_vectors: int) -> None:
        """Register `token` in every tokenizer: it expands to n_vectors ids starting at vocab_size
        (after the ids of earlier placeholders), i.e. rows of `extra` in encode_tokens."""
        first = self.vocab_size + self._n_extra
        for tok in self.tokenizers:
            tok.add_placeholder(token, n_vectors, first_id=first)
        self._n_extra += n_vectors

    def tokenize(self, prompts: list[str]) -> list[torch.Tensor]:
        return [tok.encode(prompts).to(self.device) for tok in self.tokenizers]

    def encode_tokens(self, tokens: list[torch.Tensor], extra: list[torch.Tensor] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token ids (one tensor per encoder) -> (context [B,77,D], pooled [B,P] for a family with
        pooled conditioning (SDXL) else None).
        `extra[i]` holds the vectors of the placeholder ids of encoder i; only it gets gradients."""
        if not self.text_encoders:
            raise RuntimeError("this StableDiffusion was loaded without its text encoders (components=)")
        if extra is not None and len(extra) != len(self.text_encoders):
            raise ValueError(f"extra needs one tensor per text encoder ({len(self.text_encoders)}), got {len(extra)}")
        hiddens, pooled = [], None
        for i, (enc, ids) in enumerate(zip(self.text_encoders, tokens)):
            vectors = None if extra is None else extra[i].to(device=self.device, dtype=self.dtype)
            h, p = enc(ids.to(self.device), extra_embeddings=vectors)
            hiddens.append(h)
            pooled = p  # SDXL: the pooled output is bigG's, the last encoder's
        context = hiddens[0] if len(hiddens) == 1 else torch.cat(hiddens, dim=-1)
        return context, (pooled if self.family_facts.pooled_conditioning else None)

    def encode_text(self, prompts: list[str], extra: list[torch.Tensor] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.encode_tokens(self.tokenize(prompts), extra)

    def sdxl_vector(self, pooled: torch.Tensor, original_size: tuple[int, int], crop: tuple[int, int] = (0, 0),
                    target_size: tuple[int, int] | None = None) -> torch.Tensor:
        """SDXL's y: pooled text and the size/crop embeddings -> [B, 2816] (adm_in_channels)."""
        if not self.family_facts.size_conditioning:
            raise ValueError(f"sdxl_vector is for SDXL; this is an {self.family} model (its UNet takes no y)")
        return sdxl_conditioning_vector(pooled, tuple(original_size), tuple(crop),
                                        tuple(target_size if target_size is not None else original_size))

    def size_condition(self, pooled: torch.Tensor | None, original_size: tuple[int, int],
                       crop: tuple[int, int] = (0, 0), target_size: tuple[int, int] | None = None
                       ) -> torch.Tensor | None:
        """The UNet's y for an image of original_size cropped at crop to target_size: SDXL's vector
        (sdxl_vector) for a family with size conditioning, None for a family without (no y)."""
        if not self.family_facts.size_conditioning:
            return None
        return self.sdxl_vector(pooled, original_size, crop, target_size)

    # -- images --------------------------------------------------------------------------------------
    def _need_vae(self):
        if self.vae is None:
            raise RuntimeError("the VAE is offloaded (sd.restore_vae(device)) or was not loaded (components=)")
        return self.vae

    def encode_image(self, pixels: torch.Tensor, sample: bool = False,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels [B,3,H,W] in [-1,1] -> latents times vae_scale (the posterior mean, or a sample)."""
        mean, logvar = self._need_vae().encode(pixels.to(self.device))  # the VAE casts to its own dtype
        z = mean
        if sample:
            gen_device = generator.device if generator is not None else mean.device
            noise = torch.randn(mean.shape, generator=generator, device=gen_device, dtype=torch.float32)
            z = mean + torch.exp(0.5 * logvar) * noise.to(mean.device, mean.dtype)
        return z * self.vae_scale

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        return self._need_vae().decode(z.to(self.device) / self.vae_scale)

    def offload_vae(self) -> None:
        """Move the VAE to the CPU and set sd.vae = None (latents are cached; it is not needed)."""
        if self._vae_home is not None and self.device.type != "meta":  # meta holds no memory anyway
            self._vae_home.to("cpu")
        self.vae = None

    def restore_vae(self, device: torch.device | str | None = None) -> None:
        if self._vae_home is None:
            raise RuntimeError("this StableDiffusion was loaded without its VAE (components=)")
        self.vae = self._vae_home.to(device if device is not None else self.device)

    # -- inspect -------------------------------------------------------------------------------------
    def parts(self) -> dict[str, nn.Module]:
        out = {"unet": self.unet, "vae": self._vae_home}
        facts = self.family_facts
        names = [facts.parts[p].described_as or p for p in facts.text_parts]
        out.update(zip(names, self.text_encoders))
        return {k: m for k, m in out.items() if m is not None}

    def describe(self) -> dict:
        params = {name: sum(p.numel() for p in m.parameters()) for name, m in self.parts().items()}
        return {
            "source": str(self.source),
            "format": self.format,
            "family": self.family,
            "prediction": self.prediction,
            "prediction_guessed": self.prediction_guessed,
            "dtype": str(self.file_dtype).removeprefix("torch."),
            "params": params,
            "params_total": sum(params.values()),
            "vae_scale": self.vae_scale,
            "embedding_dims": self.embedding_dims,
            "tokenizers": [tok.source for tok in self.tokenizers],
            "ignored": summarize_ignored(self.ignored_keys),
            "ignored_keys": sorted(self.ignored_keys),
        }


def _tokenizers(ckpt: Checkpoint, configs: list) -> list:
    out = []
    for folder, cfg in zip(("tokenizer", "tokenizer_2"), configs):
        path = ckpt.path / folder
        if ckpt.format == "diffusers" and (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            try:
                out.append(Tokenizer.from_folder(path, cfg.pad_token_id))
            except (ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError) as e:
                raise CheckpointError(path, f"cannot be read as a CLIP tokenizer ({type(e).__name__}: {e}): "
                                      "vocab.json or merges.txt is damaged; download the folder again") from None
        else:  # single files carry no vocabulary; every SD text encoder uses CLIP's 49408-token BPE
            out.append(Tokenizer.from_openclip_vocab(cfg.pad_token_id))
    return out


def load(path: str | Path, dtype: torch.dtype | None = torch.float16, device: torch.device | str | None = None,
         prediction: str | None = None, ema: bool = False,
         components: tuple[str, ...] = PARTS, weights: str | None = None) -> StableDiffusion:
    """Load an SD 1.x / 2.x / XL checkpoint (.safetensors, .ckpt/.pt, or a diffusers folder).

    dtype: weights are cast to it while loading (None: keep the file's dtype).
    device: default cuda when available, else cpu; "meta" reads shapes only (for inspect).
    prediction: "eps" | "v" to override the guess (the weights cannot tell; see detect.py).
    ema: take the UNet from the file's model_ema.* copy (non-pruned LDM files).
    components: any of "unet", "vae", "text"; skip what you do not need (e.g. after caching latents).
    weights: None keeps every weight in dtype; "fp8" stores the UNet's and text encoders'
        Linear/Conv weights in 8 bits, quantised while loading (see the module docstring).
    """
    unknown = set(components) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown components {sorted(unknown)}: choose from {PARTS}")
    if prediction is not None and prediction not in _PREDICTIONS:
        raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
    _check_weights(weights)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    ckpt = open_checkpoint(path, ema=ema, prefer_half=dtype in (torch.float16, torch.bfloat16))
    return from_checkpoint(ckpt, dtype, device, prediction, components, weights)


def _check_weights(weights: str | None) -> None:
    if weights not in (None, "fp8"):
        raise ValueError(f"weights must be None (the compute dtype) or 'fp8', got {weights!r}")


def _quantizable(part: str, weights: str | None) -> bool:
    """Whether `part` stores its Linear/Conv weights in fp8: the UNet and text encoders, never
    the VAE (it encodes the images once and leaves the device)."""
    return weights == "fp8" and part != "vae"


def from_checkpoint(ckpt: Checkpoint, dtype: torch.dtype | None, device: torch.device,
                    prediction: str | None = None, components: tuple[str, ...] = PARTS,
                    weights: str | None = None) -> StableDiffusion:
    """Build the models of an opened checkpoint (device "meta": from its shapes alone) and close it."""
    _check_weights(weights)
    family = FAMILIES[ckpt.family]
    try:
        dtype = dtype if dtype is not None else ckpt.dtype
        wanted = [p for p in family.parts if ("text" if p.startswith("text") else p) in components]
        # every config first: the parts are checked against each other before any weight is read
        configs = {part: _config(ckpt, part) for part in wanted}
        text_parts = [p for p in family.text_parts if p in configs]
        tokenizers = _tokenizers(ckpt, [configs[p] for p in text_parts])
        check_parts_fit(ckpt, configs, dict(zip(text_parts, tokenizers)))
        modules = {}
        for part in wanted:
            try:
                with torch.device("meta"):
                    module = _build(part, configs[part])
            except (ValueError, KeyError, IndexError, ZeroDivisionError) as e:
                message = f"{part} shapes do not form a valid {family.name} model ({e})"
                raise CheckpointError(ckpt.path, message) from None
            fp8 = _quantizable(part, weights)
            if fp8:
                use_fp8_weights(module)  # still on meta: the layers quantise what _fill hands them
            _fill(ckpt, part, module, family.part_dtype(part, dtype), device, fp8)
            modules[part] = module.eval().requires_grad_(False)
        # everything under the part prefixes that no module took is ignored too (other parts, when
        # components= skips them)
        for part, mapping in ckpt.parts.items():
            if part not in modules:
                ckpt.ignored.extend(mapping.values())
    finally:
        ckpt.close()

    if prediction is not None:
        pred, guessed = _PREDICTIONS[prediction], False
    elif ckpt.prediction is not None:  # v_pred marker key, diffusers scheduler_config.json
        pred, guessed = ckpt.prediction, False
    else:  # only a family with both kinds of release has to guess, and only from the name
        pred, guessed = guess_prediction(family.name, ckpt.shapes, ckpt.path.name), family.v_size is not None
    return StableDiffusion(
        ckpt, family.name, pred, guessed, dtype, device, modules.get("unet"), modules.get("vae"),
        [modules[p] for p in text_parts], tokenizers, weights)


def _config(ckpt: Checkpoint, part: str) -> Config:
    """The config of one part from its shapes, or CheckpointError naming what is missing."""
    family = FAMILIES[ckpt.family]
    if part not in ckpt.parts:
        what = {"vae": "VAE (first_stage_model.*)", "unet": "UNet"}.get(part, "text encoder")
        raise CheckpointError(ckpt.path, f"has no {what} weights; load it with components= without "
                              f"{'text' if part.startswith('text') else part!r}, or use a full checkpoint")
    try:
        return family.config(part, ckpt.part_shapes(part), ckpt.format)
    except KeyError as e:  # a tensor the config is read from
        raise CheckpointError(ckpt.path, f"has no {family.parts[part].prefix}{e.args[0]} tensor, which the "
                              f"{family.name} {part} is built from: the file is incomplete or not a standard "
                              "checkpoint") from None
    except (ValueError, IndexError, ZeroDivisionError) as e:
        raise CheckpointError(ckpt.path, f"{part} shapes do not form a valid {family.name} model ({e})") from None


def check_parts_fit(ckpt: Checkpoint, configs: dict, tokenizers: dict) -> None:
    """What training and sampling index, checked when loading (also by inspect, on the meta device):
    each part can be built from its own shapes, yet together they may not fit (a text encoder cut
    to another vocabulary, a UNet merged with another model's text encoder). CheckpointError names
    the key and what was expected."""
    family = FAMILIES[ckpt.family]

    def key(part: str, suffix: str) -> str:
        return next((src for name, src in ckpt.parts[part].items() if name.endswith(suffix)),
                    family.parts[part].prefix + suffix)

    for part, tok in tokenizers.items():
        cfg = configs[part]
        if cfg.vocab_size < tok.vocab_size:  # more rows (tokens a tool added) go unused; fewer cannot be indexed
            raise CheckpointError(ckpt.path, f"{key(part, 'token_embedding.weight')} has {cfg.vocab_size} rows, but "
                                  f"the CLIP tokenizer of every SD text encoder has {tok.vocab_size} tokens: the text "
                                  "encoder is cut or from another model; use a complete checkpoint")
        if cfg.max_length < tok.context_length:
            suffix = "position_embedding.weight" if cfg.layout == "hf" else "positional_embedding"
            raise CheckpointError(ckpt.path, f"{key(part, suffix)} has {cfg.max_length} positions; SD prompts are "
                                  f"{tok.context_length} tokens: the text encoder is cut; use a complete checkpoint")
    if "unet" not in configs or len(tokenizers) != len(family.text_parts):
        return
    unet = configs["unet"]
    text_width = sum(configs[p].width for p in family.text_parts)
    if unet.context_dim != text_width:
        raise CheckpointError(ckpt.path, f"the UNet's cross-attention takes {unet.context_dim}-wide text "
                              f"({key('unet', 'attn2.to_k.weight')}) but the text encoder gives {text_width}: the "
                              "UNet and the text encoder come from different models")
    if unet.adm_in_channels is not None:  # SDXL: y = bigG's pooled projection + 6 size/crop embeddings
        pooled_part = family.text_parts[-1]
        projection = configs[pooled_part].projection_dim
        if projection is None:
            raise CheckpointError(ckpt.path, f"has no {key(pooled_part, 'text_projection')}: SDXL's UNet is "
                                  "conditioned on the text encoder's pooled projection; use a complete checkpoint")
        if unet.adm_in_channels != projection + SDXL_SIZE_EMBEDDINGS:
            raise CheckpointError(ckpt.path, f"{key('unet', 'label_emb.0.0.weight')} takes {unet.adm_in_channels} "
                                  f"inputs, but the pooled text ({projection}) and the size/crop embeddings "
                                  f"({SDXL_SIZE_EMBEDDINGS}) make {projection + SDXL_SIZE_EMBEDDINGS}: the UNet and "
                                  "the text encoder come from different models")


# ---- real-size models without a checkpoint (benchmarks) ----------------------------------------

def random_model(family: str, dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu",
                 prediction: str | None = None, seed: int = 0, weights: str | None = None) -> StableDiffusion:
    """A real-size model of `family` (the table's presets) with random weights and no file: what
    the benchmarks run (memory and speed do not depend on the values). device="meta" allocates
    nothing. Without `prediction`, a family that ships v models (SD 2.x) gets v. weights="fp8" as
    in load (quantised from the random full-precision weights, one part at a time)."""
    _check_weights(weights)
    spec = FAMILIES[family]
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for part, p in spec.parts.items():
        with torch.device("meta"):
            module = _build(part, p.preset)
        if device.type != "meta":
            module = module.to_empty(device=device)
            _random_init(module, generator)
        module = module.to(dtype)  # before use_fp8_weights: Module.to would widen fp8 weights again
        if _quantizable(part, weights):
            use_fp8_weights(module)
        modules[part] = module.eval().requires_grad_(False)
    fake = SimpleNamespace(path=Path(f"<random {family}>"), dtype=dtype, format="random", ignored=[])
    text = [modules[p] for p in spec.text_parts]
    tokenizers = [Tokenizer.from_openclip_vocab(enc.cfg.pad_token_id) for enc in text]
    pred = prediction or ("v" if spec.v_size else "eps")
    return StableDiffusion(fake, family, pred, prediction is None, dtype, device, modules["unet"], modules["vae"],
                           text, tokenizers, weights)


@torch.no_grad()
def _random_init(module: nn.Module, generator: torch.Generator) -> None:
    """Weights ~ N(0, 1/fan_in) (activations stay O(1), so fp16 does not overflow), norms 1,
    biases 0, integer buffers (position ids) 0..n-1. Drawn on the CPU for reproducibility."""
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if not t.is_floating_point():
            t.copy_(torch.arange(t.shape[-1]).expand(t.shape))
        elif t.ndim >= 2:
            fan_in = t[0].numel()
            t.copy_(torch.randn(t.shape, generator=generator) / math.sqrt(fan_in))
        elif name.endswith("weight"):
            t.fill_(1.0)
        else:
            t.zero_()
