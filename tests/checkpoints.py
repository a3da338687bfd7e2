"""Small random-weight Stable Diffusion checkpoints in the REAL layouts, for tests.

    from checkpoints import make_single_file, make_diffusers_folder
    path = make_single_file(tmp_path, "sd1")                  # .safetensors, fp32, ~11 MB
    path = make_single_file(tmp_path, "sdxl", dtype=torch.float16, fmt="ckpt", ema=True)
    folder = make_diffusers_folder(tmp_path, "sd2")          # needs diffusers + transformers
    sd = minti.load(path, dtype=torch.float32, device="cpu")

Single files have exactly the key NAMES of the real SD 1.5 / SD 2.1 / SDXL-base files
(tests/layouts/{sd15,sd21,sdxl}.tsv; checked on every write) with narrow widths: UNet 32/64/96
channels, VAE 32/64/96/96, every text tower 32 wide with the real depth (12 / 24 / 32 blocks)
and the real 49408-token vocabulary, so the real tokenizer works. Weights are random but
deterministic (seed), scaled so activations stay O(1) through the deep stacks.

Narrow ≠ real in widths only: head counts follow minti's rule for narrow models (SD 1.x 8 heads;
SD 2.x/XL and CLIP towers min(64, width)-wide heads; minti.loading.families), context = text width
(SDXL: 32 + 32 = 64), SDXL adm = 32 pooled + 6 x 256 = 1568. narrow_configs spells out the configs
the loader must infer (tests/loading/test_families.py holds it to that).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from minti.loading.families import FAMILIES
from minti.models.clip import TextEncoderConfig, build_text_encoder
from minti.models.unet import UNet, UNetConfig
from minti.models.vae import AutoencoderKL, VAEConfig
from layouts import read_layout

W = 32  # base width of every narrow model
MANIFEST = {"sd1": "sd15", "sd2": "sd21", "sdxl": "sdxl"}
DDPM_BUFFERS = ("alphas_cumprod", "alphas_cumprod_prev", "betas", "log_one_minus_alphas_cumprod",
                "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
                "posterior_variance", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
                "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod")


def narrow_configs(family: str) -> dict[str, object]:
    """The minti configs of the narrow model: {"unet", "vae", "text"[, "text_2"]}."""
    clip_l = TextEncoderConfig(width=W, heads=1)
    if family == "sd1":
        return dict(unet=UNetConfig(model_channels=W, channel_mult=(1, 2, 3, 3), context_dim=W, num_heads=8),
                    vae=VAEConfig(ch=W, ch_mult=(1, 2, 3, 3)), text=clip_l)
    if family == "sd2":
        return dict(unet=UNetConfig(model_channels=W, channel_mult=(1, 2, 3, 3), context_dim=W, head_dim=W,
                                    use_linear_proj=True, upcast_attention=True),
                    vae=VAEConfig(ch=W, ch_mult=(1, 2, 3, 3)),
                    text=TextEncoderConfig(layout="openclip", width=W, layers=24, heads=1, activation="gelu",
                                           projection_dim=W, layer="penultimate", pad_token_id=0, pooled=False))
    if family == "sdxl":
        return dict(unet=UNetConfig(model_channels=W, channel_mult=(1, 2, 3), transformer_depth=(0, 2, 10),
                                    transformer_depth_middle=10, head_dim=W, context_dim=2 * W,
                                    use_linear_proj=True, adm_in_channels=W + 6 * 256),
                    vae=VAEConfig(ch=W, ch_mult=(1, 2, 3, 3)),
                    text=TextEncoderConfig(width=W, heads=1, layer="penultimate", final_norm=False),
                    text_2=TextEncoderConfig(layout="openclip", width=W, layers=32, heads=1, activation="gelu",
                                             projection_dim=W, layer="penultimate", final_norm=False,
                                             pad_token_id=0))
    raise ValueError(f"unknown family {family!r}: sd1, sd2 or sdxl")


def _randomize(sd: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    out = {}
    for k, t in sd.items():
        if not t.is_floating_point():
            out[k] = t.clone()
        elif t.ndim == 0:  # logit_scale
            out[k] = torch.tensor(math.log(1 / 0.07))
        elif t.ndim == 1:  # norm scales near 1, biases near 0
            base = 1.0 if k.endswith("weight") else 0.0
            out[k] = base + 0.1 * torch.randn(t.shape, generator=gen)
        else:
            fan_in = t[0].numel() if k != "text_projection" and "embedding" not in k else t.shape[-1]
            out[k] = torch.randn(t.shape, generator=gen) / math.sqrt(fan_in)
    return out


def make_state_dict(family: str, seed: int = 0, ema: bool = False, position_ids: str | None = "int",
                    legacy_clip_names: bool = False, ddpm_buffers: bool | None = None) -> dict[str, torch.Tensor]:
    """fp32 single-file state dict (real key names, narrow shapes, random weights).

    ema: add model_ema.* (LitEma: dots removed) with DIFFERENT values, plus decay/num_updates.
    position_ids: "int" (as real files), "float" (as some merges), "flat" (no batch dimension), None (dropped).
    legacy_clip_names: CLIP-L keys without `text_model.` (very old transformers).
    ddpm_buffers: the 12 schedule buffers (default: as the real file, i.e. sd1/sd2 only)."""
    gen = torch.Generator().manual_seed(seed)
    cfgs = narrow_configs(family)
    prefixes = {part: spec.prefix for part, spec in FAMILIES[family].parts.items()}
    out: dict[str, torch.Tensor] = {}
    for part, cfg in cfgs.items():
        module = UNet(cfg) if part == "unet" else AutoencoderKL(cfg) if part == "vae" else build_text_encoder(cfg)
        for k, t in _randomize(module.state_dict(), gen).items():
            out[prefixes[part] + k] = t
    for k in [k for k in out if k.endswith("position_ids")]:
        if position_ids is None:
            del out[k]
        elif position_ids == "float":
            out[k] = out[k].float()
        elif position_ids == "flat":
            out[k] = out[k].flatten()
    if legacy_clip_names:
        for pre in [p for part, p in prefixes.items() if part.startswith("text") and p.endswith("transformer.")]:
            for k in [k for k in out if k.startswith(pre + "text_model.")]:
                out[pre + k[len(pre + "text_model."):]] = out.pop(k)
    if ddpm_buffers if ddpm_buffers is not None else family != "sdxl":
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        for i, name in enumerate(DDPM_BUFFERS):
            out[name] = (betas * (i + 1)).float()  # values are never read; shapes as real
    if ema:
        for k in [k for k in out if k.startswith(prefixes["unet"])]:
            flat = "model_ema." + k[len("model."):].replace(".", "")
            out[flat] = out[k] + 0.5 * torch.randn(out[k].shape, generator=gen)
        out["model_ema.decay"] = torch.tensor(0.9999)
        out["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    return out


def check_real_names(family: str, state_dict: dict[str, torch.Tensor]) -> None:
    """The default narrow file must carry exactly the real file's key names."""
    real = set(read_layout(MANIFEST[family]))
    ours = set(state_dict)
    if real != ours:
        raise AssertionError(f"narrow {family} keys differ from the real layout: missing {sorted(real - ours)[:5]}, "
                             f"extra {sorted(ours - real)[:5]}")


def write_single_file(path: Path, state_dict: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                      fmt: str | None = None) -> Path:
    """Write a state dict as .safetensors, or as .ckpt with the {"state_dict": …} wrapper."""
    sd = {k: (v.to(dtype) if v.is_floating_point() and v.ndim > 0 and not k.startswith(DDPM_BUFFERS) else v)
          .contiguous() for k, v in state_dict.items()}
    fmt = fmt or path.suffix.lstrip(".")
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    elif fmt in ("ckpt", "pt"):
        torch.save({"state_dict": sd, "global_step": 470000, "epoch": 6}, path)
    else:
        raise ValueError(f"fmt must be safetensors or ckpt, got {fmt!r}")
    return path


def make_single_file(tmp_path: Path, family: str, dtype: torch.dtype = torch.float32, fmt: str = "safetensors",
                     name: str | None = None, seed: int = 0, ema: bool = False, position_ids: str | None = "int",
                     legacy_clip_names: bool = False, extra: dict[str, torch.Tensor] | None = None,
                     drop: tuple[str, ...] = ()) -> Path:
    """Write a narrow random single-file checkpoint of `family` and return its path.

    dtype: the weights' dtype in the file (fp32/fp16/bf16). fmt: "safetensors" | "ckpt".
    name: file name (default "<family>.<fmt>"; SD 2.x prediction is guessed from names).
    extra: more keys (e.g. {"v_pred": torch.tensor([])}); drop: key prefixes to leave out.
    The same seed gives the same weights in every dtype and format."""
    sd = make_state_dict(family, seed=seed, ema=ema, position_ids=position_ids, legacy_clip_names=legacy_clip_names)
    if not (ema or legacy_clip_names or position_ids != "int"):
        check_real_names(family, sd)
    sd = {k: v for k, v in sd.items() if not k.startswith(drop)} if drop else sd
    sd.update(extra or {})
    return write_single_file(Path(tmp_path) / (name or f"{family}.{fmt}"), sd, dtype, fmt)


# ---- diffusers folders (test-only: diffusers + transformers) --------------------------------------

def _diffusers_models(family: str):
    from diffusers import AutoencoderKL as DAutoencoderKL
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfgs = narrow_configs(family)
    u = cfgs["unet"]
    widths = tuple(u.model_channels * m for m in u.channel_mult)
    levels = len(widths)
    attn = [d > 0 for d in u.transformer_depth]
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    # diffusers' SD `attention_head_dim` is the head COUNT per level (a historical misnomer)
    heads = 8 if u.head_dim is None else tuple(max(1, w // u.head_dim) for w in widths)
    unet_kw = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=widths, layers_per_block=2,
                   down_block_types=down, up_block_types=up, norm_num_groups=32, cross_attention_dim=u.context_dim,
                   attention_head_dim=heads, use_linear_projection=u.use_linear_proj,
                   upcast_attention=u.upcast_attention)
    if family == "sdxl":
        unet_kw.update(transformer_layers_per_block=tuple(max(d, 1) for d in u.transformer_depth),
                       addition_embed_type="text_time", addition_time_embed_dim=256,
                       projection_class_embeddings_input_dim=u.adm_in_channels)
    v = cfgs["vae"]
    vae_kw = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
                  block_out_channels=tuple(v.ch * m for m in v.ch_mult),
                  down_block_types=("DownEncoderBlock2D",) * len(v.ch_mult),
                  up_block_types=("UpDecoderBlock2D",) * len(v.ch_mult), scaling_factor=FAMILIES[family].vae_scale)

    def clip_cfg(tc: TextEncoderConfig, layers: int) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=tc.vocab_size, hidden_size=tc.width, intermediate_size=4 * tc.width,
                              num_hidden_layers=layers, num_attention_heads=tc.heads, max_position_embeddings=77,
                              hidden_act=tc.activation, projection_dim=tc.projection_dim or tc.width,
                              pad_token_id=1, bos_token_id=49406, eos_token_id=49407)

    torch.manual_seed(0)
    models = {"unet": UNet2DConditionModel(**unet_kw), "vae": DAutoencoderKL(**vae_kw)}
    t = cfgs["text"]
    # SD 2.x's diffusers text_encoder is OpenCLIP-H minus its last block, as a plain CLIPTextModel
    models["text_encoder"] = CLIPTextModel(clip_cfg(t, t.layers - 1 if family == "sd2" else t.layers))
    if family == "sdxl":
        models["text_encoder_2"] = CLIPTextModelWithProjection(clip_cfg(cfgs["text_2"], cfgs["text_2"].layers))
    with torch.no_grad():  # diffusers zero-inits some outputs; random everywhere tests more
        gen = torch.Generator().manual_seed(1)
        for m in models.values():
            for name, p in m.named_parameters():
                p.copy_(_randomize({name: p.detach()}, gen)[name])
    return {k: m.eval() for k, m in models.items()}


def write_tokenizer(folder: Path) -> Path:
    """vocab.json + merges.txt (what transformers' CLIPTokenizer and diffusers folders use) from
    the BPE file open-clip-torch ships; test_tokenizer proves minti reads it as open_clip does."""
    from minti.loading.tokenizer import _vocab_from_openclip_gz, openclip_vocab_path

    vocab, merges = _vocab_from_openclip_gz(openclip_vocab_path())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    return folder


def make_diffusers_folder(tmp_path: Path, family: str, dtype: torch.dtype = torch.float32,
                          variant: str | None = None, prediction_type: str | None = "epsilon",
                          name: str | None = None, safe_serialization: bool = True) -> Path:
    """A narrow random diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/
    [, text_encoder_2/], tokenizer/[, tokenizer_2/], scheduler/). variant="fp16" writes
    *.fp16.safetensors; prediction_type=None leaves it out of scheduler_config.json.
    The models are returned by diffusers_models(family) with the same weights."""
    root = Path(tmp_path) / (name or f"{family}-diffusers")
    models = _diffusers_models(family)
    for component, m in models.items():
        m.to(dtype).save_pretrained(root / component, safe_serialization=safe_serialization, variant=variant)
    write_tokenizer(root / "tokenizer")
    if family == "sdxl":
        write_tokenizer(root / "tokenizer_2")
    sched = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
             "beta_end": 0.012, "beta_schedule": "scaled_linear"}
    if prediction_type is not None:
        sched["prediction_type"] = prediction_type
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
    cls = "StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline"
    index = {"_class_name": cls, **{c: ["diffusers", type(m).__name__] for c, m in models.items()}}
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def diffusers_models(family: str) -> dict[str, torch.nn.Module]:
    """The reference diffusers/transformers models that make_diffusers_folder saves (fp32)."""
    return _diffusers_models(family)


def single_file_from_diffusers(folder: Path, path: Path, dtype: torch.dtype = torch.float32) -> Path:
    """The single file holding the same weights as a diffusers folder, through
    minti.loading.diffusers_keys.to_single_file (names) plus the family's prefixes."""
    from safetensors.torch import load_file

    from minti.loading.diffusers_keys import to_single_file

    family = "sdxl" if (folder / "text_encoder_2").is_dir() else \
        ("sd2" if json.loads((folder / "unet" / "config.json").read_text())["use_linear_projection"] else "sd1")
    out = {}
    for spec in FAMILIES[family].parts.values():
        src = load_file(str(next((folder / spec.component).glob("*.safetensors"))))
        kw = {"layout": spec.layout} if spec.layout else {}
        out.update({spec.prefix + k: v for k, v in to_single_file(spec.component, src, **kw).items()})
    return write_single_file(path, out, dtype)


# ---- full-width files, streamed (the SDXL UNet alone is 2.6 B parameters) -------------------------

_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}


_POOL = 4_000_037  # values per pool; a prime, so no weight row lines up with the pool's period


def _write_values(f, key: str, shape: tuple[int, ...], dtype: torch.dtype, pools: dict, normal: torch.Tensor,
                  gen: torch.Generator) -> None:
    """Write one weight of a real-size random model, by the rules of _randomize (int position ids as
    real files). Its values are a window of a pool of normals scaled for its fan-in, read from a
    random start and wrapped around: 3.5 B fresh draws, scaled and cast one by one, take minutes on a
    CI core, copying pool bytes to the file is disk speed."""
    if key.endswith("position_ids"):
        f.write(torch.arange(shape[-1]).expand(shape).contiguous().numpy().tobytes())
        return
    if not shape:  # logit_scale
        f.write(torch.tensor(math.log(1 / 0.07), dtype=dtype).reshape(1).view(torch.uint8).numpy().tobytes())
        return
    if len(shape) == 1:
        base, scale = (1.0 if key.endswith("weight") else 0.0), 0.1
    else:
        fan_in = shape[-1] if key.endswith("text_projection") or "embedding" in key else math.prod(shape[1:])
        base, scale = 0.0, 1 / math.sqrt(fan_in)
    if (base, scale) not in pools:
        pools[base, scale] = memoryview((base + scale * normal).to(dtype).view(torch.uint8).numpy().tobytes())
    pool = pools[base, scale]
    itemsize = torch.empty((), dtype=dtype).element_size()
    remaining = math.prod(shape) * itemsize
    at = int(torch.randint(0, _POOL, (1,), generator=gen)) * itemsize
    while remaining:
        chunk = pool[at:at + remaining]
        f.write(chunk)
        remaining -= len(chunk)
        at = 0


def make_full_width_file(path: Path, family: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """A real-size single file of `family` with every key and shape of tests/layouts/<family>.tsv and
    random weights in `dtype`, written one tensor at a time (safetensors' own writer needs the whole
    state dict in memory at once: 7 GB for SDXL in bf16)."""
    layout = read_layout(MANIFEST[family])
    gen = torch.Generator().manual_seed(seed)
    normal = torch.randn(_POOL, generator=gen)
    keys = sorted(layout)
    header, offset = {}, 0
    for key in keys:
        tdtype = torch.int64 if key.endswith("position_ids") else dtype
        nbytes = math.prod(layout[key]) * torch.empty((), dtype=tdtype).element_size()
        header[key] = {"dtype": _SAFETENSORS_DTYPES[tdtype], "shape": list(layout[key]),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pools: dict = {}
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for key in keys:
            _write_values(f, key, layout[key], dtype, pools, normal, gen)
    return path
