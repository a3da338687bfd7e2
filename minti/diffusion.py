"""The diffusion process every SD model was trained with, written once.

Noise: SD 1.x, 2.x and XL all use "scaled linear" betas, 0.00085 -> 0.012 over 1000 steps
(linear in sqrt(beta)). Training draws t, mixes noise in with `add_noise` and regresses the
model's prediction type (`target`): eps, or v for SD 2.x 768 models. `to_x0` reads a model
output back as (x0, eps), which is all a sampler needs, so every sampler works for both types.
`diffusion_loss` is the training objective: the trainer, the demo's held-out loss, the memory
estimate and the tiny model's build all call it.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012
PREDICTIONS = ("eps", "v")


def alphas_cumprod(num_steps: int = NUM_TRAIN_TIMESTEPS, beta_start: float = BETA_START,
                   beta_end: float = BETA_END) -> torch.Tensor:
    """alpha-bar_t for t = 0..num_steps-1, float64 (cast where it is used).

    float64 so that sqrt(1 - alpha-bar) near t=0 keeps its digits; diffusers builds the same
    numbers in float32 and they agree to float32 rounding.
    """
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def _gather(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # One scalar per batch item, broadcast over [C,H,W].
    out = values.to(like.device)[t.to(like.device).long()].to(like.dtype)
    return out.reshape(-1, *([1] * (like.ndim - 1)))


def _check(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction type {prediction!r}: expected 'eps' or 'v'")


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, acp: torch.Tensor) -> torch.Tensor:
    """Forward process q(x_t | x_0): sqrt(a_t) x_0 + sqrt(1 - a_t) eps. t: LongTensor [B]."""
    a = _gather(acp, t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def target(prediction: str, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
           acp: torch.Tensor) -> torch.Tensor:
    """What the UNet should output at (x_t, t): the noise for eps models, v (Salimans & Ho:
    sqrt(a_t) eps - sqrt(1 - a_t) x_0) for v models."""
    _check(prediction)
    if prediction == "eps":
        return noise
    a = _gather(acp, t, x0)
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def to_x0(prediction: str, out: torch.Tensor, x_t: torch.Tensor, a: torch.Tensor | float
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) from the model output `out` at x_t = sqrt(a) x0 + sqrt(1 - a) eps, where `a` is
    alpha-bar: a tensor that broadcasts, or a Python float (its square roots then keep float64
    digits, which the Euler sampler needs near sigma 0)."""
    _check(prediction)
    if isinstance(a, float):
        root_a, root_1ma = math.sqrt(a), math.sqrt(1.0 - a)
    else:
        root_a, root_1ma = a.sqrt(), (1 - a).sqrt()
    if prediction == "eps":
        return (x_t - root_1ma * out) / root_a, out
    return root_a * x_t - root_1ma * out, root_a * out + root_1ma * x_t


def diffusion_loss(unet: nn.Module, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                   context: torch.Tensor, y: torch.Tensor | None = None, *, prediction: str = "eps",
                   weights: torch.Tensor | list[torch.Tensor | None] | None = None, acp: torch.Tensor | None = None,
                   reduction: str = "mean", groups: list[int] | None = None) -> torch.Tensor:
    """The denoising objective: MSE between unet(x_t, t, context, y) and the prediction target.

    x0 are (scaled) latents, t LongTensor [B]; the UNet runs in the dtype of `context` (the
    model's), the loss in float32 whatever that dtype. `weights` [B,1,h,w] (alpha masks) weight
    each latent pixel, normalised by their mass so masking part of an image does not shrink the
    step. reduction "sum" returns the summed squared error (no weights), for exact averages
    over several batches. `groups`: sizes of consecutive runs of samples that share one forward
    pass but not a loss (several concepts in one batch); returns one loss per group, each the
    mean over its own samples, so that no group's gradient depends on the others. `weights` is
    then a list with one tensor or None per group.
    """
    x0 = x0.float()
    acp = (alphas_cumprod() if acp is None else acp).to(x0.device, torch.float32)
    x_t = add_noise(x0, noise.to(x0.device), t.to(x0.device), acp)
    goal = target(prediction, x0, noise.to(x0.device), t.to(x0.device), acp)
    pred = unet(x_t.to(context.dtype), t.to(x0.device), context, y).float()
    err = (pred - goal) ** 2
    if reduction == "sum":
        return err.sum()
    if groups is None:
        return _mean_error(err, weights)
    weights = [None] * len(groups) if weights is None else weights
    return torch.stack([_mean_error(e, w) for e, w in zip(err.split(groups), weights, strict=True)])


def _mean_error(err: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        return err.mean()
    w = weights.to(err.device, torch.float32)
    return (err * w).sum() / (w.sum() * err.shape[1]).clamp(min=1e-8)
