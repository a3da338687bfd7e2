"""Attention's torch paths: the float64-friendly reference, and the path every device without
the Triton kernels takes (aten's fused attention ops on the CPU and CUDA, query chunks
elsewhere), with the layout every path returns.

Each forward returns (out, lse) and each backward takes them back, as the Triton path does
(minti.kernels.flash_attention picks between them): out [B,H,Nq,D] over token-major memory,
lse the natural-log row log-sum-exp, fp32 [B,H,Nq].
"""
from __future__ import annotations

import warnings

import torch

from minti.kernels.launch import acc_dtype, new_output


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


def path_for(q: torch.Tensor) -> str:
    """Which of the paths above q takes: "cpu", "efficient" or "chunked"."""
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


def token_major_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A [B, H, N, D] view over [B, N, H, D] memory: the layout every path returns.

    The models' projections produce and consume [B, N, H*D]; in this layout the merge of the
    heads after attention (and the split of the gradients before the projections' backward)
    is a view, not a copy per tensor. aten's fused attention ops return this layout too."""
    b, h, n, d = shape
    return new_output((b, n, h, d), dtype, device).transpose(1, 2)


def token_major(x: torch.Tensor) -> torch.Tensor:
    return x if x.transpose(1, 2).is_contiguous() else x.transpose(1, 2).contiguous().transpose(1, 2)


def forward(q, k, v, causal: bool, scale: float):
    path = path_for(q)
    if path == "cpu":
        q, k, v = _unit_stride_rows(q, k, v)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        return token_major(out), lse.float().contiguous()  # lse comes as a [B, Nq, H] transpose
    if path == "efficient":
        return _efficient_or_chunked(lambda: efficient_forward(q, k, v, causal, scale),
                                     lambda: chunked_forward(q, k, v, causal, scale))
    return chunked_forward(q, k, v, causal, scale)


def backward(do, q, k, v, o, lse, causal: bool, scale: float):
    """Gradients from the saved tensors; lse may be the Triton forward's (a fallback), which
    is the same natural-log lse in fp32 [B, H, Nq] that every torch forward returns."""
    path = path_for(q)
    if path == "cpu":
        do, q, k, v, o = _unit_stride_rows(do.to(q.dtype), q, k, v, o)
        lse = lse.to(acc_dtype(q.dtype))  # the kernel wants its accumulation dtype (fp64 for fp64)
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, o, lse, 0.0, causal, scale=scale)
        return tuple(token_major(g) for g in grads)
    if path == "efficient":
        return _efficient_or_chunked(lambda: efficient_backward(do, q, k, v, o, lse, causal, scale),
                                     lambda: chunked_backward(do, q, k, v, o, lse, causal, scale))
    return chunked_backward(do, q, k, v, o, lse, causal, scale)


# The memory-efficient kernel pads its lse to a multiple of this many query rows (+inf past
# Nq, so those rows' probabilities are 0) and its backward reads the padded rows.
EFFICIENT_LSE_ROWS = 32
efficient_attention = torch.ops.aten._scaled_dot_product_efficient_attention
efficient_attention_backward = torch.ops.aten._scaled_dot_product_efficient_attention_backward


def efficient_forward(q, k, v, causal: bool, scale: float):
    q, k, v = _unit_stride_rows(q, k, v)
    out, lse, _, _ = efficient_attention(q, k, v, None, True, 0.0, causal, scale=scale)  # True: return the lse
    # The saved lse is [B, H, Nq] like every path's (the padding comes back in the backward).
    return token_major(out), lse[..., :q.shape[2]].contiguous()


def efficient_backward(do, q, k, v, o, lse, causal: bool, scale: float):
    do, q, k, v, o = _unit_stride_rows(do.to(q.dtype), q, k, v, o)
    nq = q.shape[2]
    lse = torch.nn.functional.pad(lse.float(), (0, -nq % EFFICIENT_LSE_ROWS), value=float("inf"))
    no_dropout = q.new_empty((), dtype=torch.int64)  # the philox seed and offset, unread at p = 0
    dq, dk, dv, _ = efficient_attention_backward(
        do, q, k, v, None, o, lse, no_dropout, no_dropout, 0.0, [True, True, True, False], causal, scale=scale)
    return token_major(dq), token_major(dk), token_major(dv)


# Upper bound on B*H*rows*Nk score elements the chunked path holds at once.
# Tests lower it so the chunk loop runs several times with a ragged tail.
TORCH_CHUNK_ELEMENTS = 1 << 24


def _chunk_rows(q: torch.Tensor, nk: int) -> int:
    b, h, nq, _ = q.shape
    return max(1, min(nq, TORCH_CHUNK_ELEMENTS // max(1, b * h * nk)))


def _masked_scores(qc: torch.Tensor, k: torch.Tensor, start: int, causal: bool, scale: float) -> torch.Tensor:
    s = (qc @ k.transpose(-1, -2)) * scale
    if causal:
        rows = torch.arange(start, start + qc.shape[-2], device=qc.device)
        keep = torch.arange(k.shape[-2], device=qc.device)[None, :] <= rows[:, None]
        s = s.masked_fill(~keep, float("-inf"))
    return s


def chunked_forward(q, k, v, causal: bool, scale: float):
    b, h, nq, d = q.shape
    acc = acc_dtype(q.dtype)
    out = token_major_output((b, h, nq, d), q.dtype, q.device)
    lse = new_output((b, h, nq), torch.float32, q.device)
    kf, vf = k.to(acc), v.to(acc)
    step = _chunk_rows(q, k.shape[2])
    for s0 in range(0, nq, step):
        s = _masked_scores(q[:, :, s0:s0 + step].to(acc), kf, s0, causal, scale)
        lse_c = torch.logsumexp(s, dim=-1)
        out[:, :, s0:s0 + step] = (torch.exp(s - lse_c[..., None]) @ vf).to(q.dtype)
        lse[:, :, s0:s0 + step] = lse_c.float()
    return out, lse


def chunked_backward(do, q, k, v, o, lse, causal: bool, scale: float):
    acc = acc_dtype(q.dtype)
    kf, vf = k.to(acc), v.to(acc)
    dq = token_major_output(q.shape, q.dtype, q.device)
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
    return dq, token_major(dk.to(k.dtype)), token_major(dv.to(v.dtype))
