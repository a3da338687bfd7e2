import torch
import torch.nn.functional as F

from minti.models import ops
from minti.training.memtrace import MemoryTracer


def test_input_grad_conv_matches_autograd_conv_gradient():
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3, dtype=torch.float64)
    b = torch.randn(8, dtype=torch.float64)
    for stride, padding in ((1, 1), (2, 0), (1, 0)):
        x = torch.randn(2, 4, 11, 9, dtype=torch.float64, requires_grad=True)
        g = torch.randn_like(F.conv2d(x, w, b, stride, padding))
        (ref,) = torch.autograd.grad(F.conv2d(x, w, b, stride, padding), x, g)
        out = ops.conv2d(x, w, b, stride, padding)
        (ours,) = torch.autograd.grad(out, x, g)
        assert torch.equal(out, F.conv2d(x, w, b, stride, padding))
        assert (ours - ref).abs().max() <= 1e-12 * ref.abs().max()


def test_input_grad_conv_keeps_no_activation_alive():
    with torch.device("meta"):
        conv = ops.Conv2d(64, 64, 3, padding=1).requires_grad_(False)
        plain = torch.nn.Conv2d(64, 64, 3, padding=1).requires_grad_(False)
        v = torch.zeros(1, 64, 32, 32, requires_grad=True)

    def held_after_forward(layer) -> int:
        with MemoryTracer([layer], extra=[v]) as tracer:
            y = layer(v * 2)  # v * 2 is the activation a plain conv keeps for its weight grad
            tracer._sweep()
            assert y.requires_grad
            return tracer.current_bytes

    assert held_after_forward(plain) - held_after_forward(conv) == 64 * 32 * 32 * 4


def test_frozen_weights_fall_back_to_plain_conv_when_they_need_gradients():
    conv = ops.Conv2d(2, 2, 1)
    x = torch.randn(1, 2, 3, 3)
    conv(x).sum().backward()
    assert conv.weight.grad is not None


def test_group_norm_gives_weight_gradients_when_weights_are_trained():
    x = torch.randn(2, 8, 4, 4)
    w = torch.ones(8, requires_grad=True)
    b = torch.zeros(8, requires_grad=True)
    ops.group_norm_silu(x, w, b, 4, 1e-5).sum().backward()
    assert w.grad is not None and b.grad is not None and w.grad.abs().sum() > 0
