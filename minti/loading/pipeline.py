"""minti.load and StableDiffusion: one loaded checkpoint, ready to encode, denoise, decode.

CONTRACT (the trainer and the CLI build on exactly these names):

    sd = minti.load(path, dtype=torch.float16, device="cuda", prediction=None, ema=False,
                    components=("unet", "vae", "text"))
    sd.family            "sd1" | "sd2" | "sdxl"
    sd.prediction        "eps" | "v";  sd.prediction_guessed: bool
    sd.dtype, sd.device
    sd.unet              minti.models.unet.UNet: sd.unet(z_t, t, context, y=None) -> eps or v
    sd.vae               minti.models.vae.AutoencoderKL (may be None after sd.offload_vae())
    sd.vae_scale         0.18215 (SD 1/2) or 0.13025 (SDXL)
    sd.text_encoders     list of text-encoder modules (1, or 2 for SDXL: CLIP-L then bigG)
    sd.tokenizers        list of minti.loading.tokenizer.Tokenizer, one per text encoder
    sd.embedding_dims    token-embedding width per encoder: [768] | [1024] | [768, 1280]
    sd.source            Path of the checkpoint file or folder
    sd.add_placeholder(token: str, n_vectors: int) -> None
        registers `token` in every tokenizer; in a prompt it expands to n_vectors new ids
        >= vocab_size whose vectors come from `extra` below.
    sd.tokenize(prompts: list[str]) -> list[LongTensor [B,77]]    one per encoder
    sd.encode_tokens(tokens, extra: list[Tensor [n, dim]] | None = None) -> (context, pooled)
        context [B,77,768|1024|2048]; pooled [B,1280] for sdxl else None.
        Gradients flow into `extra` only.
    sd.encode_text(prompts, extra=None) -> (context, pooled)   = encode_tokens(tokenize(prompts), extra)
    sd.sdxl_vector(pooled, original_size=(H, W), crop=(0, 0), target_size=(H, W)) -> y [B,2816]
    sd.encode_image(pixels [B,3,H,W] in [-1,1], sample=False, generator=None) -> scaled latents
    sd.decode_latents(z) -> pixels in [-1,1]
    sd.offload_vae() / sd.restore_vae(device)  move the VAE off / back onto the device
    sd.describe() -> dict   family, prediction, prediction_guessed, dtype (the file's), params
                            per part, tokenizers (their source), ignored keys (what `inspect` prints)

Loading never holds two copies of a weight: the modules are built on the `meta` device and each
tensor is read from the memory-mapped file, cast to `dtype`, moved to `device` and assigned
(`load_state_dict(assign=True, strict=True)`). device="meta" reads no weights at all (inspect).
Parameters come back frozen (requires_grad=False) and every module is in eval mode.

Unit details that the weights cannot tell are set per family (see `_unet_config`,
`_text_config`): SD 1.x 8 heads, SD 2.x/XL head width 64 (narrower test models: one head of
the model width), SD 2.x attention upcast, which hidden layer conditions the UNet.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
import torch.nn as nn

from minti.loading.checkpoint import UNUSED_SUFFIXES, Checkpoint, CheckpointError, guess_prediction, open_checkpoint

VAE_SCALE = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}
PARTS = ("unet", "vae", "text")
# module keys a file may lack: recomputable buffers and CLIP's unused temperature
FILLABLE = ("position_ids", "logit_scale")
_PREDICTIONS = {"eps": "eps", "epsilon": "eps", "v": "v", "v_prediction": "v", "v-prediction": "v"}


# ---- configs from shapes + family ---------------------------------------------------------------

def _unet_config(shapes: dict, family: str):
    from minti.models.unet import UNetConfig

    cfg = UNetConfig.from_state_dict(shapes)
    if family == "sd1":  # fixed head count; head width 40/80/160 at full size
        return dataclasses.replace(cfg, num_heads=8, head_dim=None, upcast_attention=False)
    # fixed head width 64; a narrower (test) model gets one head of its full width at level 0
    head_dim = min(64, cfg.model_channels)
    return dataclasses.replace(cfg, head_dim=head_dim, upcast_attention=family == "sd2")


def _vae_config(shapes: dict, family: str):
    from minti.models.vae import VAEConfig

    return dataclasses.replace(VAEConfig.from_state_dict(shapes), scaling_factor=VAE_SCALE[family])


def _text_config(shapes: dict, family: str, part: str, fmt: str):
    from minti.models import clip
    from minti.loading.checkpoint import TEXT_LAYOUT

    layout = TEXT_LAYOUT[(family, part)]
    preset = {("sd1", "text"): clip.CLIP_L_SD1, ("sd2", "text"): clip.OPENCLIP_H_SD2,
              ("sdxl", "text"): clip.CLIP_L_SDXL, ("sdxl", "text_2"): clip.OPENCLIP_BIGG_SDXL}[(family, part)]
    cfg = clip.TextEncoderConfig.from_state_dict(shapes, layout)
    # activation, hidden layer and padding are conventions, not shapes: take them from the preset.
    # Heads: 64-wide in every CLIP tower (12 / 16 / 20); a narrower test tower gets one head.
    cfg = dataclasses.replace(cfg, activation=preset.activation, layer=preset.layer, final_norm=preset.final_norm,
                              pooled=preset.pooled,
                              pad_token_id=preset.pad_token_id, heads=max(1, cfg.width // 64))
    if family == "sd2" and fmt == "diffusers":
        # diffusers ships SD 2.x's OpenCLIP-H with its last block already removed (23 of 24):
        # its last hidden state is the single file's penultimate one
        cfg = dataclasses.replace(cfg, layer="last")
    return cfg


def _build(part: str, cfg) -> nn.Module:
    if part == "unet":
        from minti.models.unet import UNet

        return UNet(cfg)
    if part == "vae":
        from minti.models.vae import AutoencoderKL

        return AutoencoderKL(cfg)
    from minti.models.clip import build_text_encoder

    return build_text_encoder(cfg)


# ---- filling a meta module ----------------------------------------------------------------------

def _plan(ckpt: Checkpoint, part: str, module: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Match the module's state-dict keys with the checkpoint's: returns the meta tensors the
    module expects and the names it must read. Extra keys that minti never needs are reported as
    ignored; anything else missing, unexpected or of another shape is an error."""
    expected = module.state_dict()
    available = ckpt.parts[part]
    for name in [n for n in available if n not in expected]:
        if name.endswith(UNUSED_SUFFIXES):
            ckpt.mark_unused(part, name)
    unexpected = [n for n in available if n not in expected]
    missing = [n for n in expected if n not in available and not n.endswith(FILLABLE)]
    if unexpected or missing:
        detail = (f"{len(missing)} missing (e.g. {missing[0]!r})" if missing else "") + \
                 (", " if missing and unexpected else "") + \
                 (f"{len(unexpected)} unexpected (e.g. {available[unexpected[0]]!r})" if unexpected else "")
        raise CheckpointError(ckpt.path, f"{part} weights do not match the {ckpt.family} layout: {detail}")
    for name, src in available.items():
        want, got = tuple(expected[name].shape), ckpt.shapes[src]
        if want != got and not name.endswith("position_ids"):
            raise CheckpointError(ckpt.path, f"{src!r} has shape {list(got)}, the {ckpt.family} {part} "
                                  f"inferred from the other keys needs {list(want)}")
    return expected, list(available)


def _fill(ckpt: Checkpoint, part: str, module: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    expected, names = _plan(ckpt, part, module)
    if device.type == "meta":
        return
    state: dict[str, torch.Tensor] = {}
    for name, t in ckpt.read(part, names, dtype, device):
        want = expected[name]
        if not want.is_floating_point():  # position_ids: int64 buffer; some files store floats
            t = t.round().to(want.dtype) if t.is_floating_point() else t.to(want.dtype)
            t = t.reshape(want.shape)
        state[name] = t
    for name, want in expected.items():
        if name in state:
            continue
        if name.endswith("position_ids"):  # dropped by newer exporters: they are just 0..76
            state[name] = torch.arange(want.shape[-1], device=device).expand(want.shape).to(want.dtype).clone()
        else:  # logit_scale (diffusers never exports it; unused for text): open_clip's initial value
            state[name] = torch.full(want.shape, math.log(1 / 0.07), device=device, dtype=dtype)
    module.load_state_dict(state, strict=True, assign=True)
    leftover = [n for n, b in module.named_buffers() if b.is_meta]
    if leftover:  # a non-persistent buffer cannot come from the file; the module must not need one
        raise RuntimeError(f"minti bug: {type(module).__name__} buffer {leftover[0]!r} is not in its state dict "
                           "and stays on the meta device after loading")


# ---- the pipeline ------------------------------------------------------------------------------

class StableDiffusion:
    """A loaded checkpoint (see the CONTRACT above). Build it with minti.load."""

    def __init__(self, ckpt: Checkpoint, family: str, prediction: str, prediction_guessed: bool,
                 dtype: torch.dtype, device: torch.device, unet, vae, text_encoders: list, tokenizers: list):
        self.family = family
        self.prediction = prediction
        self.prediction_guessed = prediction_guessed
        self.dtype = dtype
        self.device = device
        self.unet = unet
        self.vae = vae
        self._vae_home = vae  # the VAE while offloaded (sd.vae is None then)
        self.vae_scale = VAE_SCALE[family]
        self.text_encoders = text_encoders
        self.tokenizers = tokenizers
        self.source = ckpt.path
        self.file_dtype = ckpt.dtype
        self.format = ckpt.format
        self.ignored_keys = list(ckpt.ignored)
        self._n_extra = 0  # placeholder ids handed out so far (they start at vocab_size)

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
        """Token ids (one tensor per encoder) -> (context [B,77,D], pooled [B,P] for SDXL else None).
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
        return context, (pooled if self.family == "sdxl" else None)

    def encode_text(self, prompts: list[str], extra: list[torch.Tensor] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.encode_tokens(self.tokenize(prompts), extra)

    def sdxl_vector(self, pooled: torch.Tensor, original_size: tuple[int, int], crop: tuple[int, int] = (0, 0),
                    target_size: tuple[int, int] | None = None) -> torch.Tensor:
        """SDXL's y: pooled text and the size/crop embeddings -> [B, 2816] (adm_in_channels)."""
        from minti.models.unet import sdxl_conditioning_vector

        if self.family != "sdxl":
            raise ValueError(f"sdxl_vector is for SDXL; this is an {self.family} model (its UNet takes no y)")
        return sdxl_conditioning_vector(pooled, tuple(original_size), tuple(crop),
                                        tuple(target_size if target_size is not None else original_size))

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
        names = ["text"] if len(self.text_encoders) == 1 else ["text_clip_l", "text_openclip_bigg"]
        out.update(zip(names, self.text_encoders))
        return {k: m for k, m in out.items() if m is not None}

    def describe(self) -> dict:
        from minti.loading.checkpoint import summarize_ignored

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
    from minti.loading.tokenizer import Tokenizer

    out = []
    for folder, cfg in zip(("tokenizer", "tokenizer_2"), configs):
        path = ckpt.path / folder
        if ckpt.format == "diffusers" and (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            out.append(Tokenizer.from_folder(path, cfg.pad_token_id))
        else:  # single files carry no vocabulary; every SD text encoder uses CLIP's 49408-token BPE
            out.append(Tokenizer.from_openclip_vocab(cfg.pad_token_id))
    return out


def load(path: str | Path, dtype: torch.dtype | None = torch.float16, device: torch.device | str | None = None,
         prediction: str | None = None, ema: bool = False,
         components: tuple[str, ...] = PARTS) -> StableDiffusion:
    """Load an SD 1.x / 2.x / XL checkpoint (.safetensors, .ckpt/.pt, or a diffusers folder).

    dtype: weights are cast to it while loading (None: keep the file's dtype).
    device: default cuda when available, else cpu; "meta" reads shapes only (for inspect).
    prediction: "eps" | "v" to override the guess (the weights cannot tell; see checkpoint.py).
    ema: take the UNet from the file's model_ema.* copy (non-pruned LDM files).
    components: any of "unet", "vae", "text"; skip what you do not need (e.g. after caching latents).
    """
    unknown = set(components) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown components {sorted(unknown)}: choose from {PARTS}")
    if prediction is not None and prediction not in _PREDICTIONS:
        raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    ckpt = open_checkpoint(path, ema=ema, prefer_half=dtype in (torch.float16, torch.bfloat16))
    return from_checkpoint(ckpt, dtype, device, prediction, components)


def from_checkpoint(ckpt: Checkpoint, dtype: torch.dtype | None, device: torch.device,
                    prediction: str | None = None, components: tuple[str, ...] = PARTS) -> StableDiffusion:
    """Build the models of an opened checkpoint (device "meta": from its shapes alone) and close it."""
    try:
        dtype = dtype if dtype is not None else ckpt.dtype
        family = ckpt.family
        wanted = [p for p in ckpt_parts(family) if (p if not p.startswith("text") else "text") in components]
        for part in wanted:
            if part not in ckpt.parts:
                what = {"vae": "VAE (first_stage_model.*)", "unet": "UNet"}.get(part, "text encoder")
                raise CheckpointError(ckpt.path, f"has no {what} weights; load it with components= without "
                                      f"{'text' if part.startswith('text') else part!r}, or use a full checkpoint")
        modules: dict[str, nn.Module] = {}
        configs = {}
        for part in wanted:
            shapes = ckpt.part_shapes(part)
            if part == "unet":
                cfg = _unet_config(shapes, family)
            elif part == "vae":
                cfg = _vae_config(shapes, family)
            else:
                cfg = _text_config(shapes, family, part, ckpt.format)
            configs[part] = cfg
            try:
                with torch.device("meta"):
                    module = _build(part, cfg)
            except (ValueError, KeyError, IndexError, ZeroDivisionError) as e:
                raise CheckpointError(ckpt.path, f"{part} shapes do not form a valid {family} model ({e})") from None
            _fill(ckpt, part, module, _part_dtype(part, family, dtype), device)
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
    else:
        # SD 1.x and SDXL base are eps models; only SD 2.x comes in both, and only by name
        pred, guessed = guess_prediction(family, ckpt.shapes, ckpt.path.name), family == "sd2"
    text_parts = [p for p in ("text", "text_2") if p in modules]
    return StableDiffusion(
        ckpt, family, pred, guessed, dtype, device, modules.get("unet"), modules.get("vae"),
        [modules[p] for p in text_parts], _tokenizers(ckpt, [configs[p] for p in text_parts]))


def _part_dtype(part: str, family: str, dtype: torch.dtype) -> torch.dtype:
    """SDXL's VAE overflows in fp16 (NaN latents and images; diffusers upcasts it too): keep it
    in fp32. It encodes the training images once and then leaves the device, so this costs
    no training memory."""
    if part == "vae" and family == "sdxl" and dtype == torch.float16:
        return torch.float32
    return dtype


def ckpt_parts(family: str) -> list[str]:
    from minti.loading.checkpoint import PREFIXES

    return list(PREFIXES[family])


# ---- real-size models without a checkpoint (benchmarks) ----------------------------------------

_PRESETS = {  # family -> (unet, vae, text encoders) preset names
    "sd1": ("SD1", "SD", ("CLIP_L_SD1",)),
    "sd2": ("SD2", "SD", ("OPENCLIP_H_SD2",)),
    "sdxl": ("SDXL", "SDXL", ("CLIP_L_SDXL", "OPENCLIP_BIGG_SDXL")),
}


def random_model(family: str, dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu",
                 prediction: str | None = None, seed: int = 0) -> StableDiffusion:
    """A real-size model of `family` with random weights and no file: what the benchmarks run
    (memory and speed do not depend on the values). device="meta" allocates nothing."""
    from types import SimpleNamespace

    from minti.models import clip
    from minti.models import unet
    from minti.models import vae

    unet_name, vae_name, text_names = _PRESETS[family]
    configs = {"unet": getattr(unet, unet_name), "vae": getattr(vae, vae_name)}
    configs.update({f"text{'_2' if i else ''}": getattr(clip, n) for i, n in enumerate(text_names)})
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for part, cfg in configs.items():
        with torch.device("meta"):
            module = _build(part, cfg)
        if device.type != "meta":
            module = module.to_empty(device=device)
            _random_init(module, generator)
        modules[part] = module.to(dtype).eval().requires_grad_(False)
    fake = SimpleNamespace(path=Path(f"<random {family}>"), dtype=dtype, format="random", ignored=[])
    text = [modules[p] for p in ("text", "text_2") if p in modules]
    tokenizers = [_openclip_tokenizer(enc.cfg.pad_token_id) for enc in text]
    pred = prediction or ("v" if family == "sd2" else "eps")
    return StableDiffusion(fake, family, pred, prediction is None, dtype, device, modules["unet"], modules["vae"],
                           text, tokenizers)


def _openclip_tokenizer(pad_token_id: int):
    from minti.loading.tokenizer import Tokenizer

    return Tokenizer.from_openclip_vocab(pad_token_id)


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
