"""Memory levers must not change the numbers: same gradients with and without them."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from minti.models import ops
from minti.models.unet import SD1, SD2, UNet


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


def random_unet_and_inputs(cfg, t: int):
    """A narrow frozen UNet with random weights, and seeded (x, t, context) for it."""
    torch.manual_seed(0)
    unet = UNet(narrow(cfg)).requires_grad_(False)
    for p in unet.parameters():
        p.normal_(0, 0.05)
    return unet, torch.randn(1, 4, 16, 16), torch.tensor([t]), torch.randn(1, 77, unet.cfg.context_dim)


# the models on their pure-torch paths (the kernels have their own tests)
pytestmark = pytest.mark.usefixtures("torch_backend")


@pytest.mark.parametrize("cfg", [SD1, SD2], ids=["sd1", "sd2"])
def test_block_checkpointing_gives_the_same_text_gradient(cfg):
    unet, x, t, context = random_unet_and_inputs(cfg, 500)
    plain = context_grad(unet, x, t, context)
    unet.checkpointing = True
    ours = context_grad(unet, x, t, context)
    assert (ours - plain).abs().max() <= 1e-5 * plain.abs().max()


def test_input_gradient_only_convs_give_the_same_text_gradient(monkeypatch):
    unet, x, t, context = random_unet_and_inputs(SD1, 10)
    ours = context_grad(unet, x, t, context)
    monkeypatch.setattr(ops, "conv2d", lambda x, w, b, stride=1, padding=0: F.conv2d(x, w, b, stride, padding))
    plain = context_grad(unet, x, t, context)
    assert (ours - plain).abs().max() <= 1e-5 * plain.abs().max()


@pytest.mark.parametrize("recompute", [{1, 2}, {5, 6, 7}, {3, 9, 12}], ids=["inputs", "middle", "outputs"])
def test_recomputing_some_blocks_gives_the_same_text_gradient(recompute):
    unet, x, t, context = random_unet_and_inputs(SD1, 500)
    plain = context_grad(unet, x, t, context)
    unet.recompute = frozenset(recompute)
    calls = [0] * len(unet.blocks)
    for i, block in enumerate(unet.blocks):  # counted in forward itself: a recompute runs no module hooks
        block.forward = lambda *args, i=i, forward=block.forward: calls.__setitem__(i, calls[i] + 1) or forward(*args)
    ours = context_grad(unet, x, t, context)
    assert calls == [2 if i in recompute else 1 for i in range(13)]  # forward, then the recompute in backward
    assert not unet.checkpointing
    assert (ours - plain).abs().max() <= 1e-5 * plain.abs().max()


def test_checkpointing_means_every_block_or_none():
    unet, *_ = random_unet_and_inputs(SD1, 0)
    unet.checkpointing = True
    assert unet.recompute == frozenset(range(13)) and unet.checkpointing
    unet.checkpointing = False
    assert unet.recompute == frozenset() and not unet.checkpointing


def test_estimated_peak_of_a_real_size_step_grows_with_resolution_and_shrinks_with_checkpointing():
    from minti.training.memory import estimate_step_bytes
    from minti.loading.pipeline import random_model

    sd = random_model("sd1", torch.float16, "meta")
    small = estimate_step_bytes(sd, 128, 1, checkpointing=False)
    big = estimate_step_bytes(sd, 256, 1, checkpointing=False)
    low = estimate_step_bytes(sd, 256, 1, checkpointing=True)
    assert (859_520_964 + 123_060_480) * 2 < small < big and low < big
