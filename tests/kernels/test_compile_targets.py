"""A subset of bench/compile_targets.py: the kernels compile ahead of time for a GPU this
machine does not have, fit its shared memory, do not spill, and the pruning's shared-memory
estimate holds. The full sweep (every target, dtype, shape and config) is the bench script."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("triton")


def compile_targets(*args: str) -> subprocess.CompletedProcess:
    # A fresh interpreter: the tests decorate the kernels for Triton's interpreter, which
    # cannot compile; the script needs them as real JIT functions.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, str(ROOT / "bench" / "compile_targets.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)


def test_group_norm_silu_and_geglu_compile_for_sm_86_in_bf16_within_limits():
    result = compile_targets("--targets", "sm_86", "--dtypes", "bfloat16", "--kernels", "small", "--one-size")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for kernel in ("gn_stats", "gn_merge", "gn_fwd", "gn_bwd_sums", "gn_bwd_merge", "gn_bwd_dx", "geglu_fwd", "geglu_bwd"):
        assert f"| sm_86 | bfloat16 | {kernel} | 1 | 0 | 0 | 0 |" in result.stdout


@pytest.mark.slow
def test_attention_at_head_dim_160_keeps_a_config_that_fits_sm_75_without_spilling():
    # The hardest case: 64 KiB of shared memory, the widest SD head dim, every kernel
    # (forward, dK/dV with and without atomic dQ, the deterministic dQ pass), self and cross.
    result = compile_targets("--targets", "sm_75", "--dtypes", "float16", "--kernels", "attention",
                             "--head-dims", "160", "--one-per-class", "--smallest-only")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for kernel in ("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dkdv_2pass", "attn_bwd_dq_2pass"):
        assert f"| sm_75 | float16 | {kernel} | 2 | 0 | 0 | 0 |" in result.stdout
