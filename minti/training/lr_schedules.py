"""Learning-rate schedules: a function of the optimizer step (0-based), so a resumed run
recomputes the rate exactly instead of carrying scheduler state around.

Constant, cosine or linear decay to 0 (with an optional linear warm-up), or A1111's
"rate:step, rate:step, rate" text as A1111 users type it in its learning-rate box.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

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
