"""bench/step.py without a GPU: FLOPs of a real-size SD 1.5 step, counted on the meta device,
with attention counted (by our registered formula) identically for minti and the reference."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
RES = 128  # latent 16x16: seconds on the meta device, every layer still at its real width


def _load_step():
    spec = importlib.util.spec_from_file_location("bench_step", ROOT / "bench" / "step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


step = _load_step()


def _sd15_attention_forward(res: int) -> tuple[int, int, int]:
    """Hand count of the forward attention FLOPs (4*H*Nq*Nk*D per call, H*D = width) of the
    SD 1.5 UNet and CLIP-L at batch 1: (unet, text, first self-attention of the UNet)."""
    unet = 0
    for level, width in enumerate((320, 640, 1280)):
        n = (res // 8 // 2**level) ** 2
        unet += 5 * (4 * n * n * width + 4 * n * 77 * width)  # 2 down + 3 up transformers: self + cross
    n = (res // 64) ** 2
    unet += 4 * n * n * 1280 + 4 * n * 77 * 1280  # middle block
    text = 12 * 4 * 77 * 77 * 768
    first_self = 4 * ((res // 8) ** 2) ** 2 * 320
    return unet, text, first_self


def test_attention_formula_counts_flash_forward_and_backward():
    with torch.device("meta"):
        q = torch.empty(2, 3, 50, 16, requires_grad=True)
        k = torch.empty(2, 3, 40, 16, requires_grad=True)
        v = torch.empty(2, 3, 40, 16, requires_grad=True)
    from minti.kernels import flash_attention

    fwd = step.count_flops(lambda: flash_attention(q, k, v))
    both = step.count_flops(lambda: flash_attention(q, k, v).sum().backward())
    assert fwd["attention"] == fwd["total"] == 4 * 2 * 3 * 50 * 40 * 16
    assert both["attention"] == both["total"] == 14 * 2 * 3 * 50 * 40 * 16  # forward + 2.5x forward


@pytest.fixture(scope="module")
def counts():
    return {"fast": step.flops_minti("sd1", RES, 1, "fast"), "low": step.flops_minti("sd1", RES, 1, "low"),
            "reference": step.flops_reference("sd15", RES, 1)}


def test_sd15_minti_counts_fewer_flops_than_the_reference_and_low_recomputes(counts):
    fast, low, ref = counts["fast"], counts["low"], counts["reference"]
    for c in (fast, low, ref):
        assert c["total"] == c["attention"] + c["conv"] + c["matmul"]
    assert fast["total"] < low["total"] < ref["total"]
    # The reference encodes pixels with the VAE every step; minti reads cached latents.
    assert fast["conv"] < ref["conv"]


def test_attention_is_in_the_count_exactly(counts):
    unet, text, first_self = _sd15_attention_forward(RES)
    # Forward + backward (2.5x) of every attention, except the backward of the UNet's first
    # self-attention: nothing before it depends on the trained vectors, so autograd skips it.
    fast = 3.5 * (unet + text) - 2.5 * first_self
    assert counts["fast"]["attention"] == fast > 0  # so the attention-free count is lower
    # low recomputes each UNet block's forward in backward: one more UNet attention forward.
    assert counts["low"]["attention"] == fast + unet
    # The reference's SDPA counts with the same formula; its VAE encoder adds one
    # single-head (512 wide) self-attention over the (res/8)^2 latent positions.
    assert counts["reference"]["attention"] == fast + 4 * ((RES // 8) ** 2) ** 2 * 512


def test_cli_prints_and_writes_the_flop_table(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "step.py"), "--model", "sd15",
                             "--resolution", str(RES), "--json"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    written = json.loads((tmp_path / f"step-sd15-{RES}.json").read_text())
    assert printed == written
    assert printed["minti_fast_total_flops"] < printed["reference_total_flops"]
    assert 0 < printed["minti_fast_ratio"] < printed["minti_low_ratio"] < 1
    assert "minti --memory low" in result.stdout


def test_concepts_sharing_a_step_count_the_flops_of_their_separate_steps(tmp_path, monkeypatch, capsys):
    # Without CUDA --concepts counts FLOPs: K concepts in one batch do K batch-1 steps' work, no
    # more (each sample its own text-encoder pass), and OUT is created when missing.
    monkeypatch.setenv("OUT", str(tmp_path / "new"))
    assert step.main(["--model", "sd15", "--resolution", "64", "--concepts", "1", "2", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads((tmp_path / "new" / "step-concepts-sd15-64.json").read_text())
    one, two = printed["concepts"]
    assert (one["k"], two["k"]) == (1, 2) and one["ratio"] == two["ratio"] == 1.0
    assert two["joint_gflop"] == pytest.approx(2 * one["joint_gflop"], rel=1e-3) and one["joint_gflop"] > 0
