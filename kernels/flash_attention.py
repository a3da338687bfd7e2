"""Flash attention: softmax(q k^T * scale) v without ever storing the N x N score matrix.

Layout: q [B,H,Nq,D], k/v [B,H,Nk,D] -> out [B,H,Nq,D]. Two paths keep one contract:
attention_triton (the Triton kernels) and attention_torch (aten's fused attention ops, query
chunks where those cannot run). Each forward saves only q, k, v, out and the per-row
log-sum-exp (lse, fp32 [B,H,Nq]), and either backward takes the other's lse, so a Triton
backward that cannot launch falls back to the torch one.

The entry point is a torch custom op (forward and backward are separate ops with fake
implementations) so the models trace on the meta device and under torch.compile. The caller
names the path (backend="torch" or "triton"); minti.models.ops chooses it for the models.
"""
from __future__ import annotations

import math

import torch

import minti.kernels.attention_torch as attention_torch
import minti.kernels.attention_triton as attention_triton
import minti.kernels.configs as configs
from minti.kernels.launch import INTERPRETED, check_path, check_triton_runs, with_fallback

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_MAX_HEAD_DIM = 256


def triton_unsupported(q: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot take q here (its dtype, its head dim, or no config measured
    for that head dim on q's GPU), None if they can. Under "auto" such inputs take the torch
    path (minti.models.backends); backend="triton" raises the reason."""
    d = q.shape[-1]
    if q.dtype not in TRITON_DTYPES or d > TRITON_MAX_HEAD_DIM:
        return f"flash_attention Triton path supports fp16/bf16/fp32 and head dim <= 256, got {q.dtype} and {d}"
    if q.is_cuda and not INTERPRETED and not configs.has_configs(d, q.dtype, configs.device_limits(q.device)):
        # a head dim past what the register budget measured
        return (f"flash_attention has no Triton config measured for head dim {d} in {q.dtype} on this GPU "
                f"(see bench/compile_targets.py)")
    return None


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("flash_attention expects q, k, v of shape [B, H, N, D]")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


@torch.library.custom_op("minti::flash_attn_fwd", mutates_args=())
def _flash_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                    backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        return with_fallback("attention", lambda: attention_triton.forward(q, k, v, causal, scale),
                             lambda: attention_torch.forward(q, k, v, causal, scale))
    return attention_torch.forward(q, k, v, causal, scale)


@_flash_attn_fwd.register_fake
def _(q, k, v, causal, scale, backend):
    b, h, nq, d = q.shape
    return q.new_empty((b, nq, h, d)).transpose(1, 2), q.new_empty((b, h, nq), dtype=torch.float32)


@torch.library.custom_op("minti::flash_attn_bwd", mutates_args=())
def _flash_attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                    lse: torch.Tensor, causal: bool, scale: float,
                    backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (do, q, k, v, o, lse, causal, scale)
    if backend == "triton":  # the torch backward takes the Triton forward's lse as it is
        return with_fallback("attention", lambda: attention_triton.backward(*args),
                             lambda: attention_torch.backward(*args))
    return attention_torch.backward(*args)


@_flash_attn_bwd.register_fake
def _(do, q, k, v, o, lse, causal, scale, backend):
    # Every path returns the gradients in token_major_output's layout, whatever the inputs'
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
                    scale: float | None = None, backend: str = "torch") -> torch.Tensor:
    """softmax(q k^T * scale [+ causal mask]) v, memory O(N) in forward and backward.

    q [B,H,Nq,D], k/v [B,H,Nk,D] -> [B,H,Nq,D]; scale defaults to 1/sqrt(D); causal is
    top-left aligned (query i sees keys j <= i). backend: "triton" (CUDA, or CPU under
    TRITON_INTERPRET=1; raises where it cannot run, see triton_unsupported) or "torch" (torch's
    own ops, see attention_torch.path_for). minti.models.ops.attention chooses for the models.
    """
    _check(q, k, v)
    check_path("flash_attention", backend)
    if backend == "triton":
        check_triton_runs(q)
        reason = None if q.is_meta else triton_unsupported(q)
        if reason is not None:
            raise ValueError(f"{reason}; use backend='torch'")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, _ = _flash_attn_fwd(q, k, v, causal, scale, backend)
    return out
