"""The three hot operations of the frozen networks, each in one place.

Every model calls these and nothing else for attention, GroupNorm+SiLU and GEGLU, so the
Triton kernels in minti.kernels can take them over without touching the models. Which path
each call takes (Triton kernel or torch) is decided in minti.models.backends; set_backend
forces one (tests).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from minti.kernels import flash_attention, geglu as geglu_kernel, group_norm_silu as group_norm_silu_kernel
from minti.models.backends import choose, set_backend  # noqa: F401  (re-exported: tests and weights/build_tiny.py call ops.set_backend)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              upcast: bool = False) -> torch.Tensor:
    """Softmax attention. q [B,H,Nq,D], k/v [B,H,Nk,D] -> [B,H,Nq,D].

    upcast: compute scores in fp32 when inputs are half precision (SD 2.x needs it). Every
    path of the kernel accumulates in fp32 whatever the input dtype, so it costs nothing.
    """
    return flash_attention(q, k, v, causal=causal, backend=choose("attention", q))


def group_norm_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int,
                    eps: float, silu: bool = True) -> torch.Tensor:
    """GroupNorm (statistics in fp32) optionally followed by SiLU, as in every ResBlock."""
    # The fused kernel has no weight gradient (frozen in textual inversion); a model being
    # trained (the tiny demo model's build) takes the plain path.
    if not (weight.requires_grad or bias.requires_grad):
        return group_norm_silu_kernel(x, weight, bias, groups, eps, silu=silu, backend=choose("group_norm_silu", x))
    y = F.group_norm(x.float(), groups, weight.float(), bias.float(), eps).to(x.dtype)
    return F.silu(y) if silu else y


def geglu(x: torch.Tensor) -> torch.Tensor:
    """GEGLU on the output of one projection: first half * gelu(second half)."""
    return geglu_kernel(x, backend=choose("geglu", x))


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
