"""Which path each hot op takes, its Triton kernel or torch: decided here and nowhere else.

minti.models.ops asks `choose` before each call of attention, GroupNorm+SiLU and GEGLU, and
passes the answer to the kernel; `doctor` and the start of every run print
`describe_backends`. The rules, under BACKEND "auto": Triton on a CUDA device that Triton
compiles for in the input's dtype (triton_unusable_reason) and where the op's kernel takes
the input (KERNEL_LIMITS); torch everywhere else (the CPU, MPS, GTX 10xx, no Triton).
"torch" and "triton" force one path; a forced "triton" that cannot run raises in the kernel
rather than quietly taking torch.

The kernels (below the models) keep the facts read here: whether Triton is installed or
interpreted (minti.kernels.launch), each GPU's limits and block configs
(minti.kernels.configs), what the attention kernels take, and which ops failed to launch. A
failed launch falls back to torch inside the kernel's own call (launch.with_fallback: that
call may be an autograd backward, which cannot call back up here) and stays on torch after;
launch.STRICT makes it raise instead. A new kind of GPU (ROCm) adds its limits to
configs.device_limits and its reason to triton_unusable_reason.
"""
from __future__ import annotations

from typing import Callable

import torch

import minti.kernels.configs as configs
import minti.kernels.launch as launch
from minti.kernels.flash_attention import triton_unsupported as attention_unsupported

BACKENDS = ("auto", "torch", "triton")
OPS = ("attention", "group_norm_silu", "geglu")
# What an op's Triton kernel cannot take beyond the device's rules: input -> why not, or None.
KERNEL_LIMITS: dict[str, Callable[[torch.Tensor], str | None]] = {"attention": attention_unsupported}

# "auto": Triton on CUDA sm_75+ (bf16 on sm_80+), torch elsewhere; "torch" / "triton" force one path (tests use this).
BACKEND = "auto"


def set_backend(name: str) -> None:
    global BACKEND
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: use auto, torch or triton")
    BACKEND = name


def triton_unusable_reason(device: torch.device | str, dtype: torch.dtype) -> str | None:
    """Why "auto" will not run Triton kernels for this device and dtype, None if it will."""
    limits = configs.device_limits(device)
    if limits is None:
        return "not a CUDA device"
    sm = f"sm_{limits.capability[0]}{limits.capability[1]}"
    if not limits.runs_triton:
        return f"{sm} is older than sm_75, which Triton needs"
    if not configs.dtype_supported(dtype, limits):
        return f"{sm} has no bf16 in Triton (use --dtype float16 for the kernels)"
    return None


def choose(op: str, x: torch.Tensor, backend: str | None = None) -> str:
    """The path, "torch" or "triton", that op takes on input x under backend (BACKEND if None)."""
    backend = BACKEND if backend is None else backend
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: use one of {BACKENDS}")
    if backend != "auto":
        return backend
    if not (x.is_cuda and launch.HAS_TRITON) or triton_unusable_reason(x.device, x.dtype) is not None:
        return "torch"
    limit = KERNEL_LIMITS.get(op)
    return "torch" if limit is not None and limit(x) is not None else "triton"


def describe_backends(device: torch.device | str, dtype: torch.dtype, backend: str | None = None) -> str:
    """One line: which path each op takes on device in dtype under backend (BACKEND if None), and why."""
    backend = BACKEND if backend is None else backend
    device = torch.device(device)
    reason = None if launch.HAS_TRITON else "Triton is not installed"
    if backend == "torch":
        reason = "backend='torch' was asked for"
    elif reason is None and backend == "auto":
        reason = triton_unusable_reason(device, dtype)
    elif reason is None and device.type != "cuda" and not launch.INTERPRETED:
        reason = "backend='triton' needs CUDA"
    paths = []
    for op in OPS:
        if reason is not None:
            paths.append(f"{op} torch")
        elif op in launch.FAILED_OPS:
            paths.append(f"{op} torch (its Triton launch failed: {launch.FAILED_OPS[op]})")
        else:
            paths.append(f"{op} triton")
    why = f" ({reason})" if reason else ""
    return f"kernels on {device} in {str(dtype).removeprefix('torch.')}: " + ", ".join(paths) + why
