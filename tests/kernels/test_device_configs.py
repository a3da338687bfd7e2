"""Which kernels and configs run on which GPU, decided from the device's properties alone
(made-up devices here: sm_86, sm_75, sm_61, no bf16), and the one line that says so."""
import kernel_testing as kt  # noqa: F401  (first: sets TRITON_INTERPRET)
import pytest
import torch

import minti.kernels.attention_triton as at
import minti.kernels.configs as configs
import minti.kernels.launch as launch
from minti.models import backends

pytestmark = pytest.mark.skipif(at.triton is None, reason="Triton not installed")

SM86, SM75 = configs.TARGET_LIMITS["sm_86"], configs.TARGET_LIMITS["sm_75"]
SM61 = configs.DeviceLimits((6, 1), 48 * 1024)
SD_HEAD_DIMS = (40, 64, 80, 160)
KINDS = ("fwd", "bwd_dkdv", "bwd_dq")


@pytest.mark.parametrize("limits", list(configs.TARGET_LIMITS.values()), ids=list(configs.TARGET_LIMITS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_every_kernel_keeps_a_config_that_fits_at_every_sd_head_dim(limits, dtype):
    if not configs.dtype_supported(dtype, limits):
        pytest.skip("no bf16 kernels on this target")
    widest = configs.WIDEST_CLEAN[configs.target_class(limits.capability)]["fp32" if dtype == torch.float32 else "half"]
    for kind in KINDS:
        for d in SD_HEAD_DIMS:
            usable = configs.usable_configs(kind, d, dtype, limits)
            assert 1 <= len(usable) <= configs.MAX_TUNED_CONFIGS, f"{kind} d{d} {dtype} on sm_{limits.capability}"
            assert all(configs.shared_bytes_estimate(kind, c, d, dtype) <= limits.shared_bytes for c in usable)
            assert all(widest[kind][c] >= sum(configs.head_pieces(d)) for c in usable)
            order = configs.ATTENTION_CONFIGS[kind]
            assert [order.index(c) for c in usable] == sorted(order.index(c) for c in usable)


def test_the_register_budget_table_names_only_listed_configs_for_every_class():
    for cls in ("sm_75", "sm_8x", "sm_90", "sm_120"):
        for operand in ("half", "fp32"):
            for kind in KINDS:
                assert set(configs.WIDEST_CLEAN[cls][operand][kind]) <= set(configs.ATTENTION_CONFIGS[kind])


@pytest.mark.parametrize("capability,cls", [((7, 5), "sm_75"), ((8, 0), "sm_8x"), ((8, 6), "sm_8x"), ((8, 9), "sm_8x"),
                                            ((9, 0), "sm_90"), ((12, 0), "sm_120")])
def test_each_compute_capability_reads_its_own_class_of_the_register_budget(capability, cls):
    assert configs.target_class(capability) == cls


def test_the_register_budget_drops_configs_wider_than_they_compiled_clean(monkeypatch):
    # A made-up budget on a made-up Ampere with shared memory to spare: only the budget prunes.
    candidates = [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2), (32, 32, 4, 2), (16, 16, 8, 1)]
    budget = {(128, 64, 8, 3): 160, (64, 32, 4, 2): 64, (32, 32, 4, 2): 80, (16, 16, 8, 1): 160}  # 64x64 spilled
    monkeypatch.setattr(configs, "ATTENTION_CONFIGS", {"fwd": candidates})
    monkeypatch.setattr(configs, "WIDEST_CLEAN", {"sm_8x": {"half": {"fwd": budget}}})
    roomy = configs.DeviceLimits((8, 6), 1 << 30)
    assert configs.usable_configs("fwd", 40, torch.float16, roomy) == [(128, 64, 8, 3), (64, 32, 4, 2), (32, 32, 4, 2)]
    assert configs.usable_configs("fwd", 64, torch.bfloat16, roomy) == [(128, 64, 8, 3), (64, 32, 4, 2), (32, 32, 4, 2)]
    assert configs.usable_configs("fwd", 80, torch.float16, roomy) == [(128, 64, 8, 3), (32, 32, 4, 2), (16, 16, 8, 1)]
    assert configs.usable_configs("fwd", 160, torch.float16, roomy) == [(128, 64, 8, 3), (16, 16, 8, 1)]
    # the same budget with sm_86's shared memory: at 160 the 128x64 blocks no longer fit
    assert configs.usable_configs("fwd", 160, torch.float16, SM86) == [(16, 16, 8, 1)]
    with pytest.raises(KeyError):  # fp32 reads its own budget, which this made-up table lacks
        configs.usable_configs("fwd", 64, torch.float32, roomy)


def test_a_config_that_spilled_on_one_class_of_gpu_stays_usable_on_another():
    # The real budget: the forward's 128x64 8-warp blocks spilled on sm_75 (at every head dim)
    # and past head dim 64 on sm_86, not on sm_90; sm_75 keeps only small blocks.
    big = (128, 64, 8, 3)
    sm90 = configs.TARGET_LIMITS["sm_90"]
    assert big in configs.usable_configs("fwd", 64, torch.float16, sm90)
    assert big in configs.usable_configs("fwd", 64, torch.float16, SM86)
    assert big not in configs.usable_configs("fwd", 80, torch.float16, configs.DeviceLimits((8, 0), 163 * 1024))
    assert big not in configs.usable_configs("fwd", 64, torch.float16, configs.DeviceLimits((7, 5), 1 << 30))
    assert all(m * n <= 64 * 32 for m, n, _, _ in configs.usable_configs("fwd", 40, torch.float16, SM75))


def test_no_config_on_devices_triton_cannot_target_or_bf16_without_bf16():
    for kind in KINDS:
        assert configs.usable_configs(kind, 64, torch.float16, SM61) == []
        assert configs.usable_configs(kind, 64, torch.bfloat16, SM75) == []
        assert configs.usable_configs(kind, 64, torch.bfloat16, SM86)


def test_the_autotuner_prunes_with_the_running_devices_limits(monkeypatch):
    monkeypatch.setattr(configs, "device_limits", lambda device: SM75)
    prune = at._attn_bwd_dkdv_tuned.early_config_prune
    q = torch.empty(1, dtype=torch.float32)
    kept = prune(at._attn_bwd_dkdv_tuned.configs, {"Q": q}, D=160)
    assert [at._config_tuple(c) for c in kept] == configs.usable_configs("bwd_dkdv", 160, torch.float32, SM75)
    monkeypatch.setattr(configs, "device_limits", lambda device: None)  # the CPU: nothing to prune
    assert prune(at._attn_bwd_dkdv_tuned.configs, {"Q": q}, D=160) == at._attn_bwd_dkdv_tuned.configs


def fake_cuda(monkeypatch, limits):
    monkeypatch.setattr(configs, "device_limits", lambda device: limits if torch.device(device).type == "cuda" else None)


@pytest.mark.parametrize("limits,dtype,reason", [
    (SM86, torch.bfloat16, None), (SM86, torch.float16, None), (SM75, torch.float16, None),
    (SM75, torch.bfloat16, "sm_75 has no bf16"), (SM61, torch.float16, "sm_61 is older than sm_75"),
], ids=["sm86-bf16", "sm86-fp16", "sm75-fp16", "sm75-bf16", "sm61-fp16"])
def test_auto_takes_triton_only_where_the_device_runs_it_in_that_dtype(monkeypatch, limits, dtype, reason):
    fake_cuda(monkeypatch, limits)
    got = backends.triton_unusable_reason(torch.device("cuda"), dtype)
    assert (got is None) if reason is None else (reason in got)
    line = backends.describe_backends("cuda:0", dtype)
    assert "\n" not in line
    for op in backends.OPS:
        assert f"{op} {'triton' if reason is None else 'torch'}" in line
    if reason:
        assert reason in line


def test_describe_backends_says_why_on_the_cpu_and_names_a_failed_op(monkeypatch):
    line = backends.describe_backends("cpu", torch.float32)
    assert "attention torch" in line and "not a CUDA device" in line
    assert "backend='torch'" in backends.describe_backends("cpu", torch.float32, backend="torch")
    fake_cuda(monkeypatch, SM86)
    monkeypatch.setattr(launch, "FAILED_OPS", {"geglu": "OutOfResources: shared"})
    line = backends.describe_backends("cuda", torch.float16)
    assert "attention triton" in line and "geglu torch (its Triton launch failed: OutOfResources" in line


def test_head_dims_past_the_measured_budget_have_no_config_so_auto_takes_the_torch_path():
    assert configs.has_configs(160, torch.float16, SM86) and configs.has_configs(64, torch.float32, SM75)
    assert not configs.has_configs(256, torch.float16, SM86)  # 256 wide: past the widest head dim measured
    assert not configs.has_configs(64, torch.bfloat16, SM75)
    assert configs.has_configs(256, torch.float16, None)  # the CPU: the interpreter runs fixed blocks
