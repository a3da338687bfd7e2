"""Norm control of the trained vectors, applied after every optimizer step (--norm, --max-norm).

A learned vector can drift far from the norms of the words the text encoder was trained on, and
then it dominates (or vanishes from) every prompt it is used in. Two remedies users know:

  preserve   rescale each vector to the median norm of its text encoder's token table
             (OneTrainer's approach): only its direction is learned
  max-norm   clip each vector's norm to X (a bound, the direction and smaller norms stay free)

Both act on the trained rows only, per text encoder (SDXL's two tables have different scales),
and both are idempotent, so an fp16 step skipped for overflow changes nothing. With both set,
preserve runs first and the clip bounds the result.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from minti.errors import UserError

MODES = ("off", "preserve")


def median_norm(table: torch.Tensor) -> float:
    """The median L2 norm of a [vocab, dim] token table's rows."""
    return float(table.detach().float().norm(dim=1).median())


@dataclass
class NormControl:
    targets: list[float] | None  # per text encoder: each vector's norm after a step (preserve), or None
    max_norm: float | None
    medians: list[float]  # the token tables' median norms, for the log line

    @classmethod
    def from_config(cls, mode: str, max_norm: float | None, tables: list[torch.Tensor]) -> NormControl:
        """`tables`: each text encoder's [vocab, dim] token table (read once, here)."""
        if mode not in MODES:
            raise UserError(f"unknown --norm {mode!r}: use {' or '.join(MODES)}")
        if max_norm is not None and not max_norm > 0:
            raise UserError(f"--max-norm must be > 0, got {max_norm}")
        medians = [median_norm(t) for t in tables] if (mode != "off" or max_norm is not None) else []
        return cls(medians if mode == "preserve" else None, max_norm, medians)

    @property
    def active(self) -> bool:
        return self.targets is not None or self.max_norm is not None

    def describe(self) -> str:
        """One line for the start of the run."""
        medians = ", ".join(f"{m:.4g}" for m in self.medians)
        parts = []
        if self.targets is not None:
            parts.append("each vector rescaled to its token table's median norm")
        if self.max_norm is not None:
            parts.append(f"each vector's norm clipped to {self.max_norm:g}")
        return f"norm control after every step: {' then '.join(parts)} (median norms: {medians})"

    @torch.no_grad()
    def apply(self, params: list[torch.Tensor]) -> None:
        """Rescale/clip every row of each [n, dim] tensor in place (one tensor per text encoder)."""
        if not self.active:
            return
        for i, p in enumerate(params):
            norms = p.norm(dim=1, keepdim=True).clamp_min(1e-12)  # a zero row stays zero
            if self.targets is not None:
                p.mul_(self.targets[i] / norms)
                norms = torch.full_like(norms, self.targets[i])
            if self.max_norm is not None:
                p.mul_((self.max_norm / norms).clamp(max=1.0))
