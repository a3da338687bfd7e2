"""Frozen weights stored in 8 bits (torch.float8_e4m3fn), widened one layer at a time.

Textual inversion never updates the UNet's or the text encoders' weights, so their Linear and
Conv weights can sit in memory as fp8 with one scale per output channel, and be widened to the
compute dtype (the dtype of the activations) only for the one matmul or conv that reads them.

    with torch.device("meta"):
        unet = UNet(cfg)
    use_fp8_weights(unet)                       # fp8 layers, still on meta
    load_per_tensor(unet, checkpoint_tensors)   # each full-precision tensor quantised as it arrives

Keys stay the checkpoint's: the quantised parameter keeps its name (`weight`, or OpenCLIP's
`in_proj_weight`), and its scale is a non-persistent buffer (`weight_scale`) filled by the
layer's load pre-hook, which quantises the full-precision tensor handed to it by name.

Scales are powers of two: widening is then exact in fp16, bf16 and fp32 alike (an fp8 value
times 2^k is representable), including small-magnitude channels whose amax/448 would be an fp16
subnormal; and quantising a widened weight gives back the same bytes. Per output channel rather
than per tensor: on Gaussian weights both give the same error, on heavy-tailed ones per channel
is slightly better, and a channel far smaller than the tensor's largest one keeps its precision
instead of sinking into fp8 subnormals (the measurements are in bench/RESULTS.md).

Norms, biases, token/position tables, OpenCLIP's text_projection and the whole VAE stay as they
are: they are small, or (the VAE) leave the device once the latents are cached.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from minti.models import clip, ops
from minti.models.vae import AutoencoderKL

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
# Each channel's largest value is scaled into (232, 464]. Above 448 it saturates to 448, half an
# fp8 step (16) or less off, within e4m3's rounding bound. At the bottom it rounds to 240 or more,
# inside the same binade: quantising the widened weight picks the same scale again, byte for
# byte. With (224, 448] instead, a channel whose largest value rounds down to exactly 224 would
# get half the scale the second time.
SCALE_TARGET = 464.0
KEEP: tuple[str, ...] = ()  # module names use_fp8_weights leaves in full precision by default
WEIGHTS = (None, "fp8")  # what minti.load(weights=) accepts: None keeps the compute dtype


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, ...] -> (q: float8_e4m3fn, same shape; scale: float32 [out, 1, ...], powers
    of two) with weight ~= q * scale. Computed in fp32 (one tensor's transient at load time)."""
    w = weight.float()
    amax = w.abs().amax(dim=tuple(range(1, w.ndim)), keepdim=True)
    # smallest power of two that maps amax to SCALE_TARGET or below; an all-zero channel gets scale 1
    scale = torch.where(amax > 0, torch.exp2(torch.ceil(torch.log2(amax / SCALE_TARGET))), torch.ones_like(amax))
    q = (w / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight in `dtype`: one new tensor of the weight's size (widened in place)."""
    return q.to(dtype).mul_(scale.to(dtype))


# ---- widening inside autograd ----------------------------------------------------------------
#
# Where the widened copy lives and dies: `dequantize` makes it inside forward (and again inside
# backward); the matmul/conv reads it, and it is freed when forward/backward returns, because
# autograd saved only the fp8 weight and its scale (the parameter and buffer, alive anyway).
# Layers run one after another, so at most one layer's widened weight is alive at a time.
# The weights are frozen: backward computes the input gradient only (the bias gradient too if a
# caller unfroze the bias; it costs no saved tensor).

class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, q, scale, bias):
        ctx.save_for_backward(q, scale)
        return F.linear(x, dequantize(q, scale, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        q, scale = ctx.saved_tensors
        grad_x = grad_out @ dequantize(q, scale, grad_out.dtype) if ctx.needs_input_grad[0] else None
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.needs_input_grad[3] else None
        return grad_x, None, None, grad_bias


class _Fp8Conv2d(torch.autograd.Function):
    """ops._InputGradConv2d's input-gradient-only backward, saving the fp8 weight: neither the
    input (as autograd's conv would, for a weight gradient) nor the widened weight is kept."""

    @staticmethod
    def forward(ctx, x, q, scale, bias, stride, padding):
        ctx.save_for_backward(q, scale)
        ctx.input_shape, ctx.stride, ctx.padding = x.shape, stride, padding
        return F.conv2d(x, dequantize(q, scale, x.dtype), bias, stride, padding)

    @staticmethod
    def backward(ctx, grad_out):
        q, scale = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            weight = dequantize(q, scale, grad_out.dtype)
            grad_x = torch.nn.grad.conv2d_input(ctx.input_shape, weight, grad_out, ctx.stride, ctx.padding)
        grad_bias = grad_out.sum((0, 2, 3)) if ctx.needs_input_grad[3] else None
        return grad_x, None, None, grad_bias, None, None


def fp8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _Fp8Linear.apply(x, q, scale, bias)


def fp8_conv2d(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
               stride, padding) -> torch.Tensor:
    return _Fp8Conv2d.apply(x, q, scale, bias, stride, padding)


# ---- the layers ------------------------------------------------------------------------------

def _store_fp8(module: nn.Module, name: str) -> None:
    """Replace module.<name> by its fp8 form and a `<name>_scale` buffer (meta stays meta)."""
    weight = getattr(module, name)
    if weight.is_meta:
        q = torch.empty(weight.shape, dtype=FP8, device="meta")
        scale = torch.ones((weight.shape[0],) + (1,) * (weight.ndim - 1), device="meta")
    else:
        q, scale = quantize(weight.detach())
    setattr(module, name, nn.Parameter(q, requires_grad=False))
    module.register_buffer(name + "_scale", scale, persistent=False)
    module.register_load_state_dict_pre_hook(_quantize_on_load)


def _quantize_on_load(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Quantise the full-precision tensors handed to this layer by name (its checkpoint keys)."""
    for name in module.FP8_PARAMS:
        key = prefix + name
        weight = state_dict.get(key)
        if weight is None:
            continue
        if weight.dtype == FP8 and not weight.is_meta:  # meta: the loader's dry run of a file's shapes
            raise ValueError(f"{key!r} is already fp8 and its scale is not in the state dict: load the "
                             "full-precision weights, they are quantised on load")
        state_dict[key], scale = quantize(weight)
        setattr(module, name + "_scale", scale)


class Fp8Linear(nn.Linear):
    """nn.Linear whose weight is stored in fp8 (same state-dict keys; see the module docstring)."""

    FP8_PARAMS = ("weight",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.weight_scale, self.bias)


class Fp8Conv2d(ops.Conv2d):
    """ops.Conv2d whose weight is stored in fp8 (same state-dict keys)."""

    FP8_PARAMS = ("weight",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_conv2d(x, self.weight, self.weight_scale, self.bias, self.stride, self.padding)


class Fp8FusedSelfAttention(clip.FusedSelfAttention):
    """OpenCLIP's fused q/k/v projection (a fifth of bigG's weights) stored in fp8."""

    FP8_PARAMS = ("in_proj_weight",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = fp8_linear(x, self.in_proj_weight, self.in_proj_weight_scale, self.in_proj_bias)
        q, k, v = (clip.split_heads(t, self.heads) for t in qkv.chunk(3, dim=-1))
        return self.out_proj(clip.merge_heads(ops.attention(q, k, v, causal=True)))


# plain layer -> its fp8 variant (a subclass: isinstance checks and the parent's forward still hold)
FP8_VARIANTS = {nn.Linear: Fp8Linear, nn.Conv2d: Fp8Conv2d, ops.Conv2d: Fp8Conv2d,
                clip.FusedSelfAttention: Fp8FusedSelfAttention}


def use_fp8_weights(model: nn.Module, skip: Iterable[str] = KEEP) -> nn.Module:
    """Store the Linear / Conv2d weights of a UNet or text encoder in fp8, in place, on any
    device (on `meta` before loading: the layers' load hooks then quantise what they receive).

    skip: module names (as in named_modules) kept in full precision, with everything under them.
    Modules already fp8 are left alone, so calling it twice is harmless.
    """
    if isinstance(model, AutoencoderKL):
        raise ValueError("the VAE keeps its weights: it encodes the images once and leaves the device")
    skip = tuple(skip)
    for name, module in model.named_modules():
        new_class = FP8_VARIANTS.get(type(module))
        if new_class is None or any(name == s or name.startswith(s + ".") for s in skip):
            continue  # not a plain Linear/Conv2d (norms, embeddings, fp8 layers already), or kept
        # same object, new class: parameters, hooks and the parent's reference all stay
        module.__class__ = new_class
        for param in new_class.FP8_PARAMS:
            _store_fp8(module, param)
    return model


# ---- loading and accounting --------------------------------------------------------------------

def load_per_tensor(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Fill a meta-built model as load_state_dict(strict=True, assign=True) would, from (name,
    full-precision tensor) pairs read one at a time. Each weight of an fp8 layer goes to its layer
    as it arrives and is quantised there; the other tensors (norms, biases, embeddings: they stay
    in full precision anyway) are loaded together at the end by the model's own load_state_dict,
    so every load hook runs as in a plain load (CLIP's position_ids, OpenCLIP's logit_scale fill
    what a file lacks). The peak is the fp8 model plus one full-precision tensor, never a second
    full-precision copy of the fp8 weights. Every key must come exactly once (or be filled by a hook)."""
    layers = {(f"{name}.{param}" if name else param): module for name, module in model.named_modules()
              for param in getattr(module, "FP8_PARAMS", ())}
    expected = set(model.state_dict())
    seen: set[str] = set()
    rest: dict[str, torch.Tensor] = {}
    for name, tensor in tensors:
        if name not in expected or name in seen:
            raise KeyError(f"{name!r}: {'given twice' if name in seen else 'not a key of this model'}")
        seen.add(name)
        if name in layers:
            layers[name].load_state_dict({name.rpartition(".")[2]: tensor}, strict=False, assign=True)
        else:
            rest[name] = tensor
        del tensor  # the quantised copy is the layer's now; the full-precision one dies here
    result = model.load_state_dict(rest, strict=False, assign=True)
    missing = sorted(k for k in result.missing_keys if k not in seen)
    if missing:
        raise KeyError(f"{len(missing)} keys never given, e.g. {missing[0]!r}")


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the model's tensors: fp8 weights, their scales, and everything else."""
    out = {"fp8": 0, "scales": 0, "rest": 0}
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    scales = {name + "_scale" for name, t in tensors.items() if t.dtype == FP8}
    for name, t in tensors.items():
        kind = "fp8" if t.dtype == FP8 else "scales" if name in scales else "rest"
        out[kind] += t.numel() * t.element_size()
    return out


def describe_weight_bytes(parts: dict[str, nn.Module]) -> str:
    """One line for the run's start: 'weights: unet 1.60 GiB (fp8 1.59, scales 0.00, rest 0.01), …'."""
    gib = 2 ** 30
    items = []
    for part, module in parts.items():
        b = weight_bytes(module)
        detail = f" (fp8 {b['fp8'] / gib:.2f}, scales {b['scales'] / gib:.2f}, rest {b['rest'] / gib:.2f})" \
            if b["fp8"] else ""
        items.append(f"{part} {sum(b.values()) / gib:.2f} GiB{detail}")
    return "weights: " + ", ".join(items)
