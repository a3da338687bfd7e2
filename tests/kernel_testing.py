"""Shared by the kernel tests: run Triton through its CPU interpreter, measure errors.

Import this module before anything that imports triton or minti.kernels: triton.jit
reads TRITON_INTERPRET when the kernels are decorated (at import).
"""
from __future__ import annotations

import collections
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import minti.kernels.launch as launch  # noqa: E402

TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max|a - ref| / max|ref|; NaN anywhere in a (an unwritten poisoned element) -> inf.

    An all-zero reference (e.g. dq when each query sees a single key) gives max|a|."""
    a, ref = a.detach().double(), ref.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    scale = ref.abs().max().item()
    return (a - ref).abs().max().item() / (scale if scale > 0 else 1.0)


def triton_runs_here() -> bool:
    """Triton installed, and either a GPU or kernels decorated in interpreter mode (if some
    other module imported minti.kernels before TRITON_INTERPRET was set, they were not)."""
    return launch.HAS_TRITON and (torch.cuda.is_available() or launch.INTERPRETED)


BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not triton_runs_here(), reason="Triton not installed (or no CUDA and TRITON_INTERPRET unset)"))]


@pytest.fixture
def poisoned(monkeypatch):
    """NaN-fill every output buffer the kernels allocate, so unwritten elements show."""
    monkeypatch.setattr(launch, "POISON_OUTPUTS", True)


def triton_runs() -> int:
    """How many Triton calls (forwards and backwards, every op) have run so far."""
    return sum(launch.TRITON_RUNS.values())


@pytest.fixture(autouse=True)
def triton_really_runs(request, monkeypatch):
    """Autouse in every module that imports it: a Triton launch that fails raises rather than
    falling back to torch (launch.STRICT), and a test parametrized with backend="triton" fails
    unless a Triton kernel ran, so it cannot pass by comparing torch with torch."""
    monkeypatch.setattr(launch, "STRICT", True)
    callspec = getattr(request.node, "callspec", None)
    wants_triton = callspec is not None and callspec.params.get("backend") == "triton"
    before = triton_runs()
    yield
    if wants_triton:
        assert triton_runs() > before, "backend='triton' but no Triton kernel ran"


def _patch_interpreter_bf16_rounding() -> None:
    """Make the interpreter round fp32 -> bf16 to nearest-even, as the GPU does.

    Triton's numpy interpreter truncates on that cast (its fp32 -> bf16 path ignores the
    rounding mode), doubling bf16 error versus real hardware and biasing it toward zero.
    The tests measure the kernels' arithmetic, not that emulator artefact.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import triton.language as tl
    except ImportError:
        return
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.cast_impl
    if getattr(original, "_minti_rne", False):
        return

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            nan = np.isnan(src.data)
            rounded[nan] = 0x7FC0
            return interpreter.TensorHandle(rounded, tl.bfloat16)
        return original(self, src, dst_type)

    cast_impl._minti_rne = True
    interpreter.InterpreterBuilder.cast_impl = cast_impl


_patch_interpreter_bf16_rounding()


class AtenOps(TorchDispatchMode):
    """Records the name of every aten op that runs while active (`counts` per name), and counts
    the calls that are not views or allocations (those launch no work)."""

    FREE = {"empty", "new_empty", "empty_strided", "view", "detach", "t", "transpose", "permute", "slice",
            "split", "split_with_sizes", "chunk", "unsqueeze", "squeeze", "expand", "alias", "_unsafe_view",
            "as_strided", "select", "reshape"}

    def __init__(self):
        super().__init__()
        self.names = set()
        self.counts = collections.Counter()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.names.add(name)
        self.counts[name] += 1
        self.calls += name not in self.FREE
        return func(*args, **(kwargs or {}))
