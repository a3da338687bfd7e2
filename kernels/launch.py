"""What every kernel file shares: its two paths, where Triton runs, the output buffers, and
what happens when a Triton launch cannot run on this GPU.

The kernel files run the path they are given, "torch" or "triton"; minti.models.backends
decides which (the "auto" rules, the description the run log and `doctor` print) and reads
the state kept here. The fallback after a failed launch lives here rather than there because
it must also catch a launch inside an autograd backward, which runs in the kernels' own
autograd wrappers, below minti.models.
"""
from __future__ import annotations

import os
import warnings
from collections import Counter
from typing import Callable, TypeVar

import torch

try:  # Triton is optional (no wheels for macOS): every kernel file keeps a torch path
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources
except ImportError:
    HAS_TRITON = False
    LAUNCH_ERRORS: tuple[type[BaseException], ...] = ()
else:
    HAS_TRITON = True
    # What a Triton launch raises when a config cannot run on this device (too little shared
    # memory or registers, a compile error). Any other error is a bug and propagates.
    LAUNCH_ERRORS = (OutOfResources, CompilationError)

PATHS = ("torch", "triton")


def triton_interpreted() -> bool:
    """True when Triton runs kernels through its numpy interpreter (CPU tensors allowed).

    triton.jit reads TRITON_INTERPRET when a kernel is *decorated*, i.e. when the kernel
    files are imported, so the variable must be set before `import minti.kernels`.
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Read once, as the kernel files (which import this module first) are decorated.
INTERPRETED = triton_interpreted()


def check_path(op: str, backend: str) -> None:
    if backend not in PATHS:
        raise ValueError(f"unknown backend {backend!r}: {op} runs one of {PATHS} "
                         f"(minti.models.ops decides between them under 'auto')")


def check_triton_runs(x: torch.Tensor) -> None:
    """Raise why backend='triton' cannot run on x here: Triton missing, or CPU tensors
    without the interpreter. Meta tensors pass: any path gives the same shapes."""
    if not HAS_TRITON:
        raise RuntimeError("backend='triton' but Triton is not installed (pip install triton), "
                           "use backend='torch'")
    if not (x.is_cuda or x.is_meta or INTERPRETED):
        raise RuntimeError("backend='triton' needs CUDA tensors; for CPU tensors set "
                           "TRITON_INTERPRET=1 before importing minti.kernels")


# Tests flip this to True: every output buffer a kernel (or the torch path) writes into is
# then NaN-filled first, so an element the kernel forgot to write fails the comparison.
POISON_OUTPUTS = False


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a buffer that the caller fully overwrites (NaN-poisoned under tests)."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the torch paths accumulate in: fp32 for halves, fp64 stays fp64."""
    return torch.promote_types(dtype, torch.float32)


# op name -> why its Triton kernel failed to launch; such an op takes the torch path from then on.
FAILED_OPS: dict[str, str] = {}
# op name -> Triton calls (forwards and backwards) that ran: tests check that a Triton case ran Triton.
TRITON_RUNS: Counter[str] = Counter()
# A failed launch raises instead of falling back. The tests set it, so that a test of the
# Triton path cannot pass on the torch path's numbers; MINTI_STRICT_KERNELS=1 sets it for a run.
STRICT = os.environ.get("MINTI_STRICT_KERNELS", "0") == "1"

T = TypeVar("T")


def with_fallback(op: str, triton_call: Callable[[], T], torch_call: Callable[[], T]) -> T:
    """Run triton_call(); if it cannot launch here (out of shared memory or registers, a
    compile error), warn once and run torch_call() now and for every later call of op.
    A config that fits no device is a bug bench/compile_targets.py should have caught; a
    training run survives it at the torch path's speed."""
    if op not in FAILED_OPS:
        try:
            result = triton_call()
        except LAUNCH_ERRORS as e:
            if STRICT:
                raise
            FAILED_OPS[op] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            warnings.warn(f"minti: the Triton {op} kernel cannot run on this GPU ({FAILED_OPS[op]}); "
                          f"{op} takes the torch path from now on. Please report this with the "
                          f"output of `python -m minti doctor`.", RuntimeWarning, stacklevel=2)
        else:
            TRITON_RUNS[op] += 1
            return result
    return torch_call()
