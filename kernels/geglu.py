"""GEGLU: a * gelu(gate) with a, gate = x.chunk(2, -1) (exact erf gelu, as diffusers).

x is the output of the feed-forward projection, [..., 2F] with F = 4C (8C wide in all).
Plain autograd saves x *and* gelu(gate) (or a and gate as views plus the gelu output);
here forward and backward are one op that saves only x and recomputes gelu(gate) and its
derivative in the backward: one [..., 2F] tensor per transformer block instead of two.

Math is fp32 whatever the input dtype; results are rounded once to x.dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from minti.kernels.launch import INTERPRETED, acc_dtype, check_path, check_triton_runs, new_output, with_fallback

try:  # Triton is optional (no wheels for macOS): the torch path still works
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def geglu_reference(x: torch.Tensor) -> torch.Tensor:
    """Plain autograd GEGLU in x's dtype (tests call it in float64)."""
    a, gate = x.chunk(2, dim=-1)
    return a * F.gelu(gate)


# ----------------------------------------------------------------------------- torch path

# torch's fused GELU and its backward op, a handful of ops each way in the accumulation
# dtype (a no-op cast for fp32 inputs). Only x is saved (see the autograd function below):
# plain autograd over a * gelu(gate) would also keep gelu(gate), [..., F] per call.

def _torch_fwd(x: torch.Tensor) -> torch.Tensor:
    a, gate = x.to(acc_dtype(x.dtype)).chunk(2, dim=-1)
    out = F.gelu(gate)
    return out.mul_(a).to(x.dtype)


def _torch_bwd(x: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    a, gate = x.to(acc_dtype(x.dtype)).chunk(2, dim=-1)
    dout = dout.to(a.dtype)
    da = F.gelu(gate).mul_(dout)  # d/da: gelu(gate)
    dgate = torch.ops.aten.gelu_backward(dout * a, gate)  # d/dgate: a * gelu'(gate)
    dx = torch.cat([da, dgate], dim=-1)
    return dx.to(x.dtype)


# ----------------------------------------------------------------------------- Triton kernels

if triton is not None:
    @triton.jit
    def _load_halves(X, n_out, F_half, stride_row, BLOCK: tl.constexpr):
        """This program's BLOCK elements of the [R, F] output: their flat offsets, mask, row
        and column, and a and gate from x (row r holds a at [0, F), gate at [F, 2F)), fp32."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_out
        row = offs // F_half
        col = offs % F_half
        a = tl.load(X + row * stride_row + col, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(X + row * stride_row + F_half + col, mask=mask, other=0.0).to(tl.float32)
        return offs, mask, row, col, a, g

    @triton.jit
    def geglu_fwd(X, OUT, n_out, F_half, stride_row, BLOCK: tl.constexpr):
        """Elementwise over the [R, F] output."""
        offs, mask, row, col, a, g = _load_halves(X, n_out, F_half, stride_row, BLOCK)
        gelu = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
        tl.store(OUT + offs, (a * gelu).to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def geglu_bwd(X, DOUT, DX, n_out, F_half, stride_row, BLOCK: tl.constexpr):
        offs, mask, row, col, a, g = _load_halves(X, n_out, F_half, stride_row, BLOCK)
        do = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        pdf = tl.exp(-0.5 * g * g) * 0.3989422804014327
        # dx is written contiguous [R, 2F].
        tl.store(DX + row * 2 * F_half + col, (do * g * cdf).to(DX.dtype.element_ty), mask=mask)
        tl.store(DX + row * 2 * F_half + F_half + col, (do * a * (cdf + g * pdf)).to(DX.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [R, 2F] with unit stride along the last dim (copies only if it must)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


CUDA_BLOCK = 1024  # elements per program on a GPU (bench/compile_targets.py compiles this)


def _block(x: torch.Tensor) -> int:
    return CUDA_BLOCK if (x.is_cuda and not INTERPRETED) else 4096  # the interpreter likes big blocks


def _triton_fwd(x: torch.Tensor) -> torch.Tensor:
    x2 = _rows(x)
    f = x.shape[-1] // 2
    out = new_output((*x.shape[:-1], f), x.dtype, x.device)
    n = out.numel()
    block = _block(x)
    geglu_fwd[(triton.cdiv(n, block),)](x2, out, n, f, x2.stride(0), BLOCK=block)
    return out


def _triton_bwd(x: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    x2 = _rows(x)
    f = x.shape[-1] // 2
    dout = dout.contiguous()
    dx = new_output(x.shape, x.dtype, x.device)
    n = dout.numel()
    block = _block(x)
    geglu_bwd[(triton.cdiv(n, block),)](x2, dout, dx, n, f, x2.stride(0), BLOCK=block)
    return dx


# ----------------------------------------------------------------------------- autograd

class _GEGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, use_triton: bool) -> torch.Tensor:
        ctx.save_for_backward(x)  # the only saved tensor: gelu(gate) is recomputed
        ctx.use_triton = use_triton
        if x.is_meta:  # memory tracing: allocate what the fused kernel allocates, no temporaries
            return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)
        if use_triton:
            return with_fallback("geglu", lambda: _triton_fwd(x), lambda: _torch_fwd(x))
        return _torch_fwd(x)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        (x,) = ctx.saved_tensors
        if x.is_meta:
            return torch.empty_like(x), None
        if ctx.use_triton:
            dx = with_fallback("geglu", lambda: _triton_bwd(x, dout), lambda: _torch_bwd(x, dout))
        else:
            dx = _torch_bwd(x, dout)
        return dx, None


def geglu(x: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    """a * gelu(gate) for a, gate = x.chunk(2, -1); [..., 2F] -> [..., F]. Saves only x.
    backend: "triton" (CUDA, or CPU under TRITON_INTERPRET=1) or "torch"."""
    if x.shape[-1] % 2:
        raise ValueError(f"geglu needs an even last dim, got {x.shape[-1]}")
    check_path("geglu", backend)
    if backend == "triton":
        check_triton_runs(x)
    return _GEGLU.apply(x, backend == "triton" and not x.is_meta)  # meta: shapes only
