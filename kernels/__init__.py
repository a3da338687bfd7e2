"""Triton kernels with their pure-torch references, imported as `minti.kernels`.

Every kernel file works without CUDA and without Triton installed: the torch path is
always there, and Triton is imported under a guard. minti.models.ops routes the models' hot ops
to the three names exported at the bottom of this file.

The small helpers below are shared by the three kernel files; they are defined before the
kernel files are imported so `from minti.kernels import resolve_backend` works from them.
"""
from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "torch", "triton")

# Tests flip this to True: every output buffer a kernel (or the torch path) writes into is
# then NaN-filled first, so an element the kernel forgot to write fails the comparison.
POISON_OUTPUTS = False


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a buffer that the caller fully overwrites (NaN-poisoned under tests)."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def triton_interpreted() -> bool:
    """True when Triton runs kernels through its numpy interpreter (CPU tensors allowed).

    triton.jit reads TRITON_INTERPRET when a kernel is *decorated*, i.e. when the kernel
    files are imported, so the variable must be set before `import minti.kernels`.
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, x: torch.Tensor, has_triton: bool, interpreted: bool) -> str:
    """Turn "auto" into "triton" or "torch"; make "triton" fail loudly when it cannot run.

    has_triton: the calling kernel file imported Triton; interpreted: its kernels were
    decorated with TRITON_INTERPRET=1 (so they accept CPU tensors).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: use one of {BACKENDS}")
    if backend == "auto":
        return "triton" if (x.is_cuda and has_triton) else "torch"
    if backend == "triton":
        if not has_triton:
            raise RuntimeError("backend='triton' but Triton is not installed (pip install triton), "
                               "use backend='torch' or 'auto'")
        if x.device.type == "meta":  # shape propagation only: any path gives the same shapes
            return "torch"
        if not x.is_cuda and not interpreted:
            raise RuntimeError("backend='triton' needs CUDA tensors; for CPU tensors set "
                               "TRITON_INTERPRET=1 before importing minti.kernels")
    return backend


from minti.kernels.flash_attention import flash_attention  # noqa: E402
from minti.kernels.geglu import geglu  # noqa: E402
from minti.kernels.group_norm_silu import group_norm_silu  # noqa: E402

__all__ = ["flash_attention", "group_norm_silu", "geglu"]
