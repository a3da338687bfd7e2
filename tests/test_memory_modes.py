"""Memory levers must not change the numbers: same gradients with and without them."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from minti import ops
from minti.unet import SD1, SD2, UNet


def narrow(cfg):
    return dataclasses.replace(cfg, model_channels=32, channel_mult=(1, 2), norm_groups=8,
                               context_dim=cfg.context_dim // 16, num_heads=4,
                               head_dim=8 if cfg.head_dim else None, transformer_depth=(1, 1),
                               transformer_depth_middle=1)


def context_grad(unet: UNet, x, t, context) -> torch.Tensor:
    context = context.clone().requires_grad_(True)
    out = unet(x, t, context)
    (grad,) = torch.autograd.grad(out.pow(2).mean(), context)
    return grad


@pytest.fixture(autouse=True)
def torch_backend():
    ops.set_backend("torch")
    yield
    ops.set_backend("auto")


@pytest.mark.parametrize("cfg", [SD1, SD2], ids=["sd1", "sd2"])
def test_block_checkpointing_gives_the_same_text_gradient(cfg):
    torch.manual_seed(0)
    unet = UNet(narrow(cfg)).requires_grad_(False)
    for p in unet.parameters():
        p.normal_(0, 0.05)
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([500])
    context = torch.randn(1, 77, unet.cfg.context_dim)
    plain = context_grad(unet, x, t, context)
    unet.checkpointing = True
    ours = context_grad(unet, x, t, context)
    assert (ours - plain).abs().max() <= 1e-5 * plain.abs().max()


def test_input_gradient_only_convs_give_the_same_text_gradient(monkeypatch):
    torch.manual_seed(0)
    unet = UNet(narrow(SD1)).requires_grad_(False)
    for p in unet.parameters():
        p.normal_(0, 0.05)
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([10])
    context = torch.randn(1, 77, unet.cfg.context_dim)
    ours = context_grad(unet, x, t, context)
    monkeypatch.setattr(ops, "conv2d", lambda x, w, b, stride=1, padding=0: F.conv2d(x, w, b, stride, padding))
    plain = context_grad(unet, x, t, context)
    assert (ours - plain).abs().max() <= 1e-5 * plain.abs().max()
