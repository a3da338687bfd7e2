"""A Triton launch that cannot run on this GPU (out of shared memory, a compile error) drops
that op to the torch path with one warning, and the numbers stay right."""
import importlib
import warnings

import kernel_testing as kt  # first: sets TRITON_INTERPRET before triton is imported
import pytest
import torch

import minti.kernels.attention_torch as ts
import minti.kernels.attention_triton as at
import minti.kernels.launch as launch

fa = importlib.import_module("minti.kernels.flash_attention")
gn = importlib.import_module("minti.kernels.group_norm_silu")
gg = importlib.import_module("minti.kernels.geglu")
pytestmark = pytest.mark.skipif(not kt.triton_runs_here(), reason="Triton not installed (or not interpreted)")


@pytest.fixture(autouse=True)
def no_failed_ops(monkeypatch):
    # The behaviour of a real run: a failed launch falls back (the other kernel tests make it raise).
    monkeypatch.setattr(launch, "FAILED_OPS", {})
    monkeypatch.setattr(launch, "STRICT", False)


def out_of_resources(*args, **kwargs):
    from triton.runtime.errors import OutOfResources

    raise OutOfResources(232448, 101376, "shared memory")


def test_attention_falls_back_to_torch_with_one_warning_when_a_launch_is_out_of_resources(monkeypatch):
    monkeypatch.setattr(at, "forward", out_of_resources)
    monkeypatch.setattr(at, "backward", out_of_resources)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 33, 40, generator=g).requires_grad_() for _ in range(3))
    with pytest.warns(RuntimeWarning, match="attention takes the torch path") as caught:
        out = fa.flash_attention(q, k, v, backend="triton")
        out.sum().backward()
        fa.flash_attention(q, k, v, backend="triton")  # later calls: no second warning
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    assert "OutOfResources" in launch.FAILED_OPS["attention"]
    ref = ts.attention_reference(q.detach().double(), k.detach().double(), v.detach().double())
    assert kt.rel_err(out, ref) <= 1e-5 and q.grad is not None and torch.isfinite(q.grad).all()


def test_backward_alone_falls_back_using_the_triton_forwards_saved_statistics(monkeypatch):
    monkeypatch.setattr(at, "backward", out_of_resources)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 20, 16, generator=g, dtype=torch.float64).float().requires_grad_() for _ in range(3))
    with pytest.warns(RuntimeWarning, match="attention"):
        fa.flash_attention(q, k, v, causal=True, backend="triton").pow(2).sum().backward()
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ts.attention_reference(*leaves, causal=True).pow(2).sum().backward()
    for got, ref in zip((q, k, v), leaves):
        assert kt.rel_err(got.grad, ref.grad) <= 1e-4


def test_group_norm_and_geglu_fall_back_on_a_compile_error(monkeypatch):
    from triton.compiler.errors import CompilationError

    def compile_error(*args, **kwargs):
        raise CompilationError("kernel.py", None, "unsupported on this target")

    monkeypatch.setattr(gn, "_triton_fwd", compile_error)
    monkeypatch.setattr(gg, "_triton_fwd", compile_error)
    x = torch.randn(2, 8, 4, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = gn.group_norm_silu(x, torch.ones(8), torch.zeros(8), 4, 1e-5, backend="triton")
        z = gg.geglu(x, backend="triton")
    assert sorted(launch.FAILED_OPS) == ["geglu", "group_norm_silu"] and len(caught) == 2
    assert kt.rel_err(y, gn.group_norm_silu_reference(x.double(), torch.ones(8).double(), torch.zeros(8).double(), 4, 1e-5)) <= 1e-5
    assert kt.rel_err(z, gg.geglu_reference(x.double())) <= 1e-5


def test_errors_that_are_not_launch_failures_still_raise(monkeypatch):
    monkeypatch.setattr(at, "forward", lambda *a: (_ for _ in ()).throw(ValueError("a real bug")))
    q = torch.randn(1, 1, 8, 16)
    with pytest.raises(ValueError, match="a real bug"):
        fa.flash_attention(q, q, q, backend="triton")
    assert launch.FAILED_OPS == {}


def test_strict_mode_raises_a_failed_launch_instead_of_taking_the_torch_path(monkeypatch):
    monkeypatch.setattr(launch, "STRICT", True)
    monkeypatch.setattr(at, "forward", out_of_resources)
    q = torch.randn(1, 1, 8, 16)
    with pytest.raises(launch.LAUNCH_ERRORS, match="shared memory"):
        fa.flash_attention(q, q, q, backend="triton")
    assert launch.FAILED_OPS == {}


def test_each_triton_call_that_runs_is_counted_and_a_fallback_is_not(monkeypatch):
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    before = launch.TRITON_RUNS["geglu"]
    gg.geglu(x, backend="triton").sum().backward()
    assert launch.TRITON_RUNS["geglu"] == before + 2  # forward and backward
    monkeypatch.setattr(gg, "_triton_fwd", out_of_resources)
    with pytest.warns(RuntimeWarning, match="geglu takes the torch path"):
        gg.geglu(x, backend="triton")
    assert launch.TRITON_RUNS["geglu"] == before + 2
