"""The models give the same numbers whichever backend runs the hot ops (Triton runs in its
CPU interpreter here): output and text gradient within the dtype's tolerance."""
import dataclasses

import pytest
import torch

from minti.models import ops
from minti.models.clip import CLIP_L_SD1, OPENCLIP_H_SD2, build_text_encoder
from minti.models.unet import SD1, SD2, UNet

pytest.importorskip("triton")


@pytest.fixture(autouse=True)
def restore_backend():
    yield
    ops.set_backend("auto")


def narrow_unet(cfg) -> UNet:
    cfg = dataclasses.replace(cfg, model_channels=32, channel_mult=(1, 2), norm_groups=8,
                              context_dim=cfg.context_dim // 16, num_heads=4,
                              head_dim=8 if cfg.head_dim else None, transformer_depth=(1, 1),
                              transformer_depth_middle=1)
    torch.manual_seed(0)
    unet = UNet(cfg).requires_grad_(False)
    for p in unet.parameters():
        p.normal_(0, 0.05)
    return unet


def run_unet(unet: UNet, backend: str):
    ops.set_backend(backend)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 8, 8, generator=g)  # small: Triton is interpreted here
    context = torch.randn(1, 77, unet.cfg.context_dim, generator=g).requires_grad_(True)
    out = unet(x, torch.tensor([300]), context)
    (grad,) = torch.autograd.grad(out.pow(2).mean(), context)
    return out.detach(), grad


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("cfg", [SD1, SD2], ids=["sd1", "sd2"])
def test_unet_output_and_text_gradient_agree_across_backends(cfg):
    unet = narrow_unet(cfg)
    out_t, grad_t = run_unet(unet, "torch")
    out_k, grad_k = run_unet(unet, "triton")
    assert rel(out_k, out_t) <= 1e-4 and rel(grad_k, grad_t) <= 1e-4


@pytest.mark.parametrize("preset", [CLIP_L_SD1, OPENCLIP_H_SD2], ids=["clip-l", "openclip"])
def test_text_encoder_causal_attention_agrees_across_backends(preset):
    cfg = dataclasses.replace(preset, width=64, layers=2, heads=4, mlp_width=128,
                              projection_dim=32 if preset.projection_dim else None)
    torch.manual_seed(0)
    enc = build_text_encoder(cfg).requires_grad_(False)
    for name, p in enc.named_parameters():
        p.normal_(0, 0.05) if p.ndim > 1 else p.normal_(1.0 if name.endswith("weight") else 0.0, 0.05)
    tokens = torch.randint(0, 49406, (2, 77))
    extra = torch.randn(1, 64, requires_grad=True)
    tokens[:, 5] = 49408  # a placeholder: the gradient reaches `extra` through causal attention
    results = []
    for backend in ("torch", "triton"):
        ops.set_backend(backend)
        hidden, _ = enc(tokens, extra_embeddings=extra)
        (grad,) = torch.autograd.grad(hidden.pow(2).mean(), extra)
        results.append((hidden.detach(), grad))
    (h_t, g_t), (h_k, g_k) = results
    assert rel(h_k, h_t) <= 1e-4 and rel(g_k, g_t) <= 1e-4
