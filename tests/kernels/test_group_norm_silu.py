"""Fused GroupNorm+SiLU (Triton through the CPU interpreter, and torch) against float64
F.group_norm + F.silu: forward and input gradient, several chunks per group."""
import importlib

import kernel_testing as kt  # first: sets TRITON_INTERPRET before triton is imported
from kernel_testing import poisoned, triton_really_runs  # noqa: F401  (fixtures)
import pytest
import torch

import minti.kernels.launch as launch
from minti.models import ops

gn = importlib.import_module("minti.kernels.group_norm_silu")

# (shape, groups): 1144 and 16384 elements per group span 2 and 16 chunks of 1024 with a
# ragged tail / none; the 3D case is a [B, C, L] sequence.
CASES = [((2, 64, 13, 11), 8), ((1, 8, 64, 64), 2), ((1, 32, 77), 4)]


def _inputs(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    # Offset mean: the statistics must not lose precision to cancellation.
    x = (torch.randn(shape, generator=g) * 2 + 3).to(dtype)
    w = (1 + 0.5 * torch.randn(c, generator=g)).to(dtype)
    b = (0.5 * torch.randn(c, generator=g)).to(dtype)
    dout = torch.randn(shape, generator=g).to(dtype)
    return x, w, b, dout


@pytest.mark.parametrize("backend", kt.BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("silu", [True, False], ids=["silu", "plain"])
@pytest.mark.parametrize("shape,groups", CASES, ids=["4d", "4d-long-groups", "3d"])
def test_forward_and_input_grad_match_float64_reference(shape, groups, silu, dtype, backend, poisoned):
    x, w, b, dout = _inputs(shape, dtype, seed=len(shape) + groups)
    xl = x.clone().requires_grad_()
    out = gn.group_norm_silu(xl, w, b, groups, 1e-5, silu=silu, backend=backend)
    out.backward(dout)
    xr = x.double().requires_grad_()
    ref = gn.group_norm_silu_reference(xr, w.double(), b.double(), groups, 1e-5, silu=silu)
    ref.backward(dout.double())
    assert out.dtype == dtype and out.shape == x.shape
    tol = kt.TOL[dtype]
    assert kt.rel_err(out, ref) <= tol, f"out {kt.rel_err(out, ref):.2e}"
    assert kt.rel_err(xl.grad, xr.grad) <= tol, f"dx {kt.rel_err(xl.grad, xr.grad):.2e}"


@pytest.mark.parametrize("backend", kt.BACKENDS)
def test_frozen_affine_gets_no_gradient_and_only_x_plus_group_stats_are_saved(backend):
    x, w, b, dout = _inputs((2, 16, 5, 7), torch.float32, seed=0)
    x.requires_grad_()
    w.requires_grad_()
    b.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = gn.group_norm_silu(x, w, b, 4, 1e-6, backend=backend)
    out.backward(dout)
    assert x.grad is not None and w.grad is None and b.grad is None  # documented: frozen weights
    # x itself, the (already resident) weight and bias, mean and rstd of shape [B, G].
    fresh = [t for t in saved if not any(t is p for p in (x, w, b))]
    assert sorted(t.shape for t in fresh) == [(2, 4), (2, 4)]
    assert sum(t.numel() for t in saved) == x.numel() + w.numel() + b.numel() + 2 * 2 * 4


def test_runs_on_meta_device_with_right_shape():
    x = torch.empty(2, 320, 64, 64, device="meta", dtype=torch.float16, requires_grad=True)
    w = torch.empty(320, device="meta", dtype=torch.float16)
    for call in (lambda: gn.group_norm_silu(x, w, w, 32, 1e-5, backend="triton"),
                 lambda: gn.group_norm_silu(x, w, w, 32, 1e-5, backend="torch"),
                 lambda: ops.group_norm_silu(x, w, w, 32, 1e-5)):  # "auto", decided in minti.models.backends
        out = call()
        assert out.device.type == "meta" and out.shape == x.shape and out.dtype == x.dtype
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_triton_backend_raises_clearly_without_triton(monkeypatch):
    monkeypatch.setattr(launch, "HAS_TRITON", False)  # as if `import triton` had failed
    x, w, b, _ = _inputs((1, 8, 4, 4), torch.float32, seed=0)
    with pytest.raises(RuntimeError, match="Triton is not installed"):
        gn.group_norm_silu(x, w, b, 2, 1e-5, backend="triton")


def test_channels_not_divisible_by_groups_is_rejected():
    x = torch.randn(1, 10, 4, 4)
    with pytest.raises(ValueError, match="groups"):
        gn.group_norm_silu(x, torch.ones(10), torch.zeros(10), 4, 1e-5)


def test_traces_under_torch_compile():
    x, w, b, _ = _inputs((1, 8, 5, 6), torch.float32, seed=2)
    x.requires_grad_()
    compiled = torch.compile(lambda x: gn.group_norm_silu(x, w, b, 4, 1e-5, backend="torch"),
                             backend="aot_eager", fullgraph=True)
    compiled(x).sum().backward()
    xr = x.detach().double().requires_grad_()
    gn.group_norm_silu_reference(xr, w.double(), b.double(), 4, 1e-5).sum().backward()
    assert kt.rel_err(x.grad, xr.grad) <= 1e-5


@pytest.mark.skipif(not kt.triton_runs_here(), reason="Triton not installed (or no CUDA and TRITON_INTERPRET unset)")
def test_triton_path_merges_group_statistics_in_its_kernels_not_in_torch_ops():
    # At batch 1 each small torch op between the kernels is a launch that costs more CPU time
    # than the GPU work it does; the statistics merge used to be ten of them per call.
    x, w, b, dout = _inputs((1, 8, 64, 64), torch.float32, seed=2)  # 16 chunks per group
    x.requires_grad_()
    with kt.AtenOps() as fwd_ops:
        out = gn.group_norm_silu(x, w, b, 2, 1e-5, backend="triton")
    with kt.AtenOps() as bwd_ops:
        out.backward(dout)
    # Allocation, views, and the interpreter's own copies in and out of its numpy buffers.
    bookkeeping = {"empty", "new_empty", "view", "detach", "copy_", "set_", "_to_copy"}
    assert fwd_ops.names <= bookkeeping, fwd_ops.names - bookkeeping
    assert bwd_ops.names <= bookkeeping, bwd_ops.names - bookkeeping


@pytest.mark.parametrize("silu", [True, False], ids=["silu", "plain"])
def test_torch_path_is_native_group_norm_not_many_elementwise_ops(silu):
    # The torch path runs on every CPU: each small elementwise op is a pass over x, and on a
    # busy machine many of them cost far more than their arithmetic.
    x, w, b, dout = _inputs((1, 64, 32, 32), torch.float32, seed=3)
    x.requires_grad_()
    with kt.AtenOps() as fwd_ops:
        out = gn.group_norm_silu(x, w, b, 8, 1e-5, silu=silu, backend="torch")
    with kt.AtenOps() as bwd_ops:
        out.backward(dout)
    assert "native_group_norm" in fwd_ops.names and "native_group_norm_backward" in bwd_ops.names
    assert fwd_ops.calls <= 4 and bwd_ops.calls <= 5, (fwd_ops.names, bwd_ops.names)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=["fp16", "fp64"])
def test_torch_path_keeps_fp32_statistics_for_fp16_and_fp64_inputs(dtype):
    x, w, b, dout = _inputs((2, 32, 9, 7), dtype, seed=4)
    xl = x.clone().requires_grad_()
    out = gn.group_norm_silu(xl, w, b, 4, 1e-5, backend="torch")
    out.backward(dout)
    xr = x.double().requires_grad_()
    ref = gn.group_norm_silu_reference(xr, w.double(), b.double(), 4, 1e-5)
    ref.backward(dout.double())
    tol = {torch.float16: 2e-3, torch.float64: 1e-6}[dtype]
    assert out.dtype == dtype and kt.rel_err(out, ref) <= tol and kt.rel_err(xl.grad, xr.grad) <= tol
