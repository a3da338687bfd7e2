"""Schedules: the diffusion noise schedule every SD model was trained with, and learning rates.

Noise: SD 1.x, 2.x and XL all use "scaled linear" betas, 0.00085 -> 0.012 over 1000 steps
(linear in sqrt(beta)). Training draws t uniformly, mixes noise in with add_noise, and
regresses eps or v depending on the model's prediction type.

Learning rate: a function of the optimizer step (0-based), so a resumed run recomputes it
exactly instead of carrying scheduler state around.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012


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


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, acp: torch.Tensor) -> torch.Tensor:
    """Forward process q(x_t | x_0): sqrt(a_t) x_0 + sqrt(1 - a_t) eps. t: LongTensor [B]."""
    a = _gather(acp, t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def v_target(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, acp: torch.Tensor) -> torch.Tensor:
    """v-prediction target (Salimans & Ho): sqrt(a_t) eps - sqrt(1 - a_t) x_0 (SD 2.x 768 models)."""
    a = _gather(acp, t, x0)
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def target(prediction: str, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
           acp: torch.Tensor) -> torch.Tensor:
    """What the UNet should output at (x_t, t): the noise for eps models, v for v models."""
    if prediction == "eps":
        return noise
    if prediction == "v":
        return v_target(x0, noise, t, acp)
    raise ValueError(f"unknown prediction type {prediction!r}: expected 'eps' or 'v'")


# ---------------------------------------------------------------- learning-rate schedules

LR_SCHEDULES = ("constant", "cosine", "linear")


def parse_a1111(text: str) -> list[tuple[float, int | None]]:
    """A1111's learning-rate syntax: "0.005:100, 1e-3:1000, 1e-5".

    Each "rate:step" holds `rate` until optimizer step `step` (exclusive, counting from 0, as in
    A1111 where the step counter is compared with `step`); a rate without ":step" holds for the
    rest of training and ends the list. Returns [(rate, end_step or None)].
    """
    pairs: list[tuple[float, int | None]] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        rate_text, _, end_text = part.partition(":")
        try:
            rate = float(rate_text)
            end = int(end_text) if end_text.strip() else None
        except ValueError:
            raise ValueError(f"cannot read learning-rate schedule {text!r} at {part!r}: "
                             "write it as 'rate:step, rate:step, rate', e.g. '0.005:100, 1e-3:1000, 1e-5'") from None
        if rate < 0 or not math.isfinite(rate):
            raise ValueError(f"learning rate {rate_text.strip()!r} in {text!r} must be a finite number >= 0")
        if end is not None and pairs and pairs[-1][1] is not None and end <= pairs[-1][1]:
            raise ValueError(f"learning-rate schedule {text!r}: steps must increase ({end} after {pairs[-1][1]})")
        if end == -1:  # A1111 allows "rate:-1" for "until the end"
            end = None
        pairs.append((rate, end))
        if end is None:
            break
    if not pairs:
        raise ValueError(f"empty learning-rate schedule {text!r}")
    return pairs


@dataclass
class LRSchedule:
    """lr(step) for step = 0, 1, ... total_steps-1.

    kind: "constant" | "cosine" (to 0 at total_steps) | "linear" (to 0 at total_steps) | "a1111".
    warmup_steps: linear ramp from 0 to the base rate first (not for "a1111", which is explicit).
    """
    base_lr: float
    kind: str = "constant"
    total_steps: int = 1
    warmup_steps: int = 0
    pairs: list[tuple[float, int | None]] | None = None  # for kind == "a1111"

    def __call__(self, step: int) -> float:
        if self.kind == "a1111":
            assert self.pairs is not None
            for rate, end in self.pairs:
                if end is None or step < end:
                    return rate
            return self.pairs[-1][0]  # past the last explicit end: keep the last rate
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.base_lr
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        if self.kind == "cosine":
            return self.base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.kind == "linear":
            return self.base_lr * (1.0 - progress)
        raise ValueError(f"unknown lr schedule {self.kind!r}")


def make_lr_schedule(lr: float | str, schedule: str = "constant", total_steps: int = 1,
                     warmup_steps: int = 0) -> LRSchedule:
    """Build the schedule from the user's two knobs.

    `lr` is a number, or A1111's "rate:step, ..." text (as A1111 users type it in its learning
    rate box); `schedule` is constant|cosine|linear, or also the A1111 text.
    """
    if warmup_steps < 0:
        raise ValueError(f"warmup steps must be >= 0, got {warmup_steps}")
    if isinstance(schedule, str) and schedule not in LR_SCHEDULES:
        if any(c.isdigit() for c in schedule):
            return LRSchedule(base_lr=0.0, kind="a1111", total_steps=total_steps, pairs=parse_a1111(schedule))
        raise ValueError(f"unknown lr schedule {schedule!r}: use constant, cosine, linear, "
                         "or A1111's syntax like '0.005:100, 1e-3:1000, 1e-5'")
    if isinstance(lr, str):
        text = lr.strip()
        if ":" in text or "," in text:
            if schedule != "constant":
                raise ValueError(f"--lr {lr!r} is already a schedule; drop --lr-schedule {schedule}")
            return LRSchedule(base_lr=0.0, kind="a1111", total_steps=total_steps, pairs=parse_a1111(text))
        try:
            lr = float(text)
        except ValueError:
            raise ValueError(f"cannot read learning rate {lr!r}: give a number like 5e-3 "
                             "or A1111's syntax like '0.005:100, 1e-3:1000, 1e-5'") from None
    if lr < 0 or not math.isfinite(lr):
        raise ValueError(f"learning rate must be a finite number >= 0, got {lr}")
    return LRSchedule(base_lr=float(lr), kind=schedule, total_steps=total_steps, warmup_steps=warmup_steps)
