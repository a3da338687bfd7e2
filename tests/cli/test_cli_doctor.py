"""`python -m minti doctor` on a machine without CUDA: says so, reports the CPU path, exit 0."""
import subprocess
import sys

import pytest
import torch


def run_doctor(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minti", "doctor", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="describes the CPU-only report")
def test_doctor_without_cuda_says_so_reports_versions_and_the_torch_path_and_exits_0():
    result = run_doctor()
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "no CUDA device" in out
    assert f"torch       {torch.__version__}" in out and "triton" in out and "driver" in out
    assert "attention torch, group_norm_silu torch, geglu torch (not a CUDA device)" in out
    assert "self-test   skipped" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="describes the CPU-only report")
def test_doctor_models_each_memory_plan_of_a_checkpoint(tmp_path):
    from checkpoints import make_single_file

    path = make_single_file(tmp_path, "sd1", dtype=torch.float16)
    result = run_doctor("--model", str(path), "--resolution", "256")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "sd1" in out and "256px" in out
    assert "plan fast   modelled peak" in out and "plan low    modelled peak" in out
    assert "plan auto   would choose fast" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="describes the CPU-only report")
def test_doctor_plans_for_the_card_vram_names(tmp_path):
    from checkpoints import make_single_file

    path = make_single_file(tmp_path, "sd1", dtype=torch.float16)
    roomy = run_doctor("--model", str(path), "--resolution", "256", "--vram", "64")
    assert roomy.returncode == 0, roomy.stderr
    assert "plan fast   modelled peak" in roomy.stdout and " fits in 64.00 GiB free" in roomy.stdout
    assert "plan auto   would choose recompute 0 of " in roomy.stdout and "of 64.00 free, +0% UNet FLOPs" in roomy.stdout
    tiny = run_doctor("--model", str(path), "--resolution", "256", "--vram", "0.01")
    assert tiny.returncode == 0, tiny.stderr
    assert "does NOT fit" in tiny.stdout and "plan auto   would choose nothing: even --memory low does not fit" in tiny.stdout
