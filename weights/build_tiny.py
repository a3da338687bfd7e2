"""Build weights/minti-tiny.safetensors: a tiny latent diffusion model in the SD 1.x single-file
layout, trained from scratch on the CPU on minti.demo.toy_images' captioned images.

    python weights/build_tiny.py            # the full build (~2 h on 2 cores; see weights/README.md)
    python weights/build_tiny.py --quick    # every stage for a few steps (< 1 min; the tests run it)

Stages, each saved to --scratch so an interrupted build resumes where it stopped (training
stages also save every --save-every steps):
    1 data      BuildConfig.n_images training images + n_holdout held-out ones (minti.demo.toy_images)
    2 vae       AutoencoderKL, x4 down, 4 latent channels: L1 + L2 + tiny KL; afterwards the
                latents are re-normalised so that latent * 0.18215 has zero mean and unit std
                per channel (SD 1.x's scale is fixed by the loader, so the VAE adapts to it)
    3 latents   the posterior (mean, logvar) of every image, computed once
    4 unet      UNet and text encoder trained together with the eps loss on SD's scaled-linear
                schedule; captions randomly shortened, "shape" for the shape name, prompt-template
                filler, 10% empty captions (so classifier-free guidance works); EMA weights
    5 report    held-out losses, a DDIM/CFG sample grid, caption-fidelity and concept scores
    6 concept   weights/demo-concept/: images of a concept the model has no word for
    7 write     fp16 safetensors with the exact SD 1.x key names, written atomically, reloaded
                through minti.load and checked against the trained modules
Everything is seeded: the same command on the same torch version gives the same file.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from minti.demo import concept_score, toy_images
from minti.diffusion import NUM_TRAIN_TIMESTEPS, alphas_cumprod, diffusion_loss
from minti.loading.tokenizer import Tokenizer
from minti.models import ops
from minti.models.clip import TextEncoderConfig, build_text_encoder
from minti.models.unet import UNet, UNetConfig
from minti.models.vae import AutoencoderKL, VAEConfig
from minti.sampling import ddim, guided_model, initial_noise

HERE = Path(__file__).resolve().parent
VAE_SCALE = 0.18215  # SD 1.x's latent scale: minti.load applies it to every sd1-family file

# The architecture. Every field is one the loader reads back from the shapes or one it fixes for
# the sd1 family (8 UNet heads, 64-wide text heads, 32 norm groups), so a loaded file is exactly
# this model. Widths are multiples of 32 (norm groups) and 8 (heads).
VAE = VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4)  # 64x64 -> 4x16x16
# No attention at the 16x16 level: it was a third of the step time; the 8x8 and 4x4 levels and
# the middle block still cross-attend to the text.
UNET = UNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1, transformer_depth=(0, 1, 1),
                  transformer_depth_middle=1, num_heads=8, head_dim=None, context_dim=64)
TEXT = TextEncoderConfig(width=64, layers=3, heads=1)  # real CLIP vocabulary: 49408 tokens
MAX_BYTES = 30_000_000


@dataclass
class BuildConfig:
    seed: int = 0
    resolution: int = 64
    n_images: int = 20_000
    n_holdout: int = 256
    # VAE
    vae_steps: int = 2_500
    vae_batch: int = 16
    vae_crop: int = 32  # train on random crops (4x cheaper than 64x64; the VAE is convolutional)
    vae_full_steps: int = 200  # ...then the last steps on whole images, so mid-attention sees 16x16
    vae_lr: float = 1e-3
    vae_kl: float = 1e-5  # per-element KL weight: just enough to keep the posterior a distribution
    # UNet + text encoder
    unet_steps: int = 7_000
    unet_batch: int = 32
    unet_lr: float = 5e-4
    warmup: int = 200
    weight_decay: float = 0.01
    ema: float = 0.995  # horizon ~200 steps: the run is short and its lr already decays
    uncond_p: float = 0.1  # empty caption: the unconditional branch of classifier-free guidance
    drop_p: float = 0.15  # each attribute left out of the caption
    generic_p: float = 0.1  # shape name -> "shape" (the demo's init word)
    template_p: float = 0.3  # caption wrapped in a prompt template ("a snapshot of [name]")
    # report
    sample_steps: int = 30
    cfg_scale: float = 4.0
    grid_prompts: int = 8
    grid_seeds: int = 4
    fidelity_n: int = 32
    concept_n: int = 8
    n_concept_images: int = 5
    # bookkeeping
    save_every: int = 250
    log_every: int = 50
    threads: int = 2


def quick(cfg: BuildConfig) -> BuildConfig:
    """Every stage for a handful of steps: the same code paths and the same architecture."""
    return dataclasses.replace(cfg, n_images=48, n_holdout=8, vae_steps=3, vae_batch=4, vae_full_steps=1,
                               unet_steps=3, unet_batch=4,
                               warmup=1, sample_steps=2, grid_prompts=2, grid_seeds=2, fidelity_n=2, concept_n=2,
                               save_every=2, log_every=1)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def trainable_ops() -> None:
    """Plain torch ops, so that every weight gets its gradient: the fused kernels are built for
    frozen networks (the GroupNorm kernel's backward returns no weight gradient; minti.models.ops
    takes the plain path for weights that require grad). assert_trains and assert_changed
    check early in each stage that every weight does get a gradient and move."""
    ops.set_backend("torch")


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def templates() -> list[str]:
    """Prompt-template filler the captions get wrapped in, so that the trainer's templates are
    words the tiny text encoder has seen. The trainer's own list when it is there."""
    try:
        from minti.training.templates import OBJECT
        return list(OBJECT)
    except ImportError:
        return [p + " [name]" for p in toy_images.PREFIXES]


# ---- 1 data ---------------------------------------------------------------------------------------

def stage_data(cfg: BuildConfig, scratch: Path) -> dict:
    path = scratch / "data.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    t0 = time.time()
    train, train_attrs = toy_images.dataset(cfg.n_images, seed=cfg.seed, resolution=cfg.resolution)
    hold, hold_attrs = toy_images.dataset(cfg.n_holdout, seed=cfg.seed + 1, resolution=cfg.resolution)
    data = dict(train=torch.from_numpy(train).permute(0, 3, 1, 2).contiguous(), hold=torch.from_numpy(hold).permute(0, 3, 1, 2).contiguous(),
                train_attrs=[a.to_dict() for a in train_attrs], hold_attrs=[a.to_dict() for a in hold_attrs])
    atomic_save(data, path)
    log(f"data: {cfg.n_images} + {cfg.n_holdout} images in {time.time() - t0:.0f} s")
    return data


def to_pixels(u8: torch.Tensor) -> torch.Tensor:
    return u8.float() / 127.5 - 1.0


# ---- training helpers -----------------------------------------------------------------------------

def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warmup, then cosine down to 10%."""
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * p)))


def param_groups(modules: list[torch.nn.Module], weight_decay: float) -> list[dict]:
    # no decay on norms, biases and embedding tables (most token rows never see a gradient)
    decay, no_decay = [], []
    for m in modules:
        for name, p in m.named_parameters():
            (decay if p.ndim >= 2 and "embedding" not in name else no_decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def snapshot(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{k}.{n}": p.detach().clone() for k, m in modules.items() for n, p in m.named_parameters()}


# Zero-initialised output layers pass no gradient upstream until they have moved: by the third
# step every weight of a healthy model has a gradient. Whether the weights then move is checked
# once the warmup is over: during warmup an Adam step on a barely-opened path can be smaller
# than the float32 spacing of a weight near 1 (a norm scale) and round away.
CHECK_STEP = 2
# key biases get no gradient in exact arithmetic: softmax ignores a shift shared by all keys
NO_GRADIENT = ("k_proj.bias", "attn_1.k.bias")


def check_steps(steps: int, warmup: int) -> tuple[int, int]:
    """(step whose gradients are checked, step after which the weights must have moved)."""
    grads = min(CHECK_STEP, steps - 1)
    return grads, min(grads + warmup, steps - 1)


def assert_trains(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Call between backward and the optimizer step: every parameter (but NO_GRADIENT) must have
    a non-zero gradient. A backend whose backward gives no weight gradient (the frozen-weight
    kernels) would otherwise silently train nothing. Returns a snapshot for assert_changed."""
    missing = [f"{k}.{n}" for k, m in modules.items() for n, p in m.named_parameters()
               if not n.endswith(NO_GRADIENT) and (p.grad is None or not p.grad.abs().sum() > 0)]
    if missing:
        raise RuntimeError(f"{len(missing)} parameters got no gradient, e.g. {missing[:3]}")
    return snapshot(modules)


def assert_changed(before: dict[str, torch.Tensor], modules: dict[str, torch.nn.Module]) -> None:
    now = snapshot(modules)
    same = [k for k, v in before.items() if not k.endswith(NO_GRADIENT) and torch.equal(v, now[k])]
    if same:
        raise RuntimeError(f"{len(same)} parameter tensors did not change in a step, e.g. {same[:3]}")


class Saver:
    """Resumable training state of one stage: <stage>-state.pt every save_every steps."""

    def __init__(self, scratch: Path, stage: str):
        self.path = scratch / f"{stage}-state.pt"

    def load(self) -> dict | None:
        return torch.load(self.path, weights_only=False) if self.path.exists() else None

    def save(self, state: dict) -> None:
        atomic_save(state, self.path)


# ---- 2 VAE ----------------------------------------------------------------------------------------

def vae_loss(vae: AutoencoderKL, x: torch.Tensor, kl_weight: float, noise: torch.Tensor) -> tuple[torch.Tensor, dict]:
    mean, logvar = vae.encode(x)
    z = mean + (0.5 * logvar).exp() * noise
    rec = vae.decode(z)
    l1 = (rec - x).abs().mean()
    l2 = (rec - x).square().mean()
    kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()
    return l1 + l2 + kl_weight * kl, dict(l1=l1.item(), l2=l2.item(), kl=kl.item())


def normalise_latents(vae: AutoencoderKL, pixels: torch.Tensor) -> dict:
    """Fold a per-channel affine map into quant_conv / post_quant_conv so the posterior mean
    times VAE_SCALE has zero mean and unit std per channel; decode(encode(x)) is unchanged."""
    with torch.no_grad():
        mean = torch.cat([vae.encode(pixels[i:i + 256])[0] for i in range(0, len(pixels), 256)])
        mu = mean.mean((0, 2, 3)).double()
        a = 1.0 / (VAE_SCALE * mean.std((0, 2, 3)).double())
        zc = vae.cfg.z_channels
        q, pq = vae.quant_conv, vae.post_quant_conv
        qw, qb = q.weight.double(), q.bias.double()
        qw[:zc] *= a[:, None, None, None]
        qb[:zc] = a * (qb[:zc] - mu)
        qb[zc:] += 2.0 * torch.log(a)
        pw, pb = pq.weight.double(), pq.bias.double()
        pb = pb + pw[:, :, 0, 0] @ mu
        pw = pw / a[None, :, None, None]
        q.weight.copy_(qw), q.bias.copy_(qb), pq.weight.copy_(pw), pq.bias.copy_(pb)
    return dict(latent_mean=mu.tolist(), latent_std=(1.0 / (VAE_SCALE * a)).tolist())


def vae_batch(train: torch.Tensor, step: int, cfg: BuildConfig, gen: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.randint(len(train), (cfg.vae_batch,), generator=gen)
    x = to_pixels(train[idx])
    if step < cfg.vae_steps - cfg.vae_full_steps and cfg.vae_crop < x.shape[-1]:
        # one crop offset per batch, on the latent grid (multiples of 4 pixels)
        oy, ox = (4 * torch.randint((x.shape[-1] - cfg.vae_crop) // 4 + 1, (2,), generator=gen)).tolist()
        x = x[:, :, oy:oy + cfg.vae_crop, ox:ox + cfg.vae_crop]
    noise = torch.randn(cfg.vae_batch, VAE.z_channels, x.shape[2] // 4, x.shape[3] // 4, generator=gen)
    return x, noise


def vae_step(vae: AutoencoderKL, opt: torch.optim.Optimizer, x: torch.Tensor, noise: torch.Tensor,
             cfg: BuildConfig, check: bool = False) -> tuple[dict, dict | None]:
    """One step; with check, first asserts every weight has a gradient and returns a snapshot."""
    loss, parts = vae_loss(vae, x, cfg.vae_kl, noise)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
    before = assert_trains({"vae": vae}) if check else None
    opt.step()
    return parts, before


def stage_vae(cfg: BuildConfig, data: dict, scratch: Path) -> AutoencoderKL:
    path = scratch / "vae.pt"
    vae = AutoencoderKL(VAE)
    if path.exists():
        vae.load_state_dict(torch.load(path, weights_only=False)["model"])
        return vae
    torch.manual_seed(cfg.seed + 10)
    vae = AutoencoderKL(VAE)  # re-created after seeding: the init depends on the seed only
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, betas=(0.9, 0.99), weight_decay=0.0, fused=True)
    gen = torch.Generator().manual_seed(cfg.seed + 11)
    saver, step, history = Saver(scratch, "vae"), 0, []
    if (state := saver.load()) is not None:
        vae.load_state_dict(state["model"]), opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"]), history.extend(state["history"])
        step = state["step"]
        log(f"vae: resuming at step {step}")
    train = data["train"]
    t0, t_start, window = time.time(), step, []
    (check_grads, check_moved), before = check_steps(cfg.vae_steps, cfg.warmup), None
    while step < cfg.vae_steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.vae_steps, cfg.vae_lr, cfg.warmup)
        x, noise = vae_batch(train, step, cfg, gen)
        parts, snap = vae_step(vae, opt, x, noise, cfg, check=step == check_grads)
        before = snap if snap is not None else before
        if step == check_moved and before is not None:
            assert_changed(before, {"vae": vae})
        step += 1
        window.append(parts)
        if step % cfg.log_every == 0 or step == cfg.vae_steps:
            avg = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
            history.append(dict(step=step, **avg))
            per = (time.time() - t0) / max(1, step - t_start)
            log(f"vae {step}/{cfg.vae_steps} l1 {avg['l1']:.4f} l2 {avg['l2']:.4f} kl {avg['kl']:.2f} "
                f"{per:.2f} s/step, eta {per * (cfg.vae_steps - step) / 60:.0f} min")
            window = []
        if step % cfg.save_every == 0 and step < cfg.vae_steps:
            saver.save(dict(model=vae.state_dict(), opt=opt.state_dict(), gen=gen.get_state(), step=step, history=history))
    norm = normalise_latents(vae, to_pixels(data["train"][:2048]))
    log(f"vae: latents re-normalised (raw per-channel std {['%.3g' % s for s in norm['latent_std']]})")
    atomic_save(dict(model=vae.state_dict(), history=history, norm=norm), path)
    saver.path.unlink(missing_ok=True)
    return vae


# ---- 3 latents ------------------------------------------------------------------------------------

def stage_latents(data: dict, vae: AutoencoderKL, scratch: Path) -> dict:
    path = scratch / "latents.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    out = {}
    with torch.no_grad():
        for split in ("train", "hold"):
            px = data[split]
            ms, lvs = zip(*(vae.encode(to_pixels(px[i:i + 256])) for i in range(0, len(px), 256)))
            out[split] = (torch.cat(ms).half(), torch.cat(lvs).half())
    atomic_save(out, path)
    return out


# ---- 4 UNet + text encoder ------------------------------------------------------------------------

def init_text_encoder(te: torch.nn.Module) -> None:
    # CLIP's init scales: the module defaults (N(0, 1) tables) would swamp a 64-wide model
    emb = te.text_model.embeddings
    torch.nn.init.normal_(emb.token_embedding.weight, std=0.02)
    torch.nn.init.normal_(emb.position_embedding.weight, std=0.01)


def init_unet(unet: UNet) -> None:
    # LDM's zero_module: every residual branch starts as the identity, the output at zero
    for name, m in unet.named_modules():
        if name == "out.2" or name.endswith("out_layers.3") or name.endswith("proj_out"):
            torch.nn.init.zeros_(m.weight)
            torch.nn.init.zeros_(m.bias)


def make_captions(attrs: list[dict], rng: np.random.Generator, cfg: BuildConfig, tmpl: list[str]) -> list[str]:
    out = []
    for a in attrs:
        if rng.uniform() < cfg.uncond_p:
            out.append("")
            continue
        text = toy_images.caption(toy_images.Attributes(**a), rng, drop=cfg.drop_p, generic=cfg.generic_p)
        if rng.uniform() < cfg.template_p:
            text = tmpl[rng.integers(len(tmpl))].replace("[name]", text)
        out.append(text)
    return out


def sample_latents(lat: tuple[torch.Tensor, torch.Tensor], idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    mean, logvar = lat[0][idx].float(), lat[1][idx].float()
    return (mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=gen)) * VAE_SCALE


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1.0 - decay)


def unet_batch(attrs: list[dict], lat: tuple[torch.Tensor, torch.Tensor], cfg: BuildConfig, gen: torch.Generator,
               rng: np.random.Generator, tok: Tokenizer, tmpl: list[str]) -> tuple[torch.Tensor, ...]:
    idx = torch.randint(len(attrs), (cfg.unet_batch,), generator=gen)
    z0 = sample_latents(lat, idx, gen)
    tokens = tok.encode(make_captions([attrs[i] for i in idx.tolist()], rng, cfg, tmpl))
    t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (cfg.unet_batch,), generator=gen)
    noise = torch.randn(z0.shape, generator=gen)
    return z0, tokens, t, noise


def unet_step(unet: UNet, te: torch.nn.Module, opt: torch.optim.Optimizer, batch: tuple[torch.Tensor, ...],
              acp: torch.Tensor, check: bool = False) -> tuple[float, dict | None]:
    """One eps-prediction step of the UNet and the text encoder together: the text encoder
    learns through the UNet's cross-attention."""
    z0, tokens, t, noise = batch
    loss = diffusion_loss(unet, z0, noise, t, te(tokens)[0], acp=acp)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for m in (unet, te) for p in m.parameters()], 1.0)
    # (the token table as a whole has a gradient: the rows of this batch's words)
    before = assert_trains({"unet": unet, "text": te}) if check else None
    opt.step()
    return loss.item(), before


def stage_unet(cfg: BuildConfig, data: dict, lat: dict, tok: Tokenizer, scratch: Path
               ) -> tuple[UNet, torch.nn.Module, list[dict]]:
    path = scratch / "unet.pt"
    unet, te = UNet(UNET), build_text_encoder(TEXT)
    if path.exists():
        state = torch.load(path, weights_only=False)
        unet.load_state_dict(state["unet"]), te.load_state_dict(state["text"])
        return unet, te, state["history"]
    torch.manual_seed(cfg.seed + 20)
    unet, te = UNet(UNET), build_text_encoder(TEXT)
    init_unet(unet), init_text_encoder(te)
    ema_unet, ema_te = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(te).requires_grad_(False)
    opt = torch.optim.AdamW(param_groups([unet, te], cfg.weight_decay), lr=cfg.unet_lr, betas=(0.9, 0.99),
                            fused=True)  # one kernel per step: the for-each AdamW took a third of the time
    gen = torch.Generator().manual_seed(cfg.seed + 21)
    rng = np.random.default_rng([cfg.seed, 22])
    acp = alphas_cumprod()
    tmpl = templates()
    saver, step, history = Saver(scratch, "unet"), 0, []
    if (state := saver.load()) is not None:
        unet.load_state_dict(state["unet"]), te.load_state_dict(state["text"])
        ema_unet.load_state_dict(state["ema_unet"]), ema_te.load_state_dict(state["ema_text"])
        opt.load_state_dict(state["opt"]), gen.set_state(state["gen"])
        rng.bit_generator.state = state["rng"]
        step, history = state["step"], state["history"]
        log(f"unet: resuming at step {step}")
    attrs, train_lat = data["train_attrs"], lat["train"]
    t0, t_start, window = time.time(), step, []
    (check_grads, check_moved), before = check_steps(cfg.unet_steps, cfg.warmup), None
    while step < cfg.unet_steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.unet_steps, cfg.unet_lr, cfg.warmup)
        batch = unet_batch(attrs, train_lat, cfg, gen, rng, tok, tmpl)
        loss, snap = unet_step(unet, te, opt, batch, acp, check=step == check_grads)
        before = snap if snap is not None else before
        if step == check_moved and before is not None:
            assert_changed(before, {"unet": unet, "text": te})
        ema_update(ema_unet, unet, cfg.ema if step >= cfg.warmup else 0.0)
        ema_update(ema_te, te, cfg.ema if step >= cfg.warmup else 0.0)
        step += 1
        window.append(loss)
        if step % cfg.log_every == 0 or step == cfg.unet_steps:
            history.append(dict(step=step, loss=float(np.mean(window))))
            per = (time.time() - t0) / (step - t_start)
            log(f"unet {step}/{cfg.unet_steps} loss {np.mean(window):.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{per:.2f} s/step, eta {per * (cfg.unet_steps - step) / 60:.0f} min")
            window = []
        if step % cfg.save_every == 0 and step < cfg.unet_steps:
            saver.save(dict(unet=unet.state_dict(), text=te.state_dict(), ema_unet=ema_unet.state_dict(),
                            ema_text=ema_te.state_dict(), opt=opt.state_dict(), gen=gen.get_state(),
                            rng=rng.bit_generator.state, step=step, history=history))
    # the shipped weights are the EMA, rounded to fp16 like the file
    for m in (ema_unet, ema_te):
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(p.half().float())
    atomic_save(dict(unet=ema_unet.state_dict(), text=ema_te.state_dict(), history=history), path)
    saver.path.unlink(missing_ok=True)
    return ema_unet, ema_te, history


# ---- 5 report: held-out losses, samples, scores ---------------------------------------------------

@torch.no_grad()
def heldout_loss(unet: UNet, te: torch.nn.Module, data: dict, lat: dict, tok: Tokenizer, seed: int) -> float:
    """eps-MSE on the held-out images with their full captions, fixed (t, noise) pairs."""
    gen = torch.Generator().manual_seed(seed + 30)
    acp = alphas_cumprod()
    total, n = 0.0, 0
    hold = lat["hold"]
    for i in range(0, len(hold[0]), 64):
        idx = torch.arange(i, min(i + 64, len(hold[0])))
        z0 = sample_latents(hold, idx, gen)
        t = torch.randint(0, len(acp), (len(idx),), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        caps = [toy_images.caption(toy_images.Attributes(**data["hold_attrs"][j])) for j in idx.tolist()]
        total += diffusion_loss(unet, z0, noise, t, te(tok.encode(caps))[0], acp=acp, reduction="sum").item()
        n += noise.numel()
    return total / n


@torch.no_grad()
def ddim_sample(unet: UNet, te: torch.nn.Module, vae: AutoencoderKL, tok: Tokenizer, prompts: list[str],
                seeds: list[int], steps: int, cfg_scale: float) -> torch.Tensor:
    """minti's DDIM (eta 0) with classifier-free guidance, as `python -m minti sample` draws
    -> pixels [B,3,H,W] in [-1,1]."""
    side = 64 // 4  # latent side of the 64-pixel model
    x = initial_noise(seeds, (VAE.z_channels, side, side))
    context = te(tok.encode([""] * len(prompts) + prompts))[0]  # unconditional rows first
    x = ddim(guided_model(unet, context, None, cfg_scale), x, steps)
    return vae.decode(x / VAE_SCALE).clamp(-1, 1)


def to_images(px: torch.Tensor) -> list[Image.Image]:
    arr = ((px.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    return [Image.fromarray(a, "RGB") for a in arr]


def grid(rows: list[list[Image.Image]], scale: int = 2) -> Image.Image:
    s, pad = rows[0][0].size[0], 2
    out = Image.new("RGB", (len(rows[0]) * (s + pad) + pad, len(rows) * (s + pad) + pad), "white")
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            out.paste(im, (pad + c * (s + pad), pad + r * (s + pad)))
    return out.resize((out.width * scale, out.height * scale), Image.NEAREST)


def stage_report(cfg: BuildConfig, data: dict, lat: dict, vae: AutoencoderKL, unet: UNet, te: torch.nn.Module,
                 tok: Tokenizer, history: list[dict], scratch: Path, grid_path: Path) -> dict:
    path = scratch / "report.json"
    if path.exists():
        return json.loads(path.read_text())
    t0 = time.time()
    rep: dict = {}
    with torch.no_grad():
        hold = to_pixels(data["hold"])
        rec = vae.decode(vae.encode(hold)[0])
        rep["vae_heldout_l1"] = (rec - hold).abs().mean().item()
        rep["vae_heldout_psnr_db"] = (10 * torch.log10(4.0 / (rec.clamp(-1, 1) - hold).square().mean())).item()
    rep["unet_train_loss_final"] = history[-1]["loss"] if history else None
    rep["unet_heldout_loss"] = heldout_loss(unet, te, data, lat, tok, cfg.seed)
    rng = np.random.default_rng([cfg.seed, 50])
    sample = dict(steps=cfg.sample_steps, cfg_scale=cfg.cfg_scale)

    # grid: per row, one caption; first column the generator's own rendering of it
    rows, captions = [], []
    for r in range(cfg.grid_prompts):
        a = toy_images.sample_attributes(rng)
        captions.append(toy_images.caption(a))
        px = ddim_sample(unet, te, vae, tok, [captions[-1]] * cfg.grid_seeds,
                         [1000 + r * 10 + s for s in range(cfg.grid_seeds)], **sample)
        rows.append([toy_images.render(a, cfg.resolution).image] + to_images(px))
    grid_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = grid_path.with_name(f".{grid_path.name}.tmp.png")
    grid(rows).save(tmp)
    os.replace(tmp, grid_path)
    rep["grid_captions"] = captions

    # caption fidelity: a sample against the rendering of its own caption vs of another caption
    attrs = [toy_images.sample_attributes(rng) for _ in range(cfg.fidelity_n)]
    px = ddim_sample(unet, te, vae, tok, [toy_images.caption(a) for a in attrs],
                     [2000 + i for i in range(len(attrs))], **sample)
    feats = [concept_score.features(x) for x in concept_score.to_arrays(px)]
    refs = [concept_score.features(np.asarray(toy_images.render(a, cfg.resolution).image, np.float64)) for a in attrs]
    n = len(attrs)
    own = [concept_score.score_features([feats[i]], [refs[i]]).total for i in range(n)]
    other = [concept_score.score_features([feats[i]], [refs[(i + 1) % n]]).total for i in range(n)]
    rep["fidelity_own_caption"] = float(np.mean(own))
    rep["fidelity_other_caption"] = float(np.mean(other))

    # the demo concept: described in words vs the init word alone (what textual inversion starts from)
    concept = [s.image for s in toy_images.concept_samples(cfg.n_concept_images, cfg.seed, cfg.resolution)]
    seeds = [3000 + i for i in range(cfg.concept_n)]
    for key, prompt in (("concept_score_described", toy_images.caption(toy_images.concept_attributes(rng))),
                        ("concept_score_init_word", f"a {toy_images.CONCEPT_CAPTION_INIT}")):
        px = ddim_sample(unet, te, vae, tok, [prompt] * cfg.concept_n, seeds, **sample)
        rep[key] = concept_score.concept_score(px, concept).total
    rep["report_seconds"] = time.time() - t0
    path.write_text(json.dumps(rep, indent=1))
    return rep


# ---- 6 concept images -----------------------------------------------------------------------------

def stage_concept(cfg: BuildConfig, demo_dir: Path) -> list[Path]:
    demo_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for i, s in enumerate(toy_images.concept_samples(cfg.n_concept_images, cfg.seed, cfg.resolution)):
        p = demo_dir / f"concept-{i}.png"
        tmp = demo_dir / f".concept-{i}.tmp.png"
        s.image.save(tmp)
        os.replace(tmp, p)
        out.append(p)
    return out


# ---- 7 write --------------------------------------------------------------------------------------

def ddpm_buffers() -> dict[str, torch.Tensor]:
    """The 12 schedule buffers LDM stores beside the weights (fp32, as computed by LDM's
    register_schedule); loaders ignore them, but they are part of the SD 1.x layout."""
    acp = alphas_cumprod()
    betas = 1 - acp / torch.cat([torch.ones(1, dtype=acp.dtype), acp[:-1]])
    prev = torch.cat([torch.ones(1, dtype=acp.dtype), acp[:-1]])
    post_var = betas * (1 - prev) / (1 - acp)
    out = dict(betas=betas, alphas_cumprod=acp, alphas_cumprod_prev=prev, sqrt_alphas_cumprod=acp.sqrt(),
               sqrt_one_minus_alphas_cumprod=(1 - acp).sqrt(), log_one_minus_alphas_cumprod=(1 - acp).log(),
               sqrt_recip_alphas_cumprod=(1 / acp).sqrt(), sqrt_recipm1_alphas_cumprod=(1 / acp - 1).sqrt(),
               posterior_variance=post_var, posterior_log_variance_clipped=torch.log(post_var.clamp(min=1e-20)),
               posterior_mean_coef1=betas * prev.sqrt() / (1 - acp),
               posterior_mean_coef2=(1 - prev) * (1 - betas).sqrt() / (1 - acp))
    out["posterior_log_variance_clipped"][0] = out["posterior_log_variance_clipped"][1]  # LDM's clip
    return {k: v.float() for k, v in out.items()}


def state_dict_sd1(unet: UNet, vae: AutoencoderKL, te: torch.nn.Module) -> dict[str, torch.Tensor]:
    sd = {}
    for prefix, m in (("model.diffusion_model.", unet), ("first_stage_model.", vae),
                      ("cond_stage_model.transformer.", te)):
        for k, v in m.state_dict().items():
            sd[prefix + k] = v.long() if k.endswith("position_ids") else v.half()
    sd.update(ddpm_buffers())
    return {k: v.contiguous() for k, v in sd.items()}


def stage_write(unet: UNet, vae: AutoencoderKL, te: torch.nn.Module, out: Path, meta: dict) -> dict:
    from safetensors.torch import save_file

    sd = state_dict_sd1(unet, vae, te)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    # one metadata entry: safetensors writes several in a random order, and the build must be
    # byte-reproducible
    save_file(sd, str(tmp), metadata={"minti_tiny": json.dumps(meta, sort_keys=True)})
    os.replace(tmp, out)
    size = out.stat().st_size
    if size > MAX_BYTES:
        raise RuntimeError(f"{out} is {size / 1e6:.1f} MB, over the {MAX_BYTES / 1e6:.0f} MB budget")
    return dict(bytes=size, tensors=len(sd), parameters=sum(v.numel() for k, v in sd.items() if "." in k))


def verify_load(path: Path, unet: UNet, vae: AutoencoderKL, te: torch.nn.Module, tok: Tokenizer) -> str:
    """Reload the file with minti.load and check that it computes what the trained modules do."""
    try:
        import minti
        sd = minti.load(path, dtype=torch.float32, device="cpu")
    except (ImportError, AttributeError) as e:  # the loader has not landed in this checkout
        return f"minti.load unavailable ({e}); key layout checked only"
    if sd.family != "sd1":
        raise RuntimeError(f"minti.load sees family {sd.family!r}, expected 'sd1'")
    gen = torch.Generator().manual_seed(0)
    tokens = tok.encode(["a small red star on the left on a dotted blue background"])
    with torch.no_grad():
        ctx = te(tokens)[0]
        ctx2 = sd.text_encoders[0](tokens)[0]
        z = torch.randn(1, 4, 16, 16, generator=gen)
        e1, e2 = unet(z, torch.tensor([500]), ctx), sd.unet(z, torch.tensor([500]), ctx2)
        px1, px2 = vae.decode(z / VAE_SCALE), sd.decode_latents(z)
    for name, a, b in (("text encoder", ctx, ctx2), ("unet", e1, e2), ("vae", px1, px2)):
        err = (a - b).abs().max().item()
        if err > 1e-3 * max(1.0, a.abs().max().item()):
            raise RuntimeError(f"minti.load's {name} differs from the trained one by {err:.2e}")
    return "minti.load: family sd1, text encoder/unet/vae outputs match the trained modules"


# ---- cost estimate --------------------------------------------------------------------------------

def estimate(cfg: BuildConfig, reps: int = 3, efficiency: float = 0.8) -> dict[str, float]:
    """Seconds per stage of a build with cfg on an otherwise idle machine, from timing a few real
    steps of each. Measured in process CPU time (the fastest of `reps` after a warm-up), which
    other work on a shared machine inflates far less than wall time, then divided by the
    threads at the given parallel efficiency. On an idle machine the two agree."""
    def best(f, n=reps) -> float:
        f()
        times = []
        for _ in range(n):
            w, c = time.perf_counter(), time.process_time()
            f()
            times.append((time.process_time() - c, time.perf_counter() - w))
        cpu, wall = min(times)
        return min(wall, cpu / (torch.get_num_threads() * efficiency))

    tok = Tokenizer.from_openclip_vocab(pad_token_id=TEXT.pad_token_id)
    images, attrs = toy_images.dataset(16, seed=cfg.seed + 99, resolution=cfg.resolution)
    # the generator is single-threaded numpy: its CPU time is its wall time
    per_image = best(lambda: toy_images.dataset(8, seed=cfg.seed + 98, resolution=cfg.resolution)) / 8 \
        * torch.get_num_threads() * efficiency
    train = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    vae = AutoencoderKL(VAE)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-5, fused=True)
    gen = torch.Generator().manual_seed(0)
    crop = best(lambda: vae_step(vae, opt, *vae_batch(train, 0, cfg, gen), cfg))
    full = best(lambda: vae_step(vae, opt, *vae_batch(train, cfg.vae_steps, cfg, gen), cfg))
    with torch.no_grad():
        encode = best(lambda: vae.encode(to_pixels(train))) / len(train)
    unet, te = UNet(UNET), build_text_encoder(TEXT)
    opt = torch.optim.AdamW(param_groups([unet, te], 0.0), lr=1e-5, fused=True)
    lat = (torch.zeros(len(train), 4, 16, 16), torch.zeros(len(train), 4, 16, 16))
    rng, acp, tmpl = np.random.default_rng(0), alphas_cumprod(), templates()
    a = [x.to_dict() for x in attrs]
    ustep = best(lambda: unet_step(unet, te, opt, unet_batch(a, lat, cfg, gen, rng, tok, tmpl), acp))
    n_sampled = cfg.grid_prompts * cfg.grid_seeds + cfg.fidelity_n + 2 * cfg.concept_n
    with torch.no_grad():
        ctx = te(tok.encode([""] * 16))[0]
        fwd = best(lambda: unet(torch.randn(32, 4, 16, 16), torch.full((32,), 500), torch.cat([ctx, ctx]))) / 16
    est = dict(data=per_image * (cfg.n_images + cfg.n_holdout),
               vae=crop * (cfg.vae_steps - cfg.vae_full_steps) + full * cfg.vae_full_steps,
               latents=encode * (cfg.n_images + cfg.n_holdout), unet=ustep * cfg.unet_steps,
               report=fwd * cfg.sample_steps * n_sampled + 60.0)
    log(f"estimate: {per_image * 1e3:.1f} ms/image, vae {crop:.2f} s/step (crop) {full:.2f} s/step (full), "
        f"unet {ustep:.2f} s/step, sampling {fwd * 1e3:.0f} ms per image-step (CFG)")
    for k, v in est.items():
        log(f"estimate {k}: {v / 60:.1f} min")
    log(f"estimate total: {sum(est.values()) / 60:.0f} min on {torch.get_num_threads()} threads")
    return est


# ---- main -----------------------------------------------------------------------------------------

def check_scratch(cfg: BuildConfig, scratch: Path) -> None:
    """A scratch dir holds the stages of one config only: resuming with another would mix them."""
    scratch.mkdir(parents=True, exist_ok=True)
    p = scratch / "config.json"
    want = dict(build=dataclasses.asdict(cfg), vae=dataclasses.asdict(VAE), unet=dataclasses.asdict(UNET),
                text=dataclasses.asdict(TEXT))
    want = json.loads(json.dumps(want))
    if p.exists():
        have = json.loads(p.read_text())
        # bookkeeping fields may change between resumes
        ignore = {"save_every", "log_every", "threads"}
        diff = [k for k in set(have["build"]) | set(want["build"]) if k not in ignore
                and have["build"].get(k) != want["build"].get(k)]
        diff += [k for k in ("vae", "unet", "text") if have[k] != want[k]]
        if diff:
            raise SystemExit(f"{scratch} holds a build with another config ({', '.join(sorted(diff))}); "
                             f"use another --scratch or delete it")
    p.write_text(json.dumps(want, indent=1))


def update_readme(readme: Path, rep: dict, written: dict, cfg: BuildConfig, minutes: float, runs: int,
                  grid_name: str) -> None:
    begin, end = "<!-- build:results -->", "<!-- /build:results -->"
    text = readme.read_text() if readme.exists() else ""
    if begin not in text or end not in text:
        log(f"{readme} has no results markers; not updated")
        return
    f = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [begin, "", f"Built by `python weights/build_tiny.py` (seed {cfg.seed}, torch {torch.__version__}) "
             f"in {minutes:.0f} min on {torch.get_num_threads()} threads ({runs} run(s), resumes included).", "",
             "| measure | value |", "|---|---|",
             f"| file size | {written['bytes'] / 1e6:.1f} MB, {written['parameters']:,} parameters |"]
    for k in ("vae_heldout_l1", "vae_heldout_psnr_db", "unet_train_loss_final", "unet_heldout_loss",
              "fidelity_own_caption", "fidelity_other_caption", "concept_score_described", "concept_score_init_word"):
        lines.append(f"| {k} | {f(rep[k])} |")
    lines += ["", f"![samples]({grid_name})", "", "Grid rows (left: the generator's rendering of the caption; "
              "then 4 seeds):", ""] + [f"{i + 1}. {c}" for i, c in enumerate(rep["grid_captions"])] + ["", end]
    a, b = text.index(begin), text.index(end) + len(end)
    readme.write_text(text[:a] + "\n".join(lines) + text[b:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="every stage for a few steps (tests; < 1 min)")
    ap.add_argument("--out", type=Path, default=HERE / "minti-tiny.safetensors", help="model file to write")
    ap.add_argument("--scratch", type=Path, default=None,
                    help="stage checkpoints; resume by rerunning (default runs/build-tiny[-quick])")
    ap.add_argument("--demo-dir", type=Path, default=HERE / "demo-concept", help="concept images to write")
    ap.add_argument("--grid", type=Path, default=HERE / "tiny-samples.png", help="sample grid to write")
    ap.add_argument("--readme", type=Path, default=HERE / "README.md",
                    help="README whose results block is filled in (full builds only)")
    ap.add_argument("--estimate", action="store_true",
                    help="time a few steps of every stage and print how long the build would take")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--unet-steps", type=int, default=None, help="override the UNet step count")
    ap.add_argument("--vae-steps", type=int, default=None, help="override the VAE step count")
    args = ap.parse_args(argv)

    cfg = BuildConfig(seed=args.seed, threads=args.threads)
    if args.quick:
        cfg = quick(cfg)
    if args.unet_steps is not None:
        cfg = dataclasses.replace(cfg, unet_steps=args.unet_steps)
    if args.vae_steps is not None:
        cfg = dataclasses.replace(cfg, vae_steps=args.vae_steps)
    if args.estimate:
        torch.set_num_threads(cfg.threads)
        trainable_ops()
        estimate(cfg)
        return 0
    scratch = args.scratch or HERE.parent / "runs" / ("build-tiny-quick" if args.quick else "build-tiny")
    check_scratch(cfg, scratch)
    torch.set_num_threads(cfg.threads)
    trainable_ops()
    t0 = time.time()
    log(f"build: {'quick' if args.quick else 'full'}, scratch {scratch}")
    try:
        result = build(args, cfg, scratch)
    finally:  # interrupted runs count too: the README reports the whole build's time
        runs, seconds = add_build_time(scratch, time.time() - t0)
    if not args.quick:
        update_readme(args.readme, result["report"], result["written"], cfg, seconds / 60, runs, args.grid.name)
    log(f"done: this run {(time.time() - t0) / 60:.1f} min, the build {seconds / 60:.0f} min over {runs} run(s)")
    return 0


def add_build_time(scratch: Path, seconds: float) -> tuple[int, float]:
    """Add one run's wall time to the scratch folder's total; -> (runs, total seconds)."""
    p = scratch / "build-time.json"
    have = json.loads(p.read_text()) if p.exists() else {"runs": 0, "seconds": 0.0}
    have = {"runs": have["runs"] + 1, "seconds": have["seconds"] + seconds}
    p.write_text(json.dumps(have))
    return have["runs"], have["seconds"]


def build(args: argparse.Namespace, cfg: BuildConfig, scratch: Path) -> dict:
    """Every stage in order (each resumes from scratch/ or skips when done); -> report, file facts."""
    data = stage_data(cfg, scratch)
    vae = stage_vae(cfg, data, scratch).eval()
    lat = stage_latents(data, vae, scratch)
    tok = Tokenizer.from_openclip_vocab(pad_token_id=TEXT.pad_token_id)
    unet, te, history = stage_unet(cfg, data, lat, tok, scratch)
    unet.eval(), te.eval()
    # the VAE ships in fp16 too: report and sample with the rounded weights
    with torch.no_grad():
        for p in vae.parameters():
            p.copy_(p.half().float())
    rep = stage_report(cfg, data, lat, vae, unet, te, tok, history, scratch, args.grid)
    for k, v in rep.items():
        if k != "grid_captions":
            log(f"report {k}: {v:.4f}" if isinstance(v, float) else f"report {k}: {v}")
    demo = stage_concept(cfg, args.demo_dir)
    log(f"concept: {len(demo)} images in {args.demo_dir}")
    meta = dict(minti_build=f"weights/build_tiny.py seed={cfg.seed} quick={args.quick}",
                concept=toy_images.caption(toy_images.Attributes(**toy_images.CONCEPT)), init_word=toy_images.CONCEPT_CAPTION_INIT)
    written = stage_write(unet, vae, te, args.out, meta)
    log(f"wrote {args.out}: {written['bytes'] / 1e6:.1f} MB, {written['tensors']} tensors")
    log(verify_load(args.out, unet, vae, te, tok))
    return {"report": rep, "written": written}


if __name__ == "__main__":
    sys.exit(main())
