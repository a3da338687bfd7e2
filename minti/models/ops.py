"""The three hot operations of the frozen networks, each in one place.

Every model calls these and nothing else for attention, GroupNorm+SiLU and GEGLU, so the
Triton kernels in minti.kernels can take them over without touching the models. Each
function falls back to plain torch when the kernel is missing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# "auto": Triton on CUDA sm_75+ (bf16 on sm_80+), torch elsewhere; "torch" / "triton" force one path (tests use this).
BACKEND = "auto"


def set_backend(name: str) -> None:
    global BACKEND
    if name not in ("auto", "torch", "triton"):
        raise ValueError(f"unknown backend {name!r}: use auto, torch or triton")
    BACKEND = name


def _kernel(name: str):
    try:
        import minti.kernels as k
    except ImportError:
        return None
    return getattr(k, name, None)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              upcast: bool = False) -> torch.Tensor:
    """Softmax attention. q [B,H,Nq,D], k/v [B,H,Nk,D] -> [B,H,Nq,D].

    upcast: compute scores in fp32 when inputs are half precision (SD 2.x needs it; the
    Triton kernel always accumulates in fp32, so there it costs nothing).
    """
    kernel = _kernel("flash_attention")
    if kernel is not None:
        return kernel(q, k, v, causal=causal, backend=BACKEND)
    if upcast and q.dtype in (torch.float16, torch.bfloat16):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def group_norm_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int,
                    eps: float, silu: bool = True) -> torch.Tensor:
    """GroupNorm (statistics in fp32) optionally followed by SiLU, as in every ResBlock."""
    kernel = _kernel("group_norm_silu")
    # The fused kernel has no weight gradient (frozen in textual inversion); a model being
    # trained (the tiny demo model's build) takes the plain path.
    if kernel is not None and not (weight.requires_grad or bias.requires_grad):
        return kernel(x, weight, bias, groups, eps, silu=silu, backend=BACKEND)
    y = F.group_norm(x.float(), groups, weight.float(), bias.float(), eps).to(x.dtype)
    return F.silu(y) if silu else y


def geglu(x: torch.Tensor) -> torch.Tensor:
    """GEGLU on the output of one projection: first half * gelu(second half)."""
    kernel = _kernel("geglu")
    if kernel is not None:
        return kernel(x, backend=BACKEND)
    a, gate = x.chunk(2, dim=-1)
    return a * F.gelu(gate)


class _InputGradConv2d(torch.autograd.Function):
    """conv2d whose backward computes only the input gradient.

    autograd's conv2d saves its input for the weight gradient even when the weight is
    frozen; in textual inversion every conv is frozen, so that input (the largest
    activation of each ResBlock) is dead weight. This saves only the weight, which is
    alive anyway.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        ctx.save_for_backward(weight)
        ctx.input_shape, ctx.stride, ctx.padding = x.shape, stride, padding
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx, grad_out):
        (weight,) = ctx.saved_tensors
        grad_in = torch.nn.grad.conv2d_input(ctx.input_shape, weight, grad_out, ctx.stride, ctx.padding)
        return grad_in, None, None, None, None


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int = 1,
           padding: int = 0) -> torch.Tensor:
    """F.conv2d that stores no activation when the weight is frozen."""
    if weight.requires_grad or (bias is not None and bias.requires_grad) or not x.requires_grad:
        return F.conv2d(x, weight, bias, stride, padding)
    return _InputGradConv2d.apply(x, weight, bias, stride, padding)


class Conv2d(torch.nn.Conv2d):
    """nn.Conv2d (same parameters and state-dict keys) routed through ops.conv2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv2d(x, self.weight, self.bias, self.stride, self.padding)
