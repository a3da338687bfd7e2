"""A subset of bench/compile_targets.py: the kernels compile ahead of time for a GPU this
machine does not have, fit its shared memory, do not spill, and the pruning's shared-memory
estimate holds. The full sweep (every target, dtype, shape and config) is the bench script."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import minti.kernels.configs as configs

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("triton")


def compile_targets(*args: str) -> subprocess.CompletedProcess:
    # A fresh interpreter: the tests decorate the kernels for Triton's interpreter, which
    # cannot compile; the script needs them as real JIT functions.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, str(ROOT / "bench" / "compile_targets.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)


def sass_parser():
    # Only the SASS reader, without importing the script (which pops TRITON_INTERPRET and
    # imports the kernels as real JIT functions): its source up to the imports of minti.
    source = (ROOT / "bench" / "compile_targets.py").read_text()
    start, end = source.index("# One SASS instruction"), source.index("def _cuobjdump")
    namespace = {"re": __import__("re")}
    exec(compile(source[start:end], "compile_targets.py", "exec"), namespace)
    return namespace["spills_in_sass"]


SASS = """
        /*0040*/                   STL [R1+0x4], R0 ;                 /* 0x00000400 */
        /*0050*/               @P0 LDG.E R2, [R4.64] ;                /* 0x00000000 */
        /*0060*/                   STL.64 [R1+0x8], R2 ;              /* 0x00000400 */
        /*0070*/                   LDL.LU R3, [R1+0x8] ;              /* 0x00000400 */
        /*0080*/                   FFMA R5, R3, R3, R5 ;              /* 0x00000000 */
        /*0090*/               @P1 BRA 0x60 ;                         /* 0x00000000 */
        /*00a0*/                   LDL R0, [R1+0x4] ;                 /* 0x00000400 */
        /*00b0*/                   EXIT ;                             /* 0x00000000 */
        /*00c0*/                   BRA 0xc0;                          /* 0x00000000 */
"""


def test_spills_are_read_from_the_sass_and_those_inside_a_loop_counted_apart():
    spills_in_sass = sass_parser()
    # stores: 4 (STL) + 8 (STL.64); in the loop 0x60-0x90: the STL.64 and the LDL
    assert spills_in_sass(SASS) == (12, 12)
    assert spills_in_sass(SASS.replace("@P1 BRA 0x60", "@P1 BRA 0xb0")) == (12, 0)  # a forward branch is no loop
    assert spills_in_sass("") == (0, 0)


def test_group_norm_silu_and_geglu_compile_for_sm_86_in_bf16_within_limits():
    result = compile_targets("--targets", "sm_86", "--dtypes", "bfloat16", "--kernels", "small", "--one-size")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for kernel in ("gn_stats", "gn_merge", "gn_fwd", "gn_bwd_sums", "gn_bwd_merge", "gn_bwd_dx", "geglu_fwd", "geglu_bwd"):
        assert f"| sm_86 | bfloat16 | {kernel} | 1 | 0 | 0 | 0 | 0 |" in result.stdout


def test_fp32_attention_forward_at_head_dim_160_selects_only_configs_that_do_not_spill_on_sm_86():
    # Where the 16x16 8-warp config spilled 8 bytes (an STL between the two key loops, an LDL
    # after them): the register budget leaves it out at this width, and every config the
    # autotuner may still pick compiles without any spill, self- and cross-attention.
    result = compile_targets("--targets", "sm_86", "--dtypes", "float32", "--kernels", "attn_fwd",
                             "--head-dims", "160", "--one-per-class")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    row = next(line for line in result.stdout.splitlines() if line.startswith("| sm_86 | float32 | attn_fwd |"))
    configs, failed, over, spilled_in_loop, spilled_outside = (int(x) for x in row.split("|")[4:9])
    assert configs >= 2 and failed == over == spilled_in_loop == spilled_outside == 0


@pytest.mark.slow
def test_attention_at_head_dim_160_keeps_a_config_that_fits_sm_75_without_spilling():
    # The hardest case: 64 KiB of shared memory, the widest SD head dim, every kernel
    # (forward, dK/dV with and without atomic dQ over one or split query ranges, the
    # deterministic dQ pass), self and cross.
    result = compile_targets("--targets", "sm_75", "--dtypes", "float16", "--kernels", "attention",
                             "--head-dims", "160", "--one-per-class", "--smallest-only")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for kernel in ("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dkdv_2pass", "attn_bwd_dkdv_1range",
                   "attn_bwd_dkdv_2pass_1range", "attn_bwd_dq_2pass"):
        assert f"| sm_75 | float16 | {kernel} | 2 | 0 | 0 | 0 | 0 |" in result.stdout


SWEEP_WITH_FAKE_COMPILES = """
import runpy, sys
sweep = runpy.run_path("bench/compile_targets.py", run_name="compile_targets")["sweep"]
Result = sweep.__globals__["Result"]
spill = int(sys.argv[1])  # every compile spills this many bytes, outside its loops
def fake_compile(fn, args, cc, num_warps, num_stages):
    return Result(ok=True, shared=1024, regs=64, spill=spill)
sweep.__globals__["compile_one"] = fake_compile
targets = {"sm_86": sweep.__globals__["configs"].TARGET_LIMITS["sm_86"]}
_, problems, notes = sweep(targets, ["float16"], ["attn_fwd"], head_dims={160}, one_per_class=True)
print(len(notes), "notes;", "; ".join(problems) or "no problems")
"""


def run_script(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_a_launch_whose_every_selectable_config_spills_fails_the_sweep():
    # At head dim 160 on sm_86 the fp16 forward selects three configs, at two sites (self- and
    # cross-attention): all six spilling outside their loops leaves no clean config (a problem);
    # spills outside the loops are otherwise only notes.
    spilling, clean = run_script(SWEEP_WITH_FAKE_COMPILES, "8"), run_script(SWEEP_WITH_FAKE_COMPILES, "0")
    assert spilling.returncode == 0 and clean.returncode == 0, spilling.stderr[-2000:] + clean.stderr[-2000:]
    assert "every selectable config spills" in spilling.stdout and spilling.stdout.startswith("6 notes")
    assert clean.stdout.strip() == "0 notes; no problems"


DERIVE_WITH_FAKE_COMPILES = """
import runpy, sys
script = runpy.run_path("bench/compile_targets.py", run_name="compile_targets")
Result = script["Result"]
def fake_compile(fn, args, cc, num_warps, num_stages):  # clean up to head dim 80 (D_LO 64), spilling past it
    return Result(ok=True, shared=0, regs=64, spill=8 if args["D_LO"] > 64 else 0)
script["main"].__globals__["compile_one"] = fake_compile
sys.exit(script["main"](["--derive", "--targets", "sm_86", "--dtypes", "float16", "--budget", sys.argv[1]]))
"""


def test_derive_writes_its_measured_rows_into_the_budget_file_and_keeps_the_rest(tmp_path):
    path = tmp_path / "register_budget.json"
    shutil.copy(configs.REGISTER_BUDGET_FILE, path)
    result = run_script(DERIVE_WITH_FAKE_COMPILES, str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote {path}: measured sm_8x half; 7 overrides kept" in result.stdout
    before, after = configs.load_register_budget(), configs.load_register_budget(path)
    limit = configs.TARGET_LIMITS["sm_86"].shared_bytes

    def widest(kind, config):  # the compiles spill past head dim 80; the widths up to it that fit in shared memory
        fitting = [sum(configs.head_pieces(d)) for d in (40, 64, 80)
                   if configs.shared_bytes_estimate(kind, config, d, torch.float16) <= limit]
        return fitting[-1] if fitting else 0

    for kind, candidates in configs.ATTENTION_CONFIGS.items():
        assert after.measured["sm_8x"]["half"][kind] == {c: widest(kind, c) for c in candidates if widest(kind, c)}
    assert after.overrides == before.overrides and after.measured["sm_75"] == before.measured["sm_75"]
    assert after.measured["sm_8x"]["fp32"] == before.measured["sm_8x"]["fp32"]
    assert after.dumps() == path.read_text()  # what it wrote reads back the same
