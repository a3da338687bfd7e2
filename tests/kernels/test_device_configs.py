"""Which kernels and configs run on which GPU, decided from the device's properties alone
(made-up devices here: sm_86, sm_75, sm_61, no bf16), and the one line that says so."""
import importlib

import kernel_testing as kt  # noqa: F401  (first: sets TRITON_INTERPRET)
import pytest
import torch

import minti.kernels as kernels

fa = importlib.import_module("minti.kernels.flash_attention")
pytestmark = pytest.mark.skipif(fa.triton is None, reason="Triton not installed")

SM86, SM75 = kernels.TARGET_LIMITS["sm_86"], kernels.TARGET_LIMITS["sm_75"]
SM61 = kernels.DeviceLimits((6, 1), 48 * 1024)
SD_HEAD_DIMS = (40, 64, 80, 160)
KINDS = ("fwd", "bwd_dkdv", "bwd_dq")


@pytest.mark.parametrize("limits", list(kernels.TARGET_LIMITS.values()), ids=list(kernels.TARGET_LIMITS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_every_kernel_keeps_a_config_that_fits_at_every_sd_head_dim(limits, dtype):
    for kind in KINDS:
        for d in SD_HEAD_DIMS:
            usable = fa.usable_configs(kind, d, dtype, limits)
            assert usable, f"{kind} d{d} {dtype} on sm_{limits.capability}: nothing fits"
            assert all(fa.shared_bytes_estimate(kind, c, d, dtype) <= limits.shared_bytes for c in usable)
            assert set(usable) <= set(fa.ATTENTION_CONFIGS[kind])


def test_a_smaller_shared_memory_keeps_a_subset_of_the_configs():
    for kind in KINDS:
        for d in SD_HEAD_DIMS:
            sm75 = fa.usable_configs(kind, d, torch.float16, SM75)
            sm86 = fa.usable_configs(kind, d, torch.float16, SM86)
            assert set(sm75) <= set(sm86)
    # head dim 160 in fp32 is where the 64 KiB of sm_75 bites: some configs must go there
    assert len(fa.usable_configs("bwd_dkdv", 160, torch.float32, SM75)) < len(fa.ATTENTION_CONFIGS["bwd_dkdv"])


def test_no_config_on_devices_triton_cannot_target_or_bf16_without_bf16():
    for kind in KINDS:
        assert fa.usable_configs(kind, 64, torch.float16, SM61) == []
        assert fa.usable_configs(kind, 64, torch.bfloat16, SM75) == []
        assert fa.usable_configs(kind, 64, torch.bfloat16, SM86)


def test_the_autotuner_prunes_with_the_running_devices_limits(monkeypatch):
    monkeypatch.setattr(kernels, "device_limits", lambda device: SM75)
    prune = fa._attn_bwd_dkdv_tuned.early_config_prune
    q = torch.empty(1, dtype=torch.float32)
    kept = prune(fa._attn_bwd_dkdv_tuned.configs, {"Q": q}, D=160)
    assert [fa._config_tuple(c) for c in kept] == fa.usable_configs("bwd_dkdv", 160, torch.float32, SM75)
    monkeypatch.setattr(kernels, "device_limits", lambda device: None)  # the CPU: nothing to prune
    assert prune(fa._attn_bwd_dkdv_tuned.configs, {"Q": q}, D=160) == fa._attn_bwd_dkdv_tuned.configs


def fake_cuda(monkeypatch, limits):
    monkeypatch.setattr(kernels, "device_limits", lambda device: limits if torch.device(device).type == "cuda" else None)


@pytest.mark.parametrize("limits,dtype,reason", [
    (SM86, torch.bfloat16, None), (SM86, torch.float16, None), (SM75, torch.float16, None),
    (SM75, torch.bfloat16, "sm_75 has no bf16"), (SM61, torch.float16, "sm_61 is older than sm_75"),
], ids=["sm86-bf16", "sm86-fp16", "sm75-fp16", "sm75-bf16", "sm61-fp16"])
def test_auto_takes_triton_only_where_the_device_runs_it_in_that_dtype(monkeypatch, limits, dtype, reason):
    fake_cuda(monkeypatch, limits)
    got = kernels.triton_unusable_reason(torch.device("cuda"), dtype)
    assert (got is None) if reason is None else (reason in got)
    line = kernels.describe_backends("cuda:0", dtype)
    assert "\n" not in line
    for op in kernels.OPS:
        assert f"{op} {'triton' if reason is None else 'torch'}" in line
    if reason:
        assert reason in line


def test_describe_backends_says_why_on_the_cpu_and_names_a_failed_op(monkeypatch):
    line = kernels.describe_backends("cpu", torch.float32)
    assert "attention torch" in line and "not a CUDA device" in line
    assert "backend='torch'" in kernels.describe_backends("cpu", torch.float32, backend="torch")
    fake_cuda(monkeypatch, SM86)
    monkeypatch.setattr(kernels, "FAILED_OPS", {"geglu": "OutOfResources: shared"})
    line = kernels.describe_backends("cuda", torch.float16)
    assert "attention triton" in line and "geglu torch (its Triton launch failed: OutOfResources" in line
