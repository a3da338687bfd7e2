"""GEGLU (Triton through the CPU interpreter, and torch) against float64 a * gelu(gate):
forward and input gradient, ragged sizes, strided rows, only x saved."""
import importlib

import kernel_testing as kt  # first: sets TRITON_INTERPRET before triton is imported
from kernel_testing import poisoned, triton_really_runs  # noqa: F401  (fixtures)
import pytest
import torch

import minti.kernels.launch as launch
from minti.models import ops

gg = importlib.import_module("minti.kernels.geglu")

# 37 * 160 = 5920 outputs: two 4096-wide interpreter blocks, the second ragged.
SHAPES = [(1, 37, 320), (2, 3, 5, 48)]


def _check(x, dout, backend):
    xl = x.detach().clone().requires_grad_()
    out = gg.geglu(xl, backend=backend)
    out.backward(dout)
    xr = x.detach().double().requires_grad_()
    ref = gg.geglu_reference(xr)
    ref.backward(dout.double())
    assert out.dtype == x.dtype and out.shape == (*x.shape[:-1], x.shape[-1] // 2)
    tol = kt.TOL[x.dtype]
    assert kt.rel_err(out, ref) <= tol, f"out {kt.rel_err(out, ref):.2e}"
    assert kt.rel_err(xl.grad, xr.grad) <= tol, f"dx {kt.rel_err(xl.grad, xr.grad):.2e}"


@pytest.mark.parametrize("backend", kt.BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=["3d", "4d"])
def test_forward_and_input_grad_match_float64_reference(shape, dtype, backend, poisoned):
    g = torch.Generator().manual_seed(shape[-1])
    x = (2 * torch.randn(shape, generator=g)).to(dtype)
    dout = torch.randn(*shape[:-1], shape[-1] // 2, generator=g).to(dtype)
    _check(x, dout, backend)


@pytest.mark.parametrize("backend", kt.BACKENDS)
def test_strided_rows_and_non_contiguous_output_grad(backend, poisoned):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 11, 100, generator=g)[..., :64]  # row stride 100, not 64
    dout = torch.randn(3, 32, 11, generator=g).transpose(1, 2)
    assert not x.is_contiguous() and not dout.is_contiguous()
    _check(x, dout, backend)


@pytest.mark.parametrize("backend", kt.BACKENDS)
def test_only_the_input_is_saved_for_backward(backend):
    x = torch.randn(2, 9, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        gg.geglu(x, backend=backend)
    assert len(saved) == 1 and saved[0] is x


def test_runs_on_meta_device_with_right_shape():
    x = torch.empty(2, 4096, 2560, device="meta", dtype=torch.float16, requires_grad=True)
    for call in (lambda: gg.geglu(x, backend="triton"), lambda: gg.geglu(x, backend="torch"),
                 lambda: ops.geglu(x)):  # "auto", decided in minti.models.backends
        out = call()
        assert out.device.type == "meta" and out.shape == (2, 4096, 1280) and out.dtype == x.dtype
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_triton_backend_raises_clearly_without_triton(monkeypatch):
    monkeypatch.setattr(launch, "HAS_TRITON", False)  # as if `import triton` had failed
    with pytest.raises(RuntimeError, match="Triton is not installed"):
        gg.geglu(torch.randn(2, 8), backend="triton")


def test_odd_last_dim_is_rejected():
    with pytest.raises(ValueError, match="even"):
        gg.geglu(torch.randn(2, 7))


def test_traces_under_torch_compile():
    x = torch.randn(2, 5, 12, requires_grad=True)
    compiled = torch.compile(lambda x: gg.geglu(x, backend="torch"), backend="aot_eager", fullgraph=True)
    compiled(x).sum().backward()
    xr = x.detach().double().requires_grad_()
    gg.geglu_reference(xr).sum().backward()
    assert kt.rel_err(x.grad, xr.grad) <= 1e-5


def test_torch_path_is_fused_gelu_not_many_elementwise_ops():
    x = torch.randn(1, 256, 2560, requires_grad=True)
    dout = torch.randn(1, 256, 1280)
    with kt.AtenOps() as fwd_ops:
        out = gg.geglu(x, backend="torch")
    with kt.AtenOps() as bwd_ops:
        out.backward(dout)
    assert "gelu" in fwd_ops.names and "gelu_backward" in bwd_ops.names
    assert fwd_ops.calls <= 3 and bwd_ops.calls <= 6, (fwd_ops.names, bwd_ops.names)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=["fp16", "fp64"])
def test_torch_path_matches_reference_for_fp16_and_fp64(dtype):
    g = torch.Generator().manual_seed(7)
    x = (2 * torch.randn(2, 9, 96, generator=g)).to(dtype).requires_grad_()
    dout = torch.randn(2, 9, 48, generator=g).to(dtype)
    out = gg.geglu(x, backend="torch")
    out.backward(dout)
    xr = x.detach().double().requires_grad_()
    gg.geglu_reference(xr).backward(dout.double())
    tol = {torch.float16: 2e-3, torch.float64: 1e-12}[dtype]
    assert out.dtype == dtype and kt.rel_err(out, gg.geglu_reference(xr)) <= tol
    assert kt.rel_err(x.grad, xr.grad) <= tol
