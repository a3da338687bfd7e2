"""Flash attention: softmax(q k^T * scale) v without ever storing the N x N score matrix.

Layout: q [B,H,Nq,D], k/v [B,H,Nk,D] -> out [B,H,Nq,D]. Forward keeps a running max and
sum per query row (online softmax) and saves only q, k, v, out and the per-row
log-sum-exp (lse, fp32, [B,H,Nq]). Backward recomputes the probabilities block by block
from lse: one kernel per key block (and query range, where there are too few key blocks
to fill the GPU: _query_splits) accumulates dK/dV and adds its share of dQ with fp32
atomics; when torch asks for deterministic algorithms, a second kernel per query block
computes dQ instead (_one_pass_backward).

Causal masking is top-left aligned like SDPA's is_causal: query i sees keys j <= i, also
when Nq != Nk. Accumulation is fp32 for every input dtype. Head dims that are not a power
of two (SD 1.x: 40, 80, 160) are covered by two power-of-two column pieces rather than one
tile padded with zeros (_head_pieces).

The entry point is a torch custom op (forward and backward are separate ops with fake
implementations) so the models trace on the meta device and under torch.compile.

This file holds, in order: the float64-friendly reference, the torch path (aten's fused
attention ops on the CPU and CUDA, query chunks elsewhere), the Triton kernels, the launchers,
the custom ops and the public `flash_attention`.
"""
from __future__ import annotations

import inspect
import math
import warnings

import torch

import minti.kernels as _k

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs (macOS): the torch path still works
    triton = None

_INTERPRET = _k.triton_interpreted()  # fixed when the kernels below are decorated


# ----------------------------------------------------------------------------- reference

def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                        scale: float | None = None) -> torch.Tensor:
    """Naive attention in the inputs' dtype (tests call it in float64). Materialises N x N."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    if causal:
        nq, nk = q.shape[-2], k.shape[-2]
        keep = torch.arange(nk, device=q.device)[None, :] <= torch.arange(nq, device=q.device)[:, None]
        s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


# ----------------------------------------------------------------------------- torch path

# The torch path calls one fused aten op each way that returns (and takes back) the per-row
# lse, so it saves the same five tensors as the Triton path and never holds N x N:
# - "cpu": aten's CPU flash attention;
# - "efficient" (CUDA without Triton, or a head dim Triton has no config for): aten's
#   memory-efficient attention (the kernel behind SDPA's EFFICIENT_ATTENTION backend);
# - "chunked" everywhere else (MPS, float64 on CUDA, head dims the fused CUDA kernels do
#   not align to): query chunks of matmuls, at most TORCH_CHUNK_ELEMENTS scores at a time.
#   MPS's SDPA returns no lse and its backward keeps the N x N probabilities.
# SDPA's CUDA flash backend is not used: it takes only fp16/bf16, and the efficient kernel
# covers every dtype the models run in.
EFFICIENT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _torch_path(q: torch.Tensor) -> str:
    if q.device.type == "cpu":
        return "cpu"
    if q.device.type == "cuda" and q.dtype in EFFICIENT_DTYPES and q.shape[-1] % 8 == 0 and not EFFICIENT_FAILED:
        return "efficient"
    return "chunked"


# The first error of the efficient kernels (no kernel for this GPU and dtype, e.g. bf16
# before sm_80, or a build without them): every later call takes the chunked path.
EFFICIENT_FAILED: list[str] = []


def _efficient_or_chunked(efficient_call, chunked_call):
    try:
        return efficient_call()
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as e:
        EFFICIENT_FAILED.append(str(e).splitlines()[0] if str(e) else type(e).__name__)
        warnings.warn(f"minti: torch's memory-efficient attention cannot run here ({EFFICIENT_FAILED[0]}); "
                      f"the torch attention path takes query chunks from now on", RuntimeWarning, stacklevel=3)
        return chunked_call()


def _unit_stride_rows(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # aten's fused attention ops read each row of D values as contiguous memory: a tensor
    # whose last dim is strided (the VAE's [B,C,HW] -> [B,1,HW,C] transpose) must be copied
    # first, or the CPU op reads the wrong elements.
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in tensors)


def _token_major_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A [B, H, N, D] view over [B, N, H, D] memory: the layout every path returns.

    The models' projections produce and consume [B, N, H*D]; in this layout the merge of the
    heads after attention (and the split of the gradients before the projections' backward)
    is a view, not a copy per tensor. aten's fused attention ops return this layout too."""
    b, h, n, d = shape
    return _k.new_output((b, n, h, d), dtype, device).transpose(1, 2)


def _token_major(x: torch.Tensor) -> torch.Tensor:
    return x if x.transpose(1, 2).is_contiguous() else x.transpose(1, 2).contiguous().transpose(1, 2)


def _torch_fwd(q, k, v, causal: bool, scale: float):
    path = _torch_path(q)
    if path == "cpu":
        q, k, v = _unit_stride_rows(q, k, v)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        return _token_major(out), lse.float().contiguous()  # lse comes as a [B, Nq, H] transpose
    if path == "efficient":
        return _efficient_or_chunked(lambda: _efficient_fwd(q, k, v, causal, scale),
                                     lambda: _chunked_fwd(q, k, v, causal, scale))
    return _chunked_fwd(q, k, v, causal, scale)


def _torch_bwd(do, q, k, v, o, lse, causal: bool, scale: float):
    """Gradients from the saved tensors; lse may be the Triton forward's (a fallback), which
    is the same natural-log lse in fp32 [B, H, Nq] that every torch forward returns."""
    path = _torch_path(q)
    if path == "cpu":
        do, q, k, v, o = _unit_stride_rows(do.to(q.dtype), q, k, v, o)
        lse = lse.to(_acc_dtype(q.dtype))  # the kernel wants its accumulation dtype (fp64 for fp64)
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, o, lse, 0.0, causal, scale=scale)
        return tuple(_token_major(g) for g in grads)
    if path == "efficient":
        return _efficient_or_chunked(lambda: _efficient_bwd(do, q, k, v, o, lse, causal, scale),
                                     lambda: _chunked_bwd(do, q, k, v, o, lse, causal, scale))
    return _chunked_bwd(do, q, k, v, o, lse, causal, scale)


# The memory-efficient kernel pads its lse to a multiple of this many query rows (+inf past
# Nq, so those rows' probabilities are 0) and its backward reads the padded rows.
EFFICIENT_LSE_ROWS = 32
_efficient_attention = torch.ops.aten._scaled_dot_product_efficient_attention
_efficient_attention_backward = torch.ops.aten._scaled_dot_product_efficient_attention_backward


def _efficient_fwd(q, k, v, causal: bool, scale: float):
    q, k, v = _unit_stride_rows(q, k, v)
    out, lse, _, _ = _efficient_attention(q, k, v, None, True, 0.0, causal, scale=scale)  # True: return the lse
    # The saved lse is [B, H, Nq] like every path's (the padding comes back in the backward).
    return _token_major(out), lse[..., :q.shape[2]].contiguous()


def _efficient_bwd(do, q, k, v, o, lse, causal: bool, scale: float):
    do, q, k, v, o = _unit_stride_rows(do.to(q.dtype), q, k, v, o)
    nq = q.shape[2]
    lse = torch.nn.functional.pad(lse.float(), (0, -nq % EFFICIENT_LSE_ROWS), value=float("inf"))
    no_dropout = q.new_empty((), dtype=torch.int64)  # the philox seed and offset, unread at p = 0
    dq, dk, dv, _ = _efficient_attention_backward(
        do, q, k, v, None, o, lse, no_dropout, no_dropout, 0.0, [True, True, True, False], causal, scale=scale)
    return _token_major(dq), _token_major(dk), _token_major(dv)


# Upper bound on B*H*rows*Nk score elements the chunked path holds at once.
# Tests lower it so the chunk loop runs several times with a ragged tail.
TORCH_CHUNK_ELEMENTS = 1 << 24


def _chunk_rows(q: torch.Tensor, nk: int) -> int:
    b, h, nq, _ = q.shape
    return max(1, min(nq, TORCH_CHUNK_ELEMENTS // max(1, b * h * nk)))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # fp32 for halves, fp64 stays fp64


def _masked_scores(qc: torch.Tensor, k: torch.Tensor, start: int, causal: bool, scale: float) -> torch.Tensor:
    s = (qc @ k.transpose(-1, -2)) * scale
    if causal:
        rows = torch.arange(start, start + qc.shape[-2], device=qc.device)
        keep = torch.arange(k.shape[-2], device=qc.device)[None, :] <= rows[:, None]
        s = s.masked_fill(~keep, float("-inf"))
    return s


def _chunked_fwd(q, k, v, causal: bool, scale: float):
    b, h, nq, d = q.shape
    acc = _acc_dtype(q.dtype)
    out = _token_major_output((b, h, nq, d), q.dtype, q.device)
    lse = _k.new_output((b, h, nq), torch.float32, q.device)
    kf, vf = k.to(acc), v.to(acc)
    step = _chunk_rows(q, k.shape[2])
    for s0 in range(0, nq, step):
        s = _masked_scores(q[:, :, s0:s0 + step].to(acc), kf, s0, causal, scale)
        lse_c = torch.logsumexp(s, dim=-1)
        out[:, :, s0:s0 + step] = (torch.exp(s - lse_c[..., None]) @ vf).to(q.dtype)
        lse[:, :, s0:s0 + step] = lse_c.float()
    return out, lse


def _chunked_bwd(do, q, k, v, o, lse, causal: bool, scale: float):
    acc = _acc_dtype(q.dtype)
    kf, vf = k.to(acc), v.to(acc)
    dq = _token_major_output(q.shape, q.dtype, q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)  # accumulated over query chunks
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    step = _chunk_rows(q, k.shape[2])
    for s0 in range(0, q.shape[2], step):
        sl = slice(s0, s0 + step)
        qc, doc = q[:, :, sl].to(acc), do[:, :, sl].to(acc)
        delta = (doc * o[:, :, sl].to(acc)).sum(-1, keepdim=True)  # rowsum(dO * O)
        p = torch.exp(_masked_scores(qc, kf, s0, causal, scale) - lse[:, :, sl, None].to(acc))
        dv += p.transpose(-1, -2) @ doc
        ds = p * (doc @ vf.transpose(-1, -2) - delta)
        dq[:, :, sl] = ((ds @ kf) * scale).to(q.dtype)
        dk += (ds.transpose(-1, -2) @ qc) * scale
    return dq, _token_major(dk.to(k.dtype)), _token_major(dv.to(v.dtype))


# ----------------------------------------------------------------------------- configs per device

# (BLOCK_M, BLOCK_N, num_warps, num_stages) the autotuner may time on a GPU, per kernel:
# "fwd" (_attn_fwd), "bwd_dkdv" (_attn_bwd_dkdv, with or without atomic dQ), "bwd_dq"
# (_attn_bwd_dq), larger blocks first. usable_configs keeps the first MAX_TUNED_CONFIGS of
# them that fit the running GPU's shared memory and its register budget (WIDEST_CLEAN).
ATTENTION_CONFIGS = {
    "fwd": [(128, 64, 8, 3), (128, 32, 4, 3), (64, 32, 4, 2), (32, 32, 4, 2), (16, 32, 4, 1), (16, 16, 8, 1),
            (16, 16, 4, 1)],
    "bwd_dkdv": [(64, 64, 8, 2), (32, 64, 4, 2), (32, 32, 4, 2), (16, 32, 4, 2), (16, 32, 8, 1), (16, 16, 8, 1),
                 (16, 16, 4, 2)],
    "bwd_dq": [(128, 32, 8, 2), (64, 64, 8, 2), (64, 32, 4, 2), (32, 32, 4, 2), (16, 16, 8, 1)],
}
MAX_TUNED_CONFIGS = 3  # each one more is tuned at the first step and compiled by the sweep on every target

# The register budget, as compiled: per target class, operand kind ("half" for fp16/bf16
# tensor-core dots, "fp32" for exact fp32 dots on CUDA cores) and kernel, the widest head dim
# (the summed width of its pieces, _head_pieces) at which each config compiled without a single
# register spill, every SD head dim up to it included. ptxas's spills follow no per-thread
# register count closely enough to be predicted (a config can spill at head dim 40 and not at
# 64, and sm_75 spills where sm_86 uses half its registers), so the budget is what
# `bench/compile_targets.py --derive` measured at the self-attention sites on sm_75, sm_86, sm_90
# and sm_120. A config missing from a class spilled, or did not fit, at SD 1.x's narrowest head
# dim there (or was not tried: the forward's 16x16 4-warp config, added for fp32 on sm_8x and
# sm_120 only). The full sweep then compiled what this table lets through at more sites and
# targets; where it found a spill inside a loop the entry was lowered by hand, all in fp32
# cross-attention: the forward's 16x32 at head dim 160 on sm_8x and sm_90, sm_8x's forward 64x32
# and sm_90's dK/dV 64x64 and 32x64 at head dim 40.
# Results and coverage: bench/RESULTS.md.
WIDEST_CLEAN = {
    "sm_75": {
        "half": {
            "fwd": {(64, 32, 4, 2): 48, (16, 32, 4, 1): 160, (16, 16, 8, 1): 160},
            "bwd_dkdv": {(32, 32, 4, 2): 48, (16, 16, 8, 1): 160, (16, 16, 4, 2): 80},
            "bwd_dq": {(32, 32, 4, 2): 48, (16, 16, 8, 1): 160},
        },
        "fp32": {
            "fwd": {(64, 32, 4, 2): 48, (32, 32, 4, 2): 64, (16, 32, 4, 1): 80, (16, 16, 8, 1): 160},
            "bwd_dkdv": {(32, 32, 4, 2): 48, (16, 32, 4, 2): 80, (16, 32, 8, 1): 64, (16, 16, 8, 1): 160},
            "bwd_dq": {(32, 32, 4, 2): 48, (16, 16, 8, 1): 160},
        },
    },
    "sm_8x": {
        "half": {
            "fwd": {(128, 64, 8, 3): 64, (128, 32, 4, 3): 80, (64, 32, 4, 2): 160, (32, 32, 4, 2): 160,
                    (16, 32, 4, 1): 160, (16, 16, 8, 1): 160},
            "bwd_dkdv": {(32, 64, 4, 2): 80, (32, 32, 4, 2): 80, (16, 32, 4, 2): 160, (16, 32, 8, 1): 80,
                         (16, 16, 8, 1): 160, (16, 16, 4, 2): 160},
            "bwd_dq": {(128, 32, 8, 2): 80, (64, 64, 8, 2): 80, (64, 32, 4, 2): 80, (32, 32, 4, 2): 160,
                       (16, 16, 8, 1): 160},
        },
        "fp32": {
            "fwd": {(32, 32, 4, 2): 80, (16, 32, 4, 1): 80, (16, 16, 8, 1): 80, (16, 16, 4, 1): 160},
            "bwd_dkdv": {(16, 32, 4, 2): 80, (16, 16, 8, 1): 160, (16, 16, 4, 2): 160},
            "bwd_dq": {(32, 32, 4, 2): 80, (16, 16, 8, 1): 160},
        },
    },
    "sm_90": {
        "half": {
            "fwd": {(128, 64, 8, 3): 160, (128, 32, 4, 3): 80, (64, 32, 4, 2): 160, (32, 32, 4, 2): 160,
                    (16, 32, 4, 1): 160, (16, 16, 8, 1): 160},
            "bwd_dkdv": {(64, 64, 8, 2): 80, (32, 64, 4, 2): 64, (16, 32, 4, 2): 160, (16, 32, 8, 1): 160,
                         (16, 16, 8, 1): 160, (16, 16, 4, 2): 160},
            "bwd_dq": {(128, 32, 8, 2): 160, (64, 64, 8, 2): 160, (64, 32, 4, 2): 160, (32, 32, 4, 2): 160,
                       (16, 16, 8, 1): 160},
        },
        "fp32": {
            "fwd": {(32, 32, 4, 2): 80, (16, 32, 4, 1): 80, (16, 16, 8, 1): 160},
            "bwd_dkdv": {(16, 32, 4, 2): 80, (16, 32, 8, 1): 64, (16, 16, 8, 1): 80, (16, 16, 4, 2): 160},
            "bwd_dq": {(128, 32, 8, 2): 48, (64, 64, 8, 2): 48, (32, 32, 4, 2): 80, (16, 16, 8, 1): 160},
        },
    },
    "sm_120": {
        "half": {
            "fwd": {(128, 64, 8, 3): 64, (128, 32, 4, 3): 48, (64, 32, 4, 2): 160, (32, 32, 4, 2): 160,
                    (16, 32, 4, 1): 160, (16, 16, 8, 1): 160},
            "bwd_dkdv": {(16, 32, 4, 2): 160, (16, 32, 8, 1): 80, (16, 16, 8, 1): 160, (16, 16, 4, 2): 160},
            "bwd_dq": {(128, 32, 8, 2): 80, (64, 64, 8, 2): 80, (32, 32, 4, 2): 160, (16, 16, 8, 1): 160},
        },
        "fp32": {
            "fwd": {(32, 32, 4, 2): 80, (16, 32, 4, 1): 160, (16, 16, 8, 1): 48, (16, 16, 4, 1): 160},
            "bwd_dkdv": {(32, 32, 4, 2): 64, (16, 32, 4, 2): 64, (16, 32, 8, 1): 160, (16, 16, 8, 1): 48},
            "bwd_dq": {(32, 32, 4, 2): 80, (16, 16, 8, 1): 160},
        },
    },
}


def target_class(capability: tuple[int, int]) -> str:
    """The WIDEST_CLEAN row of a compute capability: Turing, Ampere/Ada, Hopper, Blackwell."""
    if capability < (8, 0):
        return "sm_75"
    if capability < (9, 0):
        return "sm_8x"
    return "sm_90" if capability < (10, 0) else "sm_120"


def _operand_kind(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "half"


def _element_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def shared_bytes_estimate(kind: str, config: tuple[int, int, int, int], d: int, dtype: torch.dtype) -> int:
    """Shared memory a config needs, an upper bound modelled on what Triton allocates: the
    blocks its software pipeline streams (num_stages copies, plus one where a target without
    asynchronous copies stages them through registers), the tiles loaded once, and the layout
    conversions of the tiles that feed a second dot. bench/compile_targets.py checks it
    against the compiled kernels on every target."""
    block_m, block_n, _warps, stages = config
    width = sum(_head_pieces(d))
    e = _element_bytes(dtype)
    if kind == "fwd":  # K and V streamed; Q loaded once; P re-laid out for P V
        return (stages + 1) * 2 * block_n * width * e + block_m * width * e + block_m * block_n * e
    if kind == "bwd_dq":  # K and V streamed; Q and dO loaded once; dS re-laid out for dS K
        return (stages + 1) * 2 * block_n * width * e + 2 * block_m * width * e + block_m * block_n * e
    # bwd_dkdv: Q and dO streamed; K and V loaded once; P^T and dS^T re-laid out for dV and dK
    return (stages + 1) * 2 * block_m * width * e + 2 * block_n * width * e + 2 * block_m * block_n * e


def usable_configs(kind: str, d: int, dtype: torch.dtype, limits: "_k.DeviceLimits") -> list[tuple[int, int, int, int]]:
    """The configs of ATTENTION_CONFIGS[kind] the autotuner may try on a device with these
    limits at head dim d: the first MAX_TUNED_CONFIGS whose shared memory fits and that compiled
    without spilling at this head dim's width on this class of GPU (WIDEST_CLEAN). A pure
    function, tested with made-up devices; empty where Triton cannot run in dtype at all."""
    if not _k.dtype_supported(dtype, limits):
        return []
    width = sum(_head_pieces(d))
    widest = WIDEST_CLEAN[target_class(limits.capability)][_operand_kind(dtype)][kind]
    usable = [c for c in ATTENTION_CONFIGS[kind]
              if widest.get(c, 0) >= width and shared_bytes_estimate(kind, c, d, dtype) <= limits.shared_bytes]
    return usable[:MAX_TUNED_CONFIGS]


# ----------------------------------------------------------------------------- Triton kernels

if triton is not None:
    @triton.jit
    def _dot(a, b, PRECISION: tl.constexpr):
        """tl.dot with fp32 accumulation. "upcast": Triton's numpy interpreter multiplies bf16
        operands wrongly, so there they are widened first (already rounded, so the numbers
        match the GPU's bf16 tensor-core product up to summation order)."""
        if PRECISION == "upcast":
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        return tl.dot(a, b, input_precision=PRECISION)

    @triton.jit
    def _tile(base, rows, row_ok, s_row, s_col, COL0: tl.constexpr, WIDTH: tl.constexpr, D: tl.constexpr,
              MASK_ROWS: tl.constexpr):
        """Rows `rows`, columns [COL0, COL0 + WIDTH) of a [N, D] matrix; zero past N (when
        MASK_ROWS) and past D (a piece wider than what is left of the head dim)."""
        cols = COL0 + tl.arange(0, WIDTH)
        ok = cols[None, :] < D
        if MASK_ROWS:
            ok = ok & row_ok[:, None]
        return tl.load(base + rows[:, None] * s_row + cols[None, :] * s_col, mask=ok, other=0.0)

    @triton.jit
    def _both_pieces(base, rows, row_ok, s_row, s_col, D: tl.constexpr, D_LO: tl.constexpr, D_HI: tl.constexpr):
        """Rows `rows` of a [N, D] matrix as its (lo, hi) head-dim pieces; hi is lo when D_HI == 0."""
        lo = _tile(base, rows, row_ok, s_row, s_col, 0, D_LO, D, True)
        hi = lo
        if D_HI > 0:
            hi = _tile(base, rows, row_ok, s_row, s_col, D_LO, D_HI, D, True)
        return lo, hi

    @triton.jit
    def _dot_rows_of(x_lo, x_hi, base, rows, row_ok, s_row, s_col, D: tl.constexpr, D_LO: tl.constexpr,
                     D_HI: tl.constexpr, PRECISION: tl.constexpr):
        """x @ y^T over the head dim's one or two pieces, where y is rows `rows` of the [N, D]
        matrix at `base` (loaded here) -> (x @ y^T, y_lo, y_hi); y_hi is y_lo when D_HI == 0."""
        y_lo = _tile(base, rows, row_ok, s_row, s_col, 0, D_LO, D, True)
        out = _dot(x_lo, tl.trans(y_lo), PRECISION)
        y_hi = y_lo
        if D_HI > 0:
            y_hi = _tile(base, rows, row_ok, s_row, s_col, D_LO, D_HI, D, True)
            out += _dot(x_hi, tl.trans(y_hi), PRECISION)
        return out, y_lo, y_hi

    @triton.jit
    def _store_tile(base, x, rows, row_ok, s_row, COL0: tl.constexpr, WIDTH: tl.constexpr, D: tl.constexpr):
        cols = COL0 + tl.arange(0, WIDTH)
        tl.store(base + rows[:, None] * s_row + cols[None, :], x.to(base.dtype.element_ty),
                 mask=row_ok[:, None] & (cols[None, :] < D))

    @triton.jit
    def _atomic_add_tile(base, x, rows, row_ok, s_row, COL0: tl.constexpr, WIDTH: tl.constexpr, D: tl.constexpr):
        cols = COL0 + tl.arange(0, WIDTH)
        tl.atomic_add(base + rows[:, None] * s_row + cols[None, :], x, mask=row_ok[:, None] & (cols[None, :] < D))

    @triton.jit
    def _head_bases(Q, K, V, X, H, sqb, sqh, skb, skh, svb, svh, sxb, sxh):
        """Pointers to this program's (batch, head) slice of q, k, v and a fourth [B,H,N,D]
        tensor (O in the forward, dO in the backward); program_id(1) is batch * H + head."""
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        return Q + b * sqb + h * sqh, K + b * skb + h * skh, V + b * svb + h * svh, X + b * sxb + h * sxh

    @triton.jit
    def _block_rows(BLOCK: tl.constexpr, N):
        """Row indices of this program's block (program_id 0) and which are < N."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        return offs, offs < N

    # The head dim is covered by one or two power-of-two pieces (tl.arange and tl.dot need
    # powers of two): D_LO columns, then D_HI more when D_HI > 0. D = 80 is 64 + 16 instead of
    # one 128-wide tile padded with zeros, 160 is 128 + 32, 40 is 32 + 16 (see _head_pieces).
    # Every product over the head dim is the sum of the two pieces' products; every product
    # into it (P V, dS K, ...) is computed per piece. With D_HI = 0 the "hi" names are unused.

    @triton.jit
    def _fwd_block(acc_lo, acc_hi, m_i, l_i, q_lo, q_hi, k_base, v_base, skn, skd, svn, svd, start_n, offs_m,
                   offs_n, Nk, qk_scale, D: tl.constexpr, D_LO: tl.constexpr, D_HI: tl.constexpr,
                   MASK_N: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
        """One key block of the online softmax. MASK_N=False for blocks fully inside the
        valid (and, if causal, visible) region: no per-row masking on the hot path."""
        kn = start_n + offs_n
        n_ok = kn < Nk
        k_lo = _tile(k_base, kn, n_ok, skn, skd, 0, D_LO, D, MASK_N)
        s = _dot(q_lo, tl.trans(k_lo), PRECISION)
        if D_HI > 0:
            k_hi = _tile(k_base, kn, n_ok, skn, skd, D_LO, D_HI, D, MASK_N)
            s += _dot(q_hi, tl.trans(k_hi), PRECISION)
        s = s * qk_scale
        if MASK_N:
            ok = n_ok[None, :]
            if CAUSAL:
                ok = ok & (kn[None, :] <= offs_m[:, None])
            s = tl.where(ok, s, float("-inf"))
        # Key 0 is always visible (top-left causal), so m_new is finite after block 0.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_lo = _tile(v_base, kn, n_ok, svn, svd, 0, D_LO, D, MASK_N)
        acc_lo = acc_lo * alpha[:, None] + _dot(p.to(v_lo.dtype), v_lo, PRECISION)
        if D_HI > 0:
            v_hi = _tile(v_base, kn, n_ok, svn, svd, D_LO, D_HI, D, MASK_N)
            acc_hi = acc_hi * alpha[:, None] + _dot(p.to(v_hi.dtype), v_hi, PRECISION)
        return acc_lo, acc_hi, m_new, l_i

    @triton.jit
    def _attn_fwd(Q, K, V, O, LSE,
                  sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
                  H, Nq, Nk, scale,
                  CAUSAL: tl.constexpr, D: tl.constexpr, D_LO: tl.constexpr, D_HI: tl.constexpr,
                  PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        offs_m, m_ok = _block_rows(BLOCK_M, Nq)
        offs_n = tl.arange(0, BLOCK_N)
        q_base, k_base, v_base, o_base = _head_bases(Q, K, V, O, H, sqb, sqh, skb, skh, svb, svh, sob, soh)
        q_lo = _tile(q_base, offs_m, m_ok, sqm, sqd, 0, D_LO, D, True)
        acc_lo = tl.zeros([BLOCK_M, D_LO], tl.float32)
        q_hi, acc_hi = q_lo, acc_lo  # placeholders, unused unless D_HI > 0
        if D_HI > 0:
            q_hi = _tile(q_base, offs_m, m_ok, sqm, sqd, D_LO, D_HI, D, True)
            acc_hi = tl.zeros([BLOCK_M, D_HI], tl.float32)
        qk_scale = scale * 1.4426950408889634  # work in base 2: exp2 is the fast instruction
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        # Key blocks [0, full_end) need no mask; [full_end, hi) do (ragged tail, diagonal).
        hi = Nk
        full_end = (Nk // BLOCK_N) * BLOCK_N
        if CAUSAL:
            pid_m = tl.program_id(0)
            hi = tl.minimum(Nk, (pid_m + 1) * BLOCK_M)
            full_end = tl.minimum(full_end, ((pid_m * BLOCK_M + 1) // BLOCK_N) * BLOCK_N)
        for start_n in range(0, full_end, BLOCK_N):
            acc_lo, acc_hi, m_i, l_i = _fwd_block(acc_lo, acc_hi, m_i, l_i, q_lo, q_hi, k_base, v_base, skn, skd,
                                                  svn, svd, start_n, offs_m, offs_n, Nk, qk_scale,
                                                  D, D_LO, D_HI, False, CAUSAL, PRECISION)
        for start_n in range(full_end, hi, BLOCK_N):
            acc_lo, acc_hi, m_i, l_i = _fwd_block(acc_lo, acc_hi, m_i, l_i, q_lo, q_hi, k_base, v_base, skn, skd,
                                                  svn, svd, start_n, offs_m, offs_n, Nk, qk_scale,
                                                  D, D_LO, D_HI, True, CAUSAL, PRECISION)
        o_ptrs = o_base + offs_m[:, None] * som
        cols = tl.arange(0, D_LO)
        tl.store(o_ptrs + cols[None, :] * sod, (acc_lo / l_i[:, None]).to(O.dtype.element_ty),
                 mask=m_ok[:, None] & (cols[None, :] < D))
        if D_HI > 0:
            cols = D_LO + tl.arange(0, D_HI)
            tl.store(o_ptrs + cols[None, :] * sod, (acc_hi / l_i[:, None]).to(O.dtype.element_ty),
                     mask=m_ok[:, None] & (cols[None, :] < D))
        # lse in natural-log units, the same as the torch path: (m + log2 l) * ln 2.
        bh = tl.program_id(1)
        tl.store(LSE + bh * Nq + offs_m, (m_i + tl.math.log2(l_i)) * 0.6931471805599453, mask=m_ok)

    @triton.jit
    def _attn_bwd_delta(O, DO, DELTA, sob, soh, som, sod, sdb, sdh, sdm, sdd, H, Nq,
                        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
        """delta = rowsum(dO * O), the softmax-backward correction term (fp32). Memory-bound:
        one padded power-of-two tile is as good as two pieces here."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_m[:, None] < Nq) & (offs_d[None, :] < D)
        o = tl.load(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod, mask=mask, other=0.0)
        do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :] * sdd, mask=mask, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + bh * Nq + offs_m, delta, mask=offs_m < Nq)

    @triton.jit
    def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, DQ,
                       sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd,
                       H, Nq, Nk, scale, SPLITS,
                       CAUSAL: tl.constexpr, D: tl.constexpr, D_LO: tl.constexpr, D_HI: tl.constexpr,
                       DQ_ATOMIC: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """One program per key block and query range (program_id 2 of SPLITS): loop over the
        range's query blocks that can see the key block. With SPLITS > 1, DK/DV are fp32
        [SPLITS, B*H, Nk, D] partial sums that the launcher adds up. With DQ_ATOMIC it also
        adds this key block's share of dQ = dS K into DQ (fp32, zeroed first) with atomics;
        without, _attn_bwd_dq computes dQ in a second pass."""
        pid_n = tl.program_id(0)
        bh = tl.program_id(1)
        offs_n, n_ok = _block_rows(BLOCK_N, Nk)
        q_base, k_base, v_base, do_base = _head_bases(Q, K, V, DO, H, sqb, sqh, skb, skh, svb, svh, sdb, sdh)
        k_lo, k_hi = _both_pieces(k_base, offs_n, n_ok, skn, skd, D, D_LO, D_HI)
        v_lo, v_hi = _both_pieces(v_base, offs_n, n_ok, svn, svd, D, D_LO, D_HI)
        dk_lo = tl.zeros([BLOCK_N, D_LO], tl.float32)
        dv_lo = tl.zeros([BLOCK_N, D_LO], tl.float32)
        if D_HI > 0:
            dk_hi = tl.zeros([BLOCK_N, D_HI], tl.float32)
            dv_hi = tl.zeros([BLOCK_N, D_HI], tl.float32)
        qk_scale = scale * 1.4426950408889634
        per_split = tl.cdiv(tl.cdiv(Nq, BLOCK_M), SPLITS) * BLOCK_M
        lo = tl.program_id(2) * per_split
        hi = tl.minimum(Nq, lo + per_split)
        if CAUSAL:  # queries before this key block cannot see it
            lo = tl.maximum(lo, ((pid_n * BLOCK_N) // BLOCK_M) * BLOCK_M)
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_ok = offs_m < Nq
            q_lo = _tile(q_base, offs_m, m_ok, sqm, sqd, 0, D_LO, D, True)
            do_lo = _tile(do_base, offs_m, m_ok, sdm, sdd, 0, D_LO, D, True)
            lse = tl.load(LSE + bh * Nq + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
            delta = tl.load(DELTA + bh * Nq + offs_m, mask=m_ok, other=0.0)
            # Transposed scores [BLOCK_N, BLOCK_M] so dK/dV accumulate without transposing them.
            # (Both lo tiles load before the products: in this order the sm_75 compile of the
            # deterministic pass at D = 160 keeps within its registers, which _dot_rows_of's
            # load-multiply-load order does not.)
            st = _dot(k_lo, tl.trans(q_lo), PRECISION)
            dpt = _dot(v_lo, tl.trans(do_lo), PRECISION)
            q_hi, do_hi = q_lo, do_lo  # placeholders, unused unless D_HI > 0
            if D_HI > 0:
                q_hi = _tile(q_base, offs_m, m_ok, sqm, sqd, D_LO, D_HI, D, True)
                do_hi = _tile(do_base, offs_m, m_ok, sdm, sdd, D_LO, D_HI, D, True)
                st += _dot(k_hi, tl.trans(q_hi), PRECISION)
                dpt += _dot(v_hi, tl.trans(do_hi), PRECISION)
            pt = tl.math.exp2(st * qk_scale - lse[None, :])
            ok = n_ok[:, None] & m_ok[None, :]
            if CAUSAL:
                ok = ok & (offs_n[:, None] <= offs_m[None, :])
            pt = tl.where(ok, pt, 0.0)
            dst = (pt * (dpt - delta[None, :])).to(q_lo.dtype)
            pt = pt.to(do_lo.dtype)
            dv_lo += _dot(pt, do_lo, PRECISION)
            dk_lo += _dot(dst, q_lo, PRECISION)
            if D_HI > 0:
                dv_hi += _dot(pt, do_hi, PRECISION)
                dk_hi += _dot(dst, q_hi, PRECISION)
            if DQ_ATOMIC:
                ds = tl.trans(dst)  # [BLOCK_M, BLOCK_N]
                dq_base = DQ + bh * Nq * D
                _atomic_add_tile(dq_base, _dot(ds, k_lo, PRECISION) * scale, offs_m, m_ok, D, 0, D_LO, D)
                if D_HI > 0:
                    _atomic_add_tile(dq_base, _dot(ds, k_hi, PRECISION) * scale, offs_m, m_ok, D, D_LO, D_HI, D)
        part = (tl.program_id(2) * tl.num_programs(1) + bh) * Nk * D
        dk_base = DK + part
        dv_base = DV + part
        _store_tile(dk_base, dk_lo * scale, offs_n, n_ok, D, 0, D_LO, D)
        _store_tile(dv_base, dv_lo, offs_n, n_ok, D, 0, D_LO, D)
        if D_HI > 0:
            _store_tile(dk_base, dk_hi * scale, offs_n, n_ok, D, D_LO, D_HI, D)
            _store_tile(dv_base, dv_hi, offs_n, n_ok, D, D_LO, D_HI, D)

    @triton.jit
    def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ,
                     sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd,
                     H, Nq, Nk, scale,
                     CAUSAL: tl.constexpr, D: tl.constexpr, D_LO: tl.constexpr, D_HI: tl.constexpr,
                     PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """One program per query block: loop over every key block it sees."""
        offs_m, m_ok = _block_rows(BLOCK_M, Nq)
        q_base, k_base, v_base, do_base = _head_bases(Q, K, V, DO, H, sqb, sqh, skb, skh, svb, svh, sdb, sdh)
        q_lo, q_hi = _both_pieces(q_base, offs_m, m_ok, sqm, sqd, D, D_LO, D_HI)
        do_lo, do_hi = _both_pieces(do_base, offs_m, m_ok, sdm, sdd, D, D_LO, D_HI)
        dq_lo = tl.zeros([BLOCK_M, D_LO], tl.float32)
        if D_HI > 0:
            dq_hi = tl.zeros([BLOCK_M, D_HI], tl.float32)
        bh = tl.program_id(1)
        lse = tl.load(LSE + bh * Nq + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + bh * Nq + offs_m, mask=m_ok, other=0.0)
        qk_scale = scale * 1.4426950408889634
        hi = Nk
        if CAUSAL:
            pid_m = tl.program_id(0)
            hi = tl.minimum(Nk, (pid_m + 1) * BLOCK_M)
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_ok = offs_n < Nk
            s, k_lo, k_hi = _dot_rows_of(q_lo, q_hi, k_base, offs_n, n_ok, skn, skd, D, D_LO, D_HI, PRECISION)
            dp, v_lo, v_hi = _dot_rows_of(do_lo, do_hi, v_base, offs_n, n_ok, svn, svd, D, D_LO, D_HI, PRECISION)
            p = tl.math.exp2(s * qk_scale - lse[:, None])
            ok = m_ok[:, None] & n_ok[None, :]
            if CAUSAL:
                ok = ok & (offs_n[None, :] <= offs_m[:, None])
            p = tl.where(ok, p, 0.0)
            ds = (p * (dp - delta[:, None])).to(k_lo.dtype)
            dq_lo += _dot(ds, k_lo, PRECISION)
            if D_HI > 0:
                dq_hi += _dot(ds, k_hi, PRECISION)
        dq_base = DQ + bh * Nq * D
        _store_tile(dq_base, dq_lo * scale, offs_m, m_ok, D, 0, D_LO, D)
        if D_HI > 0:
            _store_tile(dq_base, dq_hi * scale, offs_m, m_ok, D, D_LO, D_HI, D)

    def _pruner(kind: str):
        """The autotuner's early prune: keep the configs of kind that fit the running GPU
        (usable_configs), before any is compiled or timed."""
        def prune(configs, named_args, **kwargs):
            q, d = named_args["Q"], kwargs.get("D", named_args.get("D"))
            limits = _k.device_limits(q.device)
            if limits is None:
                return configs
            usable = set(usable_configs(kind, d, q.dtype, limits))
            return [c for c in configs if _config_tuple(c) in usable]
        return prune

    def _config_tuple(c) -> tuple[int, int, int, int]:
        return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages

    def _time_for_tuning(kernel_call, quantiles=(0.5, 0.2, 0.8), **_) -> list[float]:
        """The autotuner's timer: triton.testing.do_bench without its L2-flush buffer.

        Tuning runs inside the first training step, in the middle of the backward, where
        that buffer would sit on top of every saved activation, past the peak the memory
        plans budget for (sizes in bench/RESULTS.md). Without the flush every config is
        timed with the same warm L2, which keeps their ranking. Returns the requested
        quantiles of the per-run times in ms, as do_bench does.
        """
        kernel_call()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            kernel_call()
        end.record()
        torch.cuda.synchronize()
        estimate_ms = max(start.elapsed_time(end) / 3, 1e-3)
        runs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                for _ in range(int(min(100, max(5, 25 / estimate_ms))))]  # about 25 ms of runs
        for start, end in runs:
            start.record()
            kernel_call()
            end.record()
        torch.cuda.synchronize()
        times = sorted(start.elapsed_time(end) for start, end in runs)
        return [times[min(len(times) - 1, int(q * len(times)))] for q in quantiles]

    def _autotune(kind: str, extra_key=(), **options):
        configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                   for m, n, w, s in ATTENTION_CONFIGS[kind]]
        options.update(key=["Nq", "Nk", "D", "D_LO", *extra_key],  # D_LO: split and padded tiles tune apart
                       prune_configs_by={"early_config_prune": _pruner(kind)})
        accepted = inspect.signature(triton.autotune).parameters  # both are newer than Triton 3.0
        if "do_bench" in accepted:
            options["do_bench"] = _time_for_tuning
        if "cache_results" in accepted:  # tuned once per GPU and shape, kept in Triton's disk cache
            options["cache_results"] = True
        return triton.autotune(configs, **options)

    _attn_fwd_tuned = _autotune("fwd")(_attn_fwd)
    # Each timed run adds into DQ: the autotuner zeroes it before every run and once after.
    _attn_bwd_dkdv_tuned = _autotune("bwd_dkdv", ["DQ_ATOMIC"], reset_to_zero=["DQ"])(_attn_bwd_dkdv)
    _attn_bwd_dq_tuned = _autotune("bwd_dq")(_attn_bwd_dq)

# The interpreter runs every config it is given, so it gets fixed small blocks instead.
_INTERPRET_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32}


# Split a head dim that is not a power of two into two power-of-two pieces (True), or pad it
# to the next power of two (False). bench/attention.py times both ("minti_padded").
SPLIT_HEAD_DIM = True


def _pow2_at_least_16(n: int) -> int:
    return max(16, triton.next_power_of_2(n))  # tl.arange needs a power of two; tl.dot K >= 16


def _head_pieces(d: int, split: bool | None = None) -> tuple[int, int]:
    """(D_LO, D_HI): the power-of-two column pieces that cover head dim d, D_HI = 0 for one.

    Padding d to a power of two wastes matmul work on zeros: 80 -> 128 is 60% more, 160 ->
    256 too, and SD 1.x's head dims are 40, 80 and 160. Two pieces waste at most the second
    one's rounding: 40 = 32 + 16 (8 zeros, padding has 24), 80 = 64 + 16, 160 = 128 + 32.
    Where two pieces save nothing (24 = 16 + 16, 200 = 128 + 128) one padded tile is used.
    """
    split = SPLIT_HEAD_DIM if split is None else split
    padded = _pow2_at_least_16(d)
    lo = max(16, 1 << (d.bit_length() - 1))  # largest power of two <= d
    if not split or d <= lo:
        return padded, 0
    hi = _pow2_at_least_16(d - lo)
    return (lo, hi) if lo + hi < padded else (padded, 0)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs get exact fp32 products (TF32 would break the fp32 accuracy promise).
    if dtype == torch.float32:
        return "ieee"
    return "upcast" if _INTERPRET else "tf32"  # "tf32" is ignored for fp16/bf16 operands


def _grid(rows: int, block_key: str, b: int, h: int, splits: int = 1):
    return lambda m: (triton.cdiv(rows, m[block_key]), b * h, splits)


def _pick(kernel, tuned, x: torch.Tensor):
    if x.is_cuda and not _INTERPRET:
        return tuned, {}
    return kernel, dict(_INTERPRET_BLOCKS)


# The backward in one pass per key block that also adds its share of dQ with fp32 atomics
# (5 matmuls per pair of blocks, probabilities computed once), as FlashAttention-2 does, or
# in two (a second pass per query block computes dQ: 7 matmuls, probabilities twice, but the
# sums come out the same every run). bench/attention.py times both ("minti_two_pass").
ONE_PASS_BACKWARD = True


def _one_pass_backward() -> bool:
    """One pass unless turned off or torch.use_deterministic_algorithms(True) asks for
    reproducible sums (atomics add in any order)."""
    return ONE_PASS_BACKWARD and not torch.are_deterministic_algorithms_enabled()


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0


def _query_splits(q: torch.Tensor, nk: int) -> int:
    """How many query ranges the dK/dV kernel splits into.

    It runs one program per head and key block: B*H*ceil(Nk/64), which for cross-attention
    to 77 text tokens is 2 per head, 16 for SD 1.5 on a GPU with 100+ SMs. Splitting the
    query range gives about two programs per SM; each range keeps at least 256 query rows
    (at 64^2, 16 ranges: 256 programs), and its partial dK/dV (fp32, sizes in
    bench/RESULTS.md) is summed afterwards.
    """
    b, h, nq = q.shape[:3]
    wanted = triton.cdiv(2 * _sm_count(q.device), b * h * triton.cdiv(nk, 64))
    return max(1, min(wanted, nq // 256))


def _pieces_kwargs(d: int) -> dict:
    lo, hi = _head_pieces(d)
    return {"D_LO": lo, "D_HI": hi}


def _triton_fwd(q, k, v, causal: bool, scale: float):
    b, h, nq, d = q.shape
    nk = k.shape[2]
    out = _token_major_output((b, h, nq, d), q.dtype, q.device)  # the kernel writes through strides
    lse = _k.new_output((b, h, nq), torch.float32, q.device)
    fn, blocks = _pick(_attn_fwd, _attn_fwd_tuned, q)
    fn[_grid(nq, "BLOCK_M", b, h)](
        q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        h, nq, nk, scale, CAUSAL=causal, D=d, **_pieces_kwargs(d), PRECISION=_precision(q.dtype), **blocks)
    return out, lse


def _triton_bwd(do, q, k, v, o, lse, causal: bool, scale: float):
    b, h, nq, d = q.shape
    nk = k.shape[2]
    do = do.to(q.dtype)  # autograd hands back out.dtype; the dots need one dtype anyway
    delta = _k.new_output((b, h, nq), torch.float32, q.device)
    _attn_bwd_delta[(triton.cdiv(nq, 32), b * h)](
        o, do, delta, *o.stride(), *do.stride(), h, nq, D=d, BLOCK_D=_pow2_at_least_16(d), BLOCK_M=32)
    # dq/dk/dv are written contiguous; the kernels index them as [B*H, N, D].
    one_pass, splits = _one_pass_backward(), _query_splits(q, nk)
    if one_pass:
        dq = torch.zeros((b, h, nq, d), dtype=torch.float32, device=q.device)  # atomics add into it
    else:
        dq = _k.new_output((b, h, nq, d), q.dtype, q.device)
    if splits > 1:  # one fp32 partial sum per query range
        dk = _k.new_output((splits, b, h, nk, d), torch.float32, q.device)
        dv = _k.new_output((splits, b, h, nk, d), torch.float32, q.device)
    else:
        dk = _k.new_output((b, h, nk, d), k.dtype, q.device)
        dv = _k.new_output((b, h, nk, d), v.dtype, q.device)
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    common = dict(CAUSAL=causal, D=d, **_pieces_kwargs(d), PRECISION=_precision(q.dtype))
    fn, blocks = _pick(_attn_bwd_dkdv, _attn_bwd_dkdv_tuned, q)
    fn[_grid(nk, "BLOCK_N", b, h, splits)](q, k, v, do, lse, delta, dk, dv, dq, *strides, h, nq, nk, scale, splits,
                                           DQ_ATOMIC=one_pass, **common, **blocks)
    if splits > 1:
        dk, dv = dk.sum(0).to(k.dtype), dv.sum(0).to(v.dtype)
    if not one_pass:
        fn, blocks = _pick(_attn_bwd_dq, _attn_bwd_dq_tuned, q)
        fn[_grid(nq, "BLOCK_M", b, h)](q, k, v, do, lse, delta, dq, *strides, h, nq, nk, scale, **common, **blocks)
    # Contiguous [B*H, N, D] in the kernels; returned in the layout every path returns (the
    # copy the callers' head merge would otherwise make).
    return _token_major(dq.to(q.dtype)), _token_major(dk), _token_major(dv)


# ----------------------------------------------------------------------------- custom ops

def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("flash_attention expects q, k, v of shape [B, H, N, D]")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def has_configs(d: int, dtype: torch.dtype, limits: "_k.DeviceLimits | None") -> bool:
    """Every attention kernel keeps a config for head dim d on this device (None: the CPU,
    where the interpreter runs fixed blocks). False past the widest head dim the register
    budget was measured at (160) and where dtype has no Triton kernels on the device."""
    return limits is None or all(usable_configs(kind, d, dtype, limits) for kind in ATTENTION_CONFIGS)


def _use_triton(backend: str, q: torch.Tensor) -> bool:
    chosen = _k.resolve_backend(backend, q, triton is not None, _INTERPRET)
    supported = q.dtype in (torch.float16, torch.bfloat16, torch.float32) and q.shape[-1] <= 256
    if chosen == "triton" and not supported:
        if backend == "auto":  # e.g. float64 on CUDA: quietly take the torch path
            return False
        raise ValueError(f"flash_attention Triton path supports fp16/bf16/fp32 and head dim <= 256, "
                         f"got {q.dtype} and {q.shape[-1]}")
    if chosen == "triton" and q.is_cuda and not _INTERPRET and not has_configs(q.shape[-1], q.dtype,
                                                                               _k.device_limits(q.device)):
        if backend == "auto":  # a head dim past what the register budget measured
            return False
        raise ValueError(f"flash_attention has no Triton config measured for head dim {q.shape[-1]} in {q.dtype} "
                         f"on this GPU (see bench/compile_targets.py); use backend='auto' or 'torch'")
    return chosen == "triton"


@torch.library.custom_op("minti::flash_attn_fwd", mutates_args=())
def _flash_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                    backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if _use_triton(backend, q):
        return _k.with_fallback("attention", lambda: _triton_fwd(q, k, v, causal, scale),
                                lambda: _torch_fwd(q, k, v, causal, scale))
    return _torch_fwd(q, k, v, causal, scale)


@_flash_attn_fwd.register_fake
def _(q, k, v, causal, scale, backend):
    b, h, nq, d = q.shape
    return q.new_empty((b, nq, h, d)).transpose(1, 2), q.new_empty((b, h, nq), dtype=torch.float32)


@torch.library.custom_op("minti::flash_attn_bwd", mutates_args=())
def _flash_attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                    lse: torch.Tensor, causal: bool, scale: float,
                    backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (do, q, k, v, o, lse, causal, scale)
    if _use_triton(backend, q):  # the torch backward takes the Triton forward's lse as it is
        return _k.with_fallback("attention", lambda: _triton_bwd(*args), lambda: _torch_bwd(*args))
    return _torch_bwd(*args)


@_flash_attn_bwd.register_fake
def _(do, q, k, v, o, lse, causal, scale, backend):
    # Every path returns the gradients in _token_major_output's layout, whatever the inputs'
    # strides. Not modelled:
    # the Triton backward's transient fp32 buffers (dQ for the atomics, partial dK/dV for
    # split query ranges), small next to the activations (their sizes: bench/RESULTS.md).
    return tuple(t.new_empty((t.shape[0], t.shape[2], t.shape[1], t.shape[3])).transpose(1, 2) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)  # no N x N tensor is ever saved
    ctx.causal, ctx.scale, ctx.backend = causal, scale, backend


def _backward(ctx, dout, dlse):
    # lse is an internal output (never used by the caller), so its gradient is ignored.
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _flash_attn_bwd(dout, q, k, v, out, lse, ctx.causal, ctx.scale, ctx.backend)
    return dq, dk, dv, None, None, None


_flash_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """softmax(q k^T * scale [+ causal mask]) v, memory O(N) in forward and backward.

    q [B,H,Nq,D], k/v [B,H,Nk,D] -> [B,H,Nq,D]; scale defaults to 1/sqrt(D); causal is
    top-left aligned (query i sees keys j <= i). backend: "triton" (CUDA, or CPU under
    TRITON_INTERPRET=1), "torch" (torch's own ops, see _torch_path), "auto" (Triton on CUDA).
    """
    _check(q, k, v)
    if backend not in _k.BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: use one of {_k.BACKENDS}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, _ = _flash_attn_fwd(q, k, v, causal, scale, backend)
    return out
