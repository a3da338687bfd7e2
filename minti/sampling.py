"""Deterministic samplers with classifier-free guidance: DDIM (eta 0) and Euler.

Used by `python -m minti sample` and by training previews, so a preview shows what sample
will draw. The step rules match diffusers' DDIMScheduler (SD's config: "leading" spacing,
steps_offset 1, set_alpha_to_one False) and EulerDiscreteScheduler ("linspace" spacing), which
tests/test_sampling.py checks on random tensors. weights/build_tiny.py samples its report with
`ddim` and `guided_model` too.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from PIL import Image

from minti.diffusion import NUM_TRAIN_TIMESTEPS, alphas_cumprod, to_x0

SAMPLERS = ("ddim", "euler")
# DDIM's timesteps are shifted up by one (SD's steps_offset), so at 1000 steps the first would be
# timestep 1000, past the schedule's last (999).
MAX_STEPS = NUM_TRAIN_TIMESTEPS - 1
# model_fn(x, t) -> eps or v for the batch x [B,C,h,w] at timestep(s) t (float tensor [B])
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def ddim_timesteps(steps: int, num_train: int = NUM_TRAIN_TIMESTEPS, offset: int = 1) -> list[int]:
    """SD's DDIM timesteps: every (num_train // steps)-th step from the top, shifted by 1."""
    if not 1 <= steps <= num_train - offset:
        raise ValueError(f"sampling steps must be in 1..{num_train - offset}, got {steps}")
    ratio = num_train // steps
    return [int(t) + offset for t in (np.arange(0, steps) * ratio).round()[::-1]]


class Denoiser:
    """A model that outputs eps or v, read as (x0, eps) through minti.diffusion.to_x0 (k-diffusion
    wraps its models the same way): every sampler steps on this, so each works for both types."""

    def __init__(self, model_fn: ModelFn, prediction: str) -> None:
        self.model_fn, self.prediction = model_fn, prediction

    def __call__(self, x_t: torch.Tensor, t: float, a: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model_fn(x_t, torch.full((x_t.shape[0],), float(t), device=x_t.device)).float()
        return to_x0(self.prediction, out, x_t, a)


@torch.no_grad()
def ddim(model_fn: ModelFn, x: torch.Tensor, steps: int, prediction: str = "eps",
         acp: torch.Tensor | None = None) -> torch.Tensor:
    """DDIM with eta 0 from pure noise x (= x_T, unit variance) to x_0. All math in float32."""
    acp = (alphas_cumprod() if acp is None else acp).to(x.device, torch.float64)
    denoise = Denoiser(model_fn, prediction)
    x = x.float()
    ts = ddim_timesteps(steps, len(acp))
    ratio = len(acp) // steps
    for t in ts:
        a = acp[t].float()
        prev = t - ratio
        a_prev = (acp[prev] if prev >= 0 else acp[0]).float()  # set_alpha_to_one=False, as SD ships
        x0, eps = denoise(x, t, a)
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


def euler_sigmas(steps: int, acp: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, sigmas+[0]) for Euler: timesteps evenly spaced over [0, 999], sigmas interpolated."""
    if steps < 1:
        raise ValueError(f"sampling steps must be >= 1, got {steps}")
    acp_np = acp.double().cpu().numpy()
    all_sigmas = ((1 - acp_np) / acp_np) ** 0.5
    timesteps = np.linspace(0, len(acp_np) - 1, steps, dtype=np.float64)[::-1].copy()
    sigmas = np.interp(timesteps, np.arange(len(all_sigmas)), all_sigmas)
    return timesteps, np.concatenate([sigmas, [0.0]])


@torch.no_grad()
def euler(model_fn: ModelFn, x: torch.Tensor, steps: int, prediction: str = "eps",
          acp: torch.Tensor | None = None) -> torch.Tensor:
    """Euler (no churn, deterministic) in sigma space from unit-variance noise x to x_0."""
    acp = alphas_cumprod() if acp is None else acp
    denoise = Denoiser(model_fn, prediction)
    timesteps, sigmas = euler_sigmas(steps, acp)
    # Unit noise scaled to the first sigma (diffusers uses sigma_max itself for "linspace" spacing;
    # sqrt(sigma^2 + 1) differs by under 0.3% at sigma_max = 14.6).
    x = x.float() * float(sigmas[0])
    for i, t in enumerate(timesteps):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        scale = (sigma ** 2 + 1) ** 0.5
        x0, _eps = denoise(x / scale, t, 1.0 / (sigma ** 2 + 1))  # x / scale is x_t at alpha-bar 1/scale^2
        x = x + (x - x0) / sigma * (sigma_next - sigma)
    return x


def initial_noise(seeds: list[int], shape: tuple[int, int, int]) -> torch.Tensor:
    """One noise tensor per seed, drawn on the CPU: image i is the same for the same seed,
    whatever the batch size or device."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def latent_factor(sd) -> int:
    """Pixels per latent pixel: 2 per VAE level below the first (8 for every real SD VAE)."""
    cfg = getattr(sd.vae, "cfg", None) if sd.vae is not None else None
    return 2 ** (len(cfg.ch_mult) - 1) if cfg is not None else 8


def latent_shape(sd, height: int, width: int) -> tuple[int, int, int]:
    """(channels, h, w) of the latents for an image of height x width."""
    factor = latent_factor(sd)
    if height % factor or width % factor:
        raise ValueError(f"image size {width}x{height} must be a multiple of {factor}")
    channels = getattr(getattr(sd.unet, "cfg", None), "in_channels", 4)
    return channels, height // factor, width // factor


def guided_model(unet: torch.nn.Module, context: torch.Tensor, y: torch.Tensor | None, guidance: float) -> ModelFn:
    """The ModelFn of a UNet with classifier-free guidance: `context` (and `y`) hold the
    unconditional rows, then the conditional ones, and the prediction is
    uncond + guidance * (cond - uncond); at guidance 1 that is cond alone, so `context` then
    holds only the conditional rows and the UNet runs once. The UNet runs in the dtype of `context`."""
    guided = guidance != 1.0

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x_in = torch.cat([x, x]) if guided else x
        t_in = torch.cat([t, t]) if guided else t
        out = unet(x_in.to(context.dtype), t_in.to(context.device), context, y).float()
        if not guided:
            return out
        uncond, cond = out.chunk(2)
        return uncond + guidance * (cond - uncond)

    return model_fn


@torch.no_grad()
def generate(sd, prompts: list[str], *, extra: list[torch.Tensor] | None = None, negative: str = "",
             steps: int = 30, guidance: float = 7.5, seeds: list[int] | None = None, height: int | None = None,
             width: int | None = None, method: str = "ddim", shape: tuple[int, int, int] | None = None
             ) -> torch.Tensor:
    """Sample latents for `prompts` (placeholders already registered with sd.add_placeholder and
    their vectors in `extra`) at classifier-free guidance scale `guidance` (1: unguided). Returns
    latents [B,C,h,w] float32; decode with sd.decode_latents. `shape` (C, h, w) skips asking
    the VAE for the latent size (training previews know it)."""
    if method not in SAMPLERS:
        raise ValueError(f"unknown sampler {method!r}: use {' or '.join(SAMPLERS)}")
    height = height or sd.default_size
    width = width or sd.default_size
    seeds = list(range(len(prompts))) if seeds is None else seeds
    noise = initial_noise(seeds, shape or latent_shape(sd, height, width)).to(sd.device)
    texts = ([negative] * len(prompts) if guidance != 1.0 else []) + list(prompts)
    extra_dev = None if extra is None else [v.to(sd.device, sd.dtype) for v in extra]
    context, pooled = sd.encode_tokens(sd.tokenize(texts), extra_dev)
    y = sd.size_condition(pooled, original_size=(height, width), crop=(0, 0), target_size=(height, width))
    run = ddim if method == "ddim" else euler
    return run(guided_model(sd.unet, context, y, guidance), noise, steps, sd.prediction)


HOST = torch.device("cpu")  # where the UNet and text encoders wait while the VAE decodes


@torch.no_grad()
def decode(sd, latents: torch.Tensor) -> torch.Tensor:
    """Latents [B,C,h,w] (as generate returns them) -> pixels [B,3,H,W] float32 on the CPU, in [-1,1].

    The VAE decodes one image at a time while the UNet and the text encoders wait on the host,
    and an offloaded VAE (training) is on the device only for this. Why: SDXL's VAE runs in fp32
    (it overflows in fp16) and its decoder's activations at 1024² are several times what a training
    step adds to the UNet and text encoder weights; without those weights on the device the decode
    needs less than the training step (bench/RESULTS.md has the modelled numbers)."""
    denoisers = [m for m in (sd.unet, *sd.text_encoders) if m is not None]
    vae_was_offloaded = sd.vae is None
    for module in denoisers:
        module.to(HOST)
    try:
        if vae_was_offloaded:
            sd.restore_vae(sd.device)
        try:
            pixels = torch.cat([sd.decode_latents(z.unsqueeze(0)).float().cpu() for z in latents])
        finally:
            if vae_was_offloaded:
                sd.offload_vae()
    finally:
        for module in denoisers:
            module.to(sd.device)
    return pixels


def to_pil(pixels: torch.Tensor) -> list:
    """[B,3,H,W] in [-1,1] -> PIL images."""
    arr = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]
