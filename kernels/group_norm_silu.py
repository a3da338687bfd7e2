"""GroupNorm followed by an optional SiLU, fused, with statistics in fp32.

x is [B, C, *spatial] (4D images, or 3D [B, C, L]). Plain autograd would keep x, the
normalised tensor and the pre-SiLU tensor alive for backward; this op keeps x plus the
per-group mean and rstd ([B, G] fp32 each) and recomputes the rest.

The affine weight and bias belong to the frozen networks (textual inversion trains only
the token embedding), so backward returns the input gradient only: weight and bias get
None, i.e. no gradient, even if they have requires_grad set.

Statistics: each chunk of a group computes its own mean and centred sum of squares
(two-pass inside the chunk), and the chunks are merged with Chan's parallel formula by
a one-program-per-group kernel (three launches per call, no torch ops between them). This
spreads one group over many programs (a VAE group at 512^2 has a million elements) without
the cancellation of E[x^2] - E[x]^2.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from minti.kernels.launch import INTERPRETED, acc_dtype, check_path, check_triton_runs, new_output, with_fallback

try:  # Triton is optional (no wheels for macOS): the torch path still works
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def group_norm_silu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int,
                              eps: float, silu: bool = True) -> torch.Tensor:
    """Plain autograd GroupNorm (+SiLU) in x's dtype (tests call it in float64)."""
    y = F.group_norm(x, groups, weight, bias, eps)
    return F.silu(y) if silu else y


# ----------------------------------------------------------------------------- torch path

# torch's fused group norm (native_group_norm: statistics and output in one op) and SiLU in
# place: two ops forward. The backward recomputes the pre-SiLU tensor with native_group_norm
# rather than save it (the same pass the Triton backward makes over x), then calls the fused
# SiLU and group-norm backward ops: three ops. So the autograd function below keeps what the
# Triton path keeps, x and mean/rstd (2 * B * G fp32 values); native group norm + SiLU under
# plain autograd would keep their output too, one more x-sized tensor per call.

def _native_args(x, weight, bias, groups: int):
    """native_group_norm's x, weight, bias, N, C, HxW, group, in the dtypes that keep the
    statistics in fp32 (fp64 for fp64): the CPU kernel takes half x with fp32 weights, other
    devices get x upcast."""
    acc = acc_dtype(x.dtype)
    xa = x if x.device.type == "cpu" else x.to(acc)
    return xa, weight.to(acc), bias.to(acc), x.shape[0], x.shape[1], math.prod(x.shape[2:]), groups


def _torch_fwd(x, weight, bias, groups: int, eps: float, silu: bool):
    out, mean, rstd = torch.ops.aten.native_group_norm(*_native_args(x, weight, bias, groups), eps)
    out = out.to(x.dtype)
    if silu:
        out = F.silu(out, inplace=True)  # out is ours: no second x-sized buffer
    return out, mean.float(), rstd.float()


def _torch_bwd(dout, x, weight, bias, mean, rstd, groups: int, silu: bool, eps: float):
    xa, wa, ba, n, c, hxw, g = _native_args(x, weight, bias, groups)
    dz = dout.to(xa.dtype)
    if silu:  # silu'(z) at z = GroupNorm(x), recomputed
        z, _, _ = torch.ops.aten.native_group_norm(xa, wa, ba, n, c, hxw, g, eps)
        dz = torch.ops.aten.silu_backward(dz, z)
    acc = acc_dtype(x.dtype)
    dx, _, _ = torch.ops.aten.native_group_norm_backward(dz, xa, mean.to(acc), rstd.to(acc), wa, n, c, hxw, g,
                                                         [True, False, False])
    return dx.to(x.dtype)


# ----------------------------------------------------------------------------- Triton kernels

if triton is not None:
    @triton.jit
    def gn_stats(X, COUNT, MEAN, M2, M, n_chunks, CHUNK: tl.constexpr):
        """Per (group, chunk): element count, mean and centred sum of squares, fp32."""
        bg = tl.program_id(0).to(tl.int64)
        ch = tl.program_id(1)
        offs = ch * CHUNK + tl.arange(0, CHUNK)
        mask = offs < M
        x = tl.load(X + bg * M + offs, mask=mask, other=0.0).to(tl.float32)
        n = tl.minimum(M - ch * CHUNK, CHUNK).to(tl.float32)
        mean = tl.sum(x, 0) / n
        d = tl.where(mask, x - mean, 0.0)
        tl.store(COUNT + bg * n_chunks + ch, n)
        tl.store(MEAN + bg * n_chunks + ch, mean)
        tl.store(M2 + bg * n_chunks + ch, tl.sum(d * d, 0))

    @triton.jit
    def _group_sums(PARTS, bg, n_chunks, N_CHUNKS: tl.constexpr):
        """This group's per-chunk partials [n_chunks] as a padded vector (0 past the end)."""
        offs = tl.arange(0, N_CHUNKS)
        return tl.load(PARTS + bg * n_chunks + offs, mask=offs < n_chunks, other=0.0)

    @triton.jit
    def gn_merge(COUNT, CMEAN, M2, MEAN, RSTD, M, n_chunks, eps, N_CHUNKS: tl.constexpr):
        """One program per group: Chan's merge of its chunk statistics into mean and rstd.
        A kernel of its own rather than torch ops: those were ten small launches per call,
        which at batch 1 cost more CPU time than the GPU work they do."""
        bg = tl.program_id(0).to(tl.int64)
        count = _group_sums(COUNT, bg, n_chunks, N_CHUNKS)
        cmean = _group_sums(CMEAN, bg, n_chunks, N_CHUNKS)
        mean = tl.sum(count * cmean, 0) / M
        spread = cmean - mean
        var = (tl.sum(_group_sums(M2, bg, n_chunks, N_CHUNKS), 0) + tl.sum(count * spread * spread, 0)) / M
        tl.store(MEAN + bg, mean)
        tl.store(RSTD + bg, 1.0 / tl.sqrt(var + eps))

    @triton.jit
    def gn_fwd(X, W, B, MEAN, RSTD, OUT, M, S, C, G, SILU: tl.constexpr, CHUNK: tl.constexpr):
        bg = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
        mask = offs < M
        mean = tl.load(MEAN + bg)
        rstd = tl.load(RSTD + bg)
        chan = (bg % G) * (C // G) + offs // S  # channel of each element of the group
        x = tl.load(X + bg * M + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + chan, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + chan, mask=mask, other=0.0).to(tl.float32)
        z = (x - mean) * rstd * w + b
        if SILU:
            z = z * tl.sigmoid(z)
        tl.store(OUT + bg * M + offs, z.to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _gn_dy_hat(X, DOUT, W, B, MEAN, RSTD, bg, M, S, C, G, mask, offs, SILU: tl.constexpr):
        """Gradient w.r.t. the normalised input y_hat, and y_hat itself (recomputed)."""
        chan = (bg % G) * (C // G) + offs // S
        x = tl.load(X + bg * M + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + chan, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + chan, mask=mask, other=0.0).to(tl.float32)
        dz = tl.load(DOUT + bg * M + offs, mask=mask, other=0.0).to(tl.float32)
        y_hat = (x - tl.load(MEAN + bg)) * tl.load(RSTD + bg)
        if SILU:
            z = y_hat * w + b
            sig = tl.sigmoid(z)
            dz = dz * sig * (1.0 + z * (1.0 - sig))
        return dz * w, y_hat

    @triton.jit
    def gn_bwd_sums(X, DOUT, W, B, MEAN, RSTD, SUM1, SUM2, M, S, C, G, n_chunks,
                     SILU: tl.constexpr, CHUNK: tl.constexpr):
        """Per (group, chunk): sum(dy_hat) and sum(dy_hat * y_hat)."""
        bg = tl.program_id(0).to(tl.int64)
        ch = tl.program_id(1)
        offs = ch * CHUNK + tl.arange(0, CHUNK)
        mask = offs < M
        dy, y_hat = _gn_dy_hat(X, DOUT, W, B, MEAN, RSTD, bg, M, S, C, G, mask, offs, SILU)
        dy = tl.where(mask, dy, 0.0)
        tl.store(SUM1 + bg * n_chunks + ch, tl.sum(dy, 0))
        tl.store(SUM2 + bg * n_chunks + ch, tl.sum(dy * y_hat, 0))

    @triton.jit
    def gn_bwd_merge(SUM1, SUM2, C1, C2, M, n_chunks, N_CHUNKS: tl.constexpr):
        """One program per group: the group means of dy_hat and dy_hat * y_hat (see gn_merge)."""
        bg = tl.program_id(0).to(tl.int64)
        tl.store(C1 + bg, tl.sum(_group_sums(SUM1, bg, n_chunks, N_CHUNKS), 0) / M)
        tl.store(C2 + bg, tl.sum(_group_sums(SUM2, bg, n_chunks, N_CHUNKS), 0) / M)

    @triton.jit
    def gn_bwd_dx(X, DOUT, W, B, MEAN, RSTD, C1, C2, DX, M, S, C, G, SILU: tl.constexpr, CHUNK: tl.constexpr):
        bg = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
        mask = offs < M
        dy, y_hat = _gn_dy_hat(X, DOUT, W, B, MEAN, RSTD, bg, M, S, C, G, mask, offs, SILU)
        dx = (dy - tl.load(C1 + bg) - y_hat * tl.load(C2 + bg)) * tl.load(RSTD + bg)
        tl.store(DX + bg * M + offs, dx.to(DX.dtype.element_ty), mask=mask)


def _pow2(n: int) -> int:
    return triton.next_power_of_2(n)  # tl.arange needs a power of two


CUDA_CHUNK = 2048  # elements per program on a GPU (bench/compile_targets.py compiles this)


def _chunk(x: torch.Tensor) -> int:
    return CUDA_CHUNK if (x.is_cuda and not INTERPRETED) else 1024


def _triton_fwd(x, weight, bias, groups: int, eps: float, silu: bool):
    b, c = x.shape[:2]
    m = x.numel() // (b * groups)  # elements per group (contiguous in x)
    s = m * groups // c  # spatial size
    chunk = _chunk(x)
    n_chunks = triton.cdiv(m, chunk)
    grid = (b * groups, n_chunks)
    count, cmean, m2 = (torch.empty((b * groups, n_chunks), dtype=torch.float32, device=x.device) for _ in range(3))
    gn_stats[grid](x, count, cmean, m2, m, n_chunks, CHUNK=chunk)
    mean, rstd = (new_output((b, groups), torch.float32, x.device) for _ in range(2))
    gn_merge[(b * groups,)](count, cmean, m2, mean, rstd, m, n_chunks, eps, N_CHUNKS=_pow2(n_chunks))
    out = new_output(x.shape, x.dtype, x.device)
    gn_fwd[grid](x, weight, bias, mean, rstd, out, m, s, c, groups, SILU=silu, CHUNK=chunk)
    return out, mean, rstd


def _triton_bwd(dout, x, weight, bias, mean, rstd, groups: int, silu: bool):
    b, c = x.shape[:2]
    m = x.numel() // (b * groups)
    s = m * groups // c
    chunk = _chunk(x)
    n_chunks = triton.cdiv(m, chunk)
    grid = (b * groups, n_chunks)
    dout = dout.contiguous()
    mean, rstd = mean.reshape(-1).contiguous(), rstd.reshape(-1).contiguous()
    sum1, sum2 = (torch.empty((b * groups, n_chunks), dtype=torch.float32, device=x.device) for _ in range(2))
    gn_bwd_sums[grid](x, dout, weight, bias, mean, rstd, sum1, sum2, m, s, c, groups, n_chunks, SILU=silu, CHUNK=chunk)
    c1, c2 = (torch.empty(b * groups, dtype=torch.float32, device=x.device) for _ in range(2))
    gn_bwd_merge[(b * groups,)](sum1, sum2, c1, c2, m, n_chunks, N_CHUNKS=_pow2(n_chunks))
    dx = new_output(x.shape, x.dtype, x.device)
    gn_bwd_dx[grid](x, dout, weight, bias, mean, rstd, c1, c2, dx, m, s, c, groups, SILU=silu, CHUNK=chunk)
    return dx


# ----------------------------------------------------------------------------- autograd

def _meta_fwd(x, weight, bias, groups: int, eps: float, silu: bool):
    """Memory tracing on the meta device: what the fused kernel allocates, no temporaries."""
    stats = torch.empty(x.shape[0], groups, dtype=torch.float32, device=x.device)
    return torch.empty_like(x), stats, torch.empty_like(stats)


def _meta_bwd(dout, x, weight, bias, mean, rstd, groups: int, silu: bool):
    return torch.empty_like(x)


class _GroupNormSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, groups: int, eps: float, silu: bool, use_triton: bool):
        args = (x, weight, bias, groups, eps, silu)
        if x.is_meta:
            out, mean, rstd = _meta_fwd(*args)
        elif use_triton:
            out, mean, rstd = with_fallback("group_norm_silu", lambda: _triton_fwd(*args), lambda: _torch_fwd(*args))
        else:
            out, mean, rstd = _torch_fwd(*args)
        ctx.save_for_backward(x, weight, bias, mean, rstd)  # x + two [B, G] fp32 tensors
        ctx.groups, ctx.eps, ctx.silu, ctx.use_triton = groups, eps, silu, use_triton
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        args = (dout, x, weight, bias, mean, rstd, ctx.groups, ctx.silu)
        if x.is_meta:
            dx = _meta_bwd(*args)
        elif ctx.use_triton:
            dx = with_fallback("group_norm_silu", lambda: _triton_bwd(*args), lambda: _torch_bwd(*args, ctx.eps))
        else:
            dx = _torch_bwd(*args, ctx.eps)
        # Frozen affine parameters: no weight/bias gradient by design (see module docstring).
        return dx, None, None, None, None, None, None


def group_norm_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float,
                    silu: bool = True, backend: str = "torch") -> torch.Tensor:
    """GroupNorm(groups, eps, affine) then SiLU if silu; x [B, C, *spatial].

    Statistics in fp32, output in x.dtype. Differentiable in x only (weight/bias frozen).
    backend: "triton" (CUDA, or CPU under TRITON_INTERPRET=1) or "torch".
    """
    if x.dim() < 3 or x.shape[1] % groups:
        raise ValueError(f"group_norm_silu needs x [B, C, *spatial] with C % groups == 0, got {tuple(x.shape)}")
    check_path("group_norm_silu", backend)
    if backend == "triton":
        check_triton_runs(x)
    use_triton = backend == "triton" and not x.is_meta  # meta: shapes only, any path gives the same
    if use_triton:
        x, weight, bias = x.contiguous(), weight.contiguous(), bias.contiguous()
    return _GroupNormSiLU.apply(x, weight, bias, groups, eps, silu, use_triton)
