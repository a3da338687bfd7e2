"""Flash attention (Triton through the CPU interpreter, and the chunked torch path) against
a float64 reference: forward and dq/dk/dv, SD head dims, Nq != Nk, ragged lengths, causal."""
import importlib
import inspect
import itertools
import subprocess
import sys

import kernel_testing as kt  # first: sets TRITON_INTERPRET before triton is imported
from kernel_testing import poisoned, triton_really_runs  # noqa: F401  (fixtures)
import pytest
import torch

import minti.kernels.attention_torch as ts
import minti.kernels.attention_triton as at
import minti.kernels.configs as configs
import minti.kernels.launch as launch
from minti.models import backends, ops

fa = importlib.import_module("minti.kernels.flash_attention")  # the module, not the function minti.kernels exports

# (D, Nq, Nk): every SD head dim, none of the lengths a multiple of the 32-wide blocks.
SHAPES = [(40, 77, 130), (64, 130, 77), (80, 67, 200), (160, 200, 67)]


def _inputs(b, h, nq, nk, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(dtype) for n in (nq, nk, nk))
    do = torch.randn(b, h, nq, d, generator=g).to(dtype)
    return q, k, v, do


def _check_against_reference(q, k, v, do, causal, backend, scale=None, tol=None, where=""):
    """flash_attention's output and dq/dk/dv against the float64 reference, within tol (kt.TOL
    of the dtype unless given); `where` prefixes the failure message."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    runs = launch.TRITON_RUNS["attention"]
    out = fa.flash_attention(*leaves, causal=causal, scale=scale, backend=backend)
    out.backward(do)
    if backend == "triton":  # the forward and the backward both ran their Triton kernels
        assert launch.TRITON_RUNS["attention"] == runs + 2, f"{where}Triton did not run both ways"
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = ts.attention_reference(*ref_leaves, causal=causal, scale=scale)
    ref.backward(do.double())
    assert out.dtype == q.dtype and out.shape == q.shape
    tol = kt.TOL[q.dtype] if tol is None else tol
    for name, got, want in [("out", out, ref)] + [(f"d{n}", a.grad, r.grad) for n, a, r in zip("qkv", leaves, ref_leaves)]:
        err = kt.rel_err(got, want)
        assert err <= tol, f"{where}{name}: relative error {err:.2e} > {tol:.0e}"


@pytest.fixture
def small_torch_chunks(monkeypatch):
    # A few query rows per chunk: the torch path's chunk loop runs many times, with a tail.
    monkeypatch.setattr(ts, "TORCH_CHUNK_ELEMENTS", 1000)


@pytest.mark.parametrize("backend", kt.BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d,nq,nk", SHAPES)
def test_forward_and_grads_match_float64_reference(d, nq, nk, causal, dtype, backend, poisoned, small_torch_chunks):
    q, k, v, do = _inputs(1, 2, nq, nk, d, dtype, seed=d + nq)
    _check_against_reference(q, k, v, do, causal, backend)


@pytest.mark.skipif(at.triton is None, reason="Triton not installed")
@pytest.mark.parametrize("d,pieces", [(40, (32, 16)), (80, (64, 16)), (160, (128, 32)), (72, (64, 16)),
                                      (96, (64, 32)), (64, (64, 0)), (24, (32, 0)), (8, (16, 0)), (200, (256, 0))])
def test_head_dims_split_into_power_of_two_pieces_only_where_that_saves_work(d, pieces):
    assert configs.head_pieces(d, split=True) == pieces
    assert sum(pieces) >= d and sum(pieces) <= configs.head_pieces(d, split=False)[0]
    assert configs.head_pieces(d, split=False) == (max(16, 1 << (d - 1).bit_length()), 0)


@pytest.mark.skipif(not kt.triton_runs_here(), reason="Triton not installed (or no CUDA and TRITON_INTERPRET unset)")
@pytest.mark.parametrize("split", [True, False], ids=["split", "padded"])
@pytest.mark.parametrize("d", [40, 72, 80, 160])
def test_split_and_padded_head_tiles_both_match_the_reference(d, split, poisoned, monkeypatch):
    # 72 = 64 + 16 leaves 8 zero columns in the second piece; 80 and 160 fill it exactly.
    monkeypatch.setattr(configs, "SPLIT_HEAD_DIM", split)
    q, k, v, do = _inputs(1, 2, 45, 38, d, torch.float32, seed=d)
    _check_against_reference(q, k, v, do, False, "triton")
    _check_against_reference(q, k, v, do, True, "triton")


@pytest.mark.skipif(at.triton is None or "do_bench" not in inspect.signature(at.triton.autotune).parameters,
                    reason="Triton missing, or older than the autotuner's do_bench option")
def test_autotuner_times_configs_with_a_timer_that_allocates_no_l2_flush_buffer(monkeypatch):
    # Triton's default timer allocates 256 MB on the GPU; tuning happens mid-backward.
    for tuned in (at._attn_fwd_tuned, at._attn_bwd_dkdv_tuned, at._attn_bwd_dq_tuned):
        assert tuned.do_bench is at._time_for_tuning
    clock, durations = [0.0], itertools.cycle([1.0, 2.0, 3.0, 4.0, 5.0])

    class ClockEvent:  # torch.cuda.Event on a fake clock, in ms
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = clock[0]

        def elapsed_time(self, end):
            return end.t - self.t

    calls = []

    def kernel_call():
        calls.append(1)
        clock[0] += next(durations)

    monkeypatch.setattr(torch.cuda, "Event", ClockEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: pytest.fail("the timer allocated a tensor"))
    median, p20, p80 = at._time_for_tuning(kernel_call)  # the autotuner asks for (0.5, 0.2, 0.8)
    # A warm-up call (1 ms), 3 estimating calls (2, 3, 4 ms: 3 ms each), then 25 ms / 3 ms
    # = 8 timed runs of 5, 1, 2, 3, 4, 5, 1, 2 ms: sorted 1 1 2 2 3 4 5 5.
    assert len(calls) == 1 + 3 + 8
    assert (p20, median, p80) == (1.0, 3.0, 5.0)


@pytest.mark.skipif(not kt.triton_runs_here(), reason="Triton not installed (or no CUDA and TRITON_INTERPRET unset)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d,nq,nk", SHAPES)
def test_two_pass_backward_matches_the_reference_too(d, nq, nk, causal, dtype, poisoned, monkeypatch):
    # The tests above run the one-pass backward (atomic dQ): on the CPU there are no SMs to fill.
    monkeypatch.setattr(at, "ONE_PASS_BACKWARD", False)
    q, k, v, do = _inputs(1, 2, nq, nk, d, dtype, seed=d + nk)
    _check_against_reference(q, k, v, do, causal, "triton")


@pytest.mark.skipif(at.triton is None, reason="Triton not installed")
def test_backward_is_one_pass_unless_torch_asks_for_determinism(monkeypatch):
    assert at._one_pass_backward()
    torch.use_deterministic_algorithms(True)
    try:
        assert not at._one_pass_backward()
    finally:
        torch.use_deterministic_algorithms(False)
    monkeypatch.setattr(at, "ONE_PASS_BACKWARD", False)
    assert not at._one_pass_backward()


@pytest.mark.skipif(at.triton is None, reason="Triton not installed")
def test_query_range_splits_fill_a_gpu_only_where_key_blocks_are_few(monkeypatch):
    monkeypatch.setattr(at, "_sm_count", lambda device: 132)  # an H100
    sd15_64 = torch.empty(1, 8, 4096, 40)
    assert at._query_splits(sd15_64, 4096) == 1  # self-attention: 8 heads x 64 key blocks
    assert at._query_splits(sd15_64, 77) == 16  # cross: 8 x 2 programs -> 256, 256 rows each
    assert at._query_splits(torch.empty(1, 8, 256, 160), 77) == 1  # 16^2: too few rows to split
    monkeypatch.setattr(at, "_sm_count", lambda device: 0)  # the CPU: nothing to fill
    assert at._query_splits(sd15_64, 77) == 1


@pytest.mark.skipif(not kt.triton_runs_here(), reason="Triton not installed (or no CUDA and TRITON_INTERPRET unset)")
@pytest.mark.parametrize("one_pass", [True, False], ids=["one-pass", "two-pass"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_split_query_ranges_sum_to_the_reference_gradients(causal, one_pass, poisoned, monkeypatch):
    # 3 ranges over 300 query rows in 32-row blocks: 4 + 4 + 2 blocks, the last one ragged.
    monkeypatch.setattr(at, "_query_splits", lambda q, nk: 3)
    monkeypatch.setattr(at, "ONE_PASS_BACKWARD", one_pass)
    q, k, v, do = _inputs(1, 2, 300, 77, 40, torch.float32, seed=5)
    _check_against_reference(q, k, v, do, causal, "triton")


@pytest.mark.parametrize("backend", kt.BACKENDS)
def test_batch_and_heads_index_the_right_slices(backend, poisoned, small_torch_chunks):
    q, k, v, do = _inputs(2, 3, 37, 45, 24, torch.float32, seed=1)
    _check_against_reference(q, k, v, do, True, backend)


@pytest.mark.parametrize("backend", kt.BACKENDS)
@pytest.mark.parametrize("nq,nk", [(1, 77), (33, 1), (5, 9)])
def test_tiny_lengths_and_custom_scale(nq, nk, backend, poisoned):
    q, k, v, do = _inputs(1, 1, nq, nk, 64, torch.float32, seed=nq * 100 + nk)
    _check_against_reference(q, k, v, do, True, backend, scale=0.3)
    _check_against_reference(q, k, v, do, False, backend, scale=0.3)


@pytest.mark.parametrize("backend", kt.BACKENDS)
def test_non_contiguous_inputs_and_output_grad(backend, poisoned):
    # The models produce q/k/v as [B, N, H, D] views transposed to [B, H, N, D].
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 70, 2, 40, generator=g).transpose(1, 2)
    k = torch.randn(1, 50, 2, 40, generator=g).transpose(1, 2)
    v = torch.randn(1, 2, 40, 50, generator=g).transpose(2, 3)
    do = torch.randn(1, 70, 2, 40, generator=g).transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous() or do.is_contiguous())
    _check_against_reference(q, k, v, do, False, backend)


@pytest.mark.parametrize("backend", kt.BACKENDS)
def test_inputs_whose_head_dim_is_strided_as_in_the_vae(backend, poisoned):
    # The VAE's one-head attention views [B, C, H*W] as [B, 1, H*W, C]: the head dim is the
    # strided one, which aten's CPU flash attention cannot read in place.
    g = torch.Generator().manual_seed(4)
    q, k, v, do = (torch.randn(2, 1, 64, 48, generator=g).transpose(2, 3) for _ in range(4))
    assert all(t.stride(-1) != 1 for t in (q, k, v, do))
    _check_against_reference(q, k, v, do, False, backend)


@pytest.mark.parametrize("backend", kt.BACKENDS)
def test_forward_saves_only_qkv_output_and_row_lse(backend):
    q, k, v, _ = _inputs(1, 2, 67, 77, 40, torch.float32)
    q.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        fa.flash_attention(q, k, v, backend=backend)
    # q, k, v, out and lse [B, H, Nq]: nothing of size Nq x Nk.
    assert sorted(saved) == sorted([q.shape, k.shape, v.shape, q.shape, q.shape[:3]])


def test_runs_on_meta_device_with_right_shapes_and_grads():
    q = torch.empty(2, 8, 4096, 40, device="meta", dtype=torch.float16, requires_grad=True)
    k = torch.empty(2, 8, 77, 40, device="meta", dtype=torch.float16, requires_grad=True)
    v = torch.empty(2, 8, 77, 40, device="meta", dtype=torch.float16, requires_grad=True)
    out = ops.attention(q, k, v)  # backend "auto" must take the fake path
    assert out.device.type == "meta" and out.shape == (2, 8, 4096, 40) and out.dtype == torch.float16
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape


def test_custom_op_registration_passes_opcheck():
    q, k, v, _ = _inputs(1, 2, 9, 7, 16, torch.float32)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.minti.flash_attn_fwd.default, (q, k, v, True, 0.25, "torch"))


def test_traces_under_torch_compile():
    q, k, v, _ = _inputs(1, 2, 33, 20, 16, torch.float32)
    q.requires_grad_()
    compiled = torch.compile(lambda q, k, v: fa.flash_attention(q, k, v, causal=True, backend="torch"),
                             backend="aot_eager", fullgraph=True)
    out = compiled(q, k, v)
    out.sum().backward()
    ref = ts.attention_reference(q.detach().double(), k.double(), v.double(), causal=True)
    assert kt.rel_err(out, ref) <= 1e-5 and q.grad is not None


def test_triton_backend_raises_clearly_without_triton(monkeypatch):
    monkeypatch.setattr(launch, "HAS_TRITON", False)  # as if `import triton` had failed
    q, k, v, _ = _inputs(1, 1, 8, 8, 16, torch.float32)
    with pytest.raises(RuntimeError, match="Triton is not installed"):
        fa.flash_attention(q, k, v, backend="triton")
    assert backends.choose("attention", q, "auto") == "torch" and ops.attention(q, k, v).shape == q.shape  # auto falls back


def test_meta_tensors_take_the_fake_path_for_any_backend_and_unknown_backend_is_rejected():
    q = torch.empty(1, 1, 8, 16, device="meta")
    for backend in ("torch", "triton"):
        assert fa.flash_attention(q, q, q, backend=backend).shape == q.shape
    assert ops.attention(q, q, q).shape == q.shape  # "auto", decided in minti.models.backends
    for backend in ("cuda", "auto"):  # the kernel runs the path it is given; "auto" is the models' choice
        with pytest.raises(ValueError, match="unknown backend"):
            fa.flash_attention(q, q, q, backend=backend)


def test_float64_and_head_dims_over_256_fall_back_under_auto_and_raise_under_triton():
    for dtype, d in ((torch.float64, 16), (torch.float32, 264)):
        q = torch.randn(1, 1, 5, d, dtype=dtype)
        ref = ts.attention_reference(q.double(), q.double(), q.double())
        assert kt.rel_err(ops.attention(q, q, q), ref) <= 1e-5  # "auto"
        assert fa.triton_unsupported(q) is not None
        if kt.triton_runs_here():
            with pytest.raises(ValueError, match="head dim <= 256"):
                fa.flash_attention(q, q, q, backend="triton")


def test_package_imports_and_runs_with_triton_missing():
    # A fresh interpreter where `import triton` fails, as on macOS or a CPU-only install.
    code = """
import sys
sys.modules["triton"] = None
import torch
import minti.kernels as k
x = torch.randn(1, 8, 3, 4)
q = torch.randn(1, 2, 5, 16)
assert k.flash_attention(q, q, q).shape == q.shape
assert k.group_norm_silu(x, torch.ones(8), torch.zeros(8), 2, 1e-5).shape == x.shape
assert k.geglu(x).shape == (1, 8, 3, 2)
for call in (lambda: k.flash_attention(q, q, q, backend="triton"),
             lambda: k.group_norm_silu(x, torch.ones(8), torch.zeros(8), 2, 1e-5, backend="triton"),
             lambda: k.geglu(x, backend="triton")):
    try:
        call()
    except RuntimeError as e:
        assert "Triton is not installed" in str(e), e
    else:
        raise AssertionError("backend='triton' did not raise")
from minti.models import backends, ops
assert ops.attention(q, q, q).shape == q.shape and ops.geglu(x).shape == (1, 8, 3, 2)
assert "(Triton is not installed)" in backends.describe_backends("cpu", torch.float32)
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


TORCH_PATH_TOL = {torch.float16: 2e-3}  # beyond kt.TOL's fp32 and bf16


@pytest.mark.parametrize("path", ["cpu", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d,nq,nk", SHAPES)
def test_each_torch_path_matches_float64_reference(d, nq, nk, causal, dtype, path, poisoned, small_torch_chunks,
                                                   monkeypatch):
    # On the CPU every branch of the torch path runs: the device only picks which one.
    monkeypatch.setattr(ts, "path_for", lambda q: path)
    q, k, v, do = _inputs(2, 2, nq, nk, d, dtype, seed=d + nq + 1)
    _check_against_reference(q, k, v, do, causal, "torch", tol=TORCH_PATH_TOL.get(dtype))


def test_models_upcast_attention_takes_the_same_fp32_accumulating_torch_path():
    q, k, v, _ = _inputs(1, 2, 77, 77, 64, torch.bfloat16, seed=9)
    ref = ts.attention_reference(q.double(), k.double(), v.double(), causal=True)
    ops.set_backend("torch")
    try:
        out = ops.attention(q, k, v, causal=True, upcast=True)
    finally:
        ops.set_backend("auto")
    assert out.dtype == torch.bfloat16 and kt.rel_err(out, ref) <= kt.TOL[torch.bfloat16]


def test_triton_forward_lse_feeds_the_torch_backward_of_a_fallback():
    # A Triton backward that cannot launch falls back to the torch backward with the Triton
    # forward's lse: the two must agree on its units and layout.
    q, k, v, do = _inputs(1, 2, 45, 38, 40, torch.float32, seed=4)
    _, lse = ts.forward(q, k, v, True, 0.2)
    s = (q.double() @ k.double().transpose(-1, -2)) * 0.2
    s = s.masked_fill(torch.ones(45, 38, dtype=torch.bool).triu(1), float("-inf"))
    assert lse.dtype == torch.float32 and lse.shape == (1, 2, 45) and lse.is_contiguous()
    assert kt.rel_err(lse, torch.logsumexp(s, -1)) <= 1e-6
    o = ts.attention_reference(q, k, v, causal=True, scale=0.2)
    grads = ts.backward(do, q, k, v, o, torch.logsumexp(s, -1).float(), True, 0.2)
    refs = [t.double().requires_grad_() for t in (q, k, v)]
    ts.attention_reference(*refs, causal=True, scale=0.2).backward(do.double())
    for got, r in zip(grads, refs):
        assert got.transpose(1, 2).is_contiguous() and kt.rel_err(got, r.grad) <= kt.TOL[torch.float32]


def test_torch_path_is_one_fused_op_each_way_on_the_cpu():
    # The chunked path it replaces ran ~10 small ops per chunk each way (many elementwise
    # launches; on a busy CPU those cost far more than their FLOPs).
    # (The custom op hides its insides from a dispatch mode: the path's functions are recorded.)
    q, k, v, do = _inputs(1, 8, 1024, 77, 40, torch.float32, seed=6)
    with kt.AtenOps() as fwd_ops:
        out, lse = ts.forward(q, k, v, False, 0.15)
    with kt.AtenOps() as bwd_ops:
        ts.backward(do, q, k, v, out, lse, False, 0.15)
    assert "_scaled_dot_product_flash_attention_for_cpu" in fwd_ops.names
    assert "_scaled_dot_product_flash_attention_for_cpu_backward" in bwd_ops.names
    assert fwd_ops.calls <= 4 and bwd_ops.calls <= 8, (fwd_ops.calls, bwd_ops.calls)


# ------------------------------------------------------------------ the CUDA torch path (no Triton)

def _cuda_like(dtype, d):
    return type("Q", (), {"device": torch.device("cuda"), "dtype": dtype, "shape": (1, 8, 64, d)})()


def test_cuda_without_triton_takes_memory_efficient_attention_for_every_model_dtype(monkeypatch):
    monkeypatch.setattr(ts, "EFFICIENT_FAILED", [])
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for d in (40, 64, 80, 160, 512):  # SD's head dims, the VAE's 512 included
            assert ts.path_for(_cuda_like(dtype, d)) == "efficient"
    assert ts.path_for(_cuda_like(torch.float64, 64)) == "chunked"  # no fp64 kernel
    assert ts.path_for(_cuda_like(torch.float32, 36)) == "chunked"  # rows the kernel cannot align
    mps = type("Q", (), {"device": torch.device("mps"), "dtype": torch.float32, "shape": (1, 8, 64, 64)})()
    assert ts.path_for(mps) == "chunked"


def test_efficient_path_calls_fit_aten_schemas_and_return_the_shared_layouts():
    # The meta kernels check every argument the CUDA ops take: a wrong order or count fails here.
    q, do = torch.empty(2, 3, 70, 40, device="meta"), torch.empty(2, 3, 70, 40, device="meta")
    k = v = torch.empty(2, 77, 3, 40, device="meta").transpose(1, 2)  # cross-attention context
    out, lse = ts.efficient_forward(q, k, v, False, 0.2)
    assert out.shape == q.shape and out.transpose(1, 2).is_contiguous()
    assert lse.shape == (2, 3, 70) and lse.dtype == torch.float32 and lse.is_contiguous()
    for got, like in zip(ts.efficient_backward(do, q, k, v, out, lse, True, 0.2), (q, k, v)):
        assert got.shape == like.shape and got.transpose(1, 2).is_contiguous()


class _EfficientKernelContract:
    """aten's memory-efficient attention on the CPU, keeping the CUDA kernel's contract (its meta
    registration and kernel source): out [B,H,M,K] over [B,M,H,K] memory, lse fp32 in natural
    log padded to a multiple of 32 rows with +inf; the backward takes that padded lse as given."""

    def __init__(self):
        self.calls = []

    @staticmethod
    def _scores(q, k, causal, scale):
        s = (q.double() @ k.double().transpose(-1, -2)) * scale
        if causal:
            s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
        return s

    def forward(self, q, k, v, bias, compute_lse, dropout_p=0.0, is_causal=False, *, scale=None):
        self.calls.append("fwd")
        assert bias is None and compute_lse and dropout_p == 0.0
        b, h, m, d = q.shape
        s = self._scores(q, k, is_causal, scale)
        lse = torch.full((b, h, -(-m // 32) * 32), float("inf"))
        lse[..., :m] = torch.logsumexp(s, -1).float()
        out = (torch.softmax(s, -1) @ v.double()).to(q.dtype).transpose(1, 2).contiguous().transpose(1, 2)
        return out, lse, torch.empty((), dtype=torch.int64), torch.empty((), dtype=torch.int64)

    def backward(self, do, q, k, v, bias, out, lse, seed, offset, dropout_p, mask, is_causal=False, *, scale=None):
        self.calls.append("bwd")
        m = q.shape[2]
        assert lse.dtype == torch.float32 and lse.shape[-1] == -(-m // 32) * 32 and lse[..., m:].isinf().all()
        p = torch.exp(self._scores(q, k, is_causal, scale) - lse[..., :m, None].double())  # from the lse given
        do64, v64 = do.double(), v.double()
        ds = p * (do64 @ v64.transpose(-1, -2) - (do64 * out.double()).sum(-1, keepdim=True))
        grads = ((ds @ k.double()) * scale, (ds.transpose(-1, -2) @ q.double()) * scale, p.transpose(-1, -2) @ do64)
        return *(g.to(q.dtype) for g in grads), None


@pytest.fixture
def efficient_contract(monkeypatch):
    """The torch path on the CPU taking its "efficient" branch, into the contract above."""
    contract = _EfficientKernelContract()
    monkeypatch.setattr(ts, "EFFICIENT_FAILED", [])
    monkeypatch.setattr(ts, "path_for", lambda q: "efficient" if not ts.EFFICIENT_FAILED else "chunked")
    monkeypatch.setattr(ts, "efficient_attention", contract.forward)
    monkeypatch.setattr(ts, "efficient_attention_backward", contract.backward)
    return contract


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d,nq,nk", [SHAPES[0], SHAPES[2]])
def test_efficient_path_saves_the_unpadded_lse_and_hands_the_kernel_its_padding_back(d, nq, nk, causal,
                                                                                     efficient_contract):
    q, k, v, do = _inputs(2, 2, nq, nk, d, torch.float32, seed=d + nq + 2)
    _check_against_reference(q, k, v, do, causal, "torch")
    assert efficient_contract.calls == ["fwd", "bwd"]


def test_efficient_kernel_that_cannot_run_warns_once_and_the_chunked_path_takes_over(efficient_contract,
                                                                                     monkeypatch):
    def no_kernel(*args, **kwargs):
        raise RuntimeError("cutlassF: no kernel found to launch!")

    monkeypatch.setattr(ts, "efficient_attention", no_kernel)
    q, k, v, _ = _inputs(1, 2, 45, 38, 40, torch.float32, seed=5)
    ref = ts.attention_reference(q.double(), k.double(), v.double())
    with pytest.warns(RuntimeWarning, match="no kernel found"):
        assert kt.rel_err(fa.flash_attention(q, k, v, backend="torch"), ref) <= kt.TOL[torch.float32]
    assert kt.rel_err(fa.flash_attention(q, k, v, backend="torch"), ref) <= kt.TOL[torch.float32]  # no new warning
    assert ts.EFFICIENT_FAILED == ["cutlassF: no kernel found to launch!"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_efficient_path_matches_float64_reference_on_cuda(causal, dtype, monkeypatch):
    monkeypatch.setattr(ts, "EFFICIENT_FAILED", [])
    for d, nq, nk in SHAPES:
        q, k, v, do = (t.cuda() for t in _inputs(2, 2, nq, nk, d, dtype, seed=d + nq + 3))
        assert ts.path_for(q) == "efficient"
        _check_against_reference(q, k, v, do, causal, "torch", tol=TORCH_PATH_TOL.get(dtype), where=f"d{d} ")
        assert not ts.EFFICIENT_FAILED, ts.EFFICIENT_FAILED
