"""Triton kernels with their pure-torch references, imported as `minti.kernels`.

Every kernel file works without CUDA and without Triton installed: the torch path is
always there, and Triton is imported under a guard. minti.models.ops routes the models' hot ops
to the three names exported at the bottom of this file.

The small helpers below are shared by the three kernel files; they are defined before the
kernel files are imported so `from minti.kernels import resolve_backend` works from them.
"""
from __future__ import annotations

import dataclasses
import os
import warnings

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


@dataclasses.dataclass(frozen=True)
class DeviceLimits:
    """What the kernels' launchers need to know about a GPU: a pure value, so config pruning
    can be tested with made-up devices."""
    capability: tuple[int, int]
    shared_bytes: int  # max dynamic shared memory per block, opt-in

    @property
    def runs_triton(self) -> bool:
        return self.capability >= (7, 5)  # Triton emits no code for Pascal (sm_6x) or older

    @property
    def has_bf16(self) -> bool:
        return self.capability >= (8, 0)  # Triton has no bf16 arithmetic before Ampere


KIB = 1024
# Per-block opt-in shared memory of each compute capability (CUDA C Programming Guide,
# "Technical Specifications per Compute Capability"); bench/compile_targets.py compiles for these.
TARGET_LIMITS = {
    "sm_75": DeviceLimits((7, 5), 64 * KIB),
    "sm_80": DeviceLimits((8, 0), 163 * KIB),
    "sm_86": DeviceLimits((8, 6), 99 * KIB),
    "sm_89": DeviceLimits((8, 9), 99 * KIB),
    "sm_90": DeviceLimits((9, 0), 227 * KIB),
    "sm_120": DeviceLimits((12, 0), 99 * KIB),
}


def device_limits(device: torch.device) -> DeviceLimits | None:
    """The limits of a CUDA device, None for any other device."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return DeviceLimits((props.major, props.minor), props.shared_memory_per_block_optin)


def dtype_supported(dtype: torch.dtype, limits: DeviceLimits) -> bool:
    return limits.runs_triton and (dtype != torch.bfloat16 or limits.has_bf16)


def triton_unusable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why "auto" will not run Triton kernels for this device and dtype, None if it will."""
    limits = device_limits(device)
    if limits is None:
        return "not a CUDA device"
    sm = f"sm_{limits.capability[0]}{limits.capability[1]}"
    if not limits.runs_triton:
        return f"{sm} is older than sm_75, which Triton needs"
    if not dtype_supported(dtype, limits):
        return f"{sm} has no bf16 in Triton (use --dtype float16 for the kernels)"
    return None


def resolve_backend(backend: str, x: torch.Tensor, has_triton: bool, interpreted: bool) -> str:
    """Turn "auto" into "triton" or "torch"; make "triton" fail loudly when it cannot run.

    has_triton: the calling kernel file imported Triton; interpreted: its kernels were
    decorated with TRITON_INTERPRET=1 (so they accept CPU tensors). "auto" takes Triton
    only on a CUDA device that can run it in x's dtype (see triton_unusable_reason).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: use one of {BACKENDS}")
    if backend == "auto":
        usable = x.is_cuda and has_triton and triton_unusable_reason(x.device, x.dtype) is None
        return "triton" if usable else "torch"
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


# op name -> why its Triton kernel failed to launch; such an op takes the torch path from then on.
FAILED_OPS: dict[str, str] = {}


def launch_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a Triton launch raises when a config cannot run on this device."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    return OutOfResources, CompilationError


def with_fallback(op: str, triton_call, torch_call):
    """Run triton_call(); if it cannot launch here (out of shared memory or registers, a
    compile error), warn once and run torch_call() now and for every later call of op.
    A config that fits no device is a bug bench/compile_targets.py should have caught; a
    training run survives it at the torch path's speed."""
    if op not in FAILED_OPS:
        try:
            return triton_call()
        except launch_errors() as e:
            FAILED_OPS[op] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            warnings.warn(f"minti: the Triton {op} kernel cannot run on this GPU ({FAILED_OPS[op]}); "
                          f"{op} takes the torch path from now on. Please report this with the "
                          f"output of `python -m minti doctor`.", RuntimeWarning, stacklevel=2)
    return torch_call()


OPS = ("attention", "group_norm_silu", "geglu")


def describe_backends(device: torch.device | str, dtype: torch.dtype, backend: str = "auto") -> str:
    """One line: which path each op takes on device in dtype, and why."""
    try:
        import triton  # noqa: F401
        reason = None
    except ImportError:
        reason = "Triton is not installed"
    device = torch.device(device)
    if backend == "torch":
        reason = "backend='torch' was asked for"
    elif reason is None and backend == "auto":
        reason = triton_unusable_reason(device, dtype)
    elif reason is None and device.type != "cuda" and not triton_interpreted():
        reason = "backend='triton' needs CUDA"
    dtype_name = str(dtype).removeprefix("torch.")
    paths = []
    for op in OPS:
        if reason is not None:
            paths.append(f"{op} torch")
        elif op in FAILED_OPS:
            paths.append(f"{op} torch (its Triton launch failed: {FAILED_OPS[op]})")
        else:
            paths.append(f"{op} triton")
    why = f" ({reason})" if reason else ""
    return f"kernels on {device} in {dtype_name}: " + ", ".join(paths) + why


from minti.kernels.flash_attention import flash_attention  # noqa: E402
from minti.kernels.geglu import geglu  # noqa: E402
from minti.kernels.group_norm_silu import group_norm_silu  # noqa: E402

__all__ = ["flash_attention", "group_norm_silu", "geglu", "describe_backends"]
