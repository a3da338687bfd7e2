"""Cost of one textual-inversion training step: minti vs the diffusers example.

    python bench/step.py --model sd15 --resolution 512 [--batch-size 1] [--memory auto|low|fast]
                         [--steps 20] [--json]

On CUDA: the median wall time of a step (torch.cuda.synchronize() before and after each one,
after warm-up steps that also autotune the Triton kernels) for minti's step (bench/memory.py's
minti_step: cached latents, fp16 weights, fp32 vectors, the chosen memory plan) and for the
reference loop (bench/reference.py: the diffusers example with fp16 autocast, VAE encode
every step, AdamW over the whole embedding table; for --model sdxl the diffusers SDXL example,
both tables in AdamW). Target: minti/reference <= 0.6.

Without CUDA: FLOPs of one step of each, counted with torch.utils.flop_counter.FlopCounterMode
while the real-size step runs on the `meta` device (shapes only, seconds). Both of minti's
plans are counted (low recomputes every UNet block in backward). Only matmuls, convolutions
and attention are counted (FlopCounterMode's convention; norms and elementwise ops are not).

Attention is counted identically on both sides. minti's flash attention is a custom op, so
this file registers a formula for it; the reference's SDPA is swapped for the same custom op
during the meta trace (as bench/memory.py does), so it counts with that formula too. The
formulas are FlopCounterMode's own ones for torch's SDPA ops, per batch and head:
    forward   S = Q K^T and O = P V:                                 4 * Nq * Nk * D
    backward  recompute S, then dV = P^T dO, dP = dO V^T, dQ = dS K,
              dK = dS^T Q (five matmuls, the flash-attention backward): 10 * Nq * Nk * D
Causal attention (the 77-token text encoders only) is counted dense, as torch counts it.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).parent))
import memory as memory_bench  # noqa: E402  (bench/memory.py: minti's step, the SDPA swap, write_result)
import reference  # noqa: E402

import minti.kernels  # noqa: E402,F401  (defines the minti:: custom ops)
from minti.training import memory  # noqa: E402

FAMILIES = memory_bench.FAMILIES
ATTENTION_FWD = torch.ops.minti.flash_attn_fwd
ATTENTION_BWD = torch.ops.minti.flash_attn_bwd


# ---------------------------------------------------------------------------- FLOP formulas

def attention_fwd_flop(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """minti::flash_attn_fwd: 4*B*H*Nq*Nk*D, exactly what FlopCounterMode counts for SDPA."""
    return sdpa_flop_count(q_shape, k_shape, v_shape)


def attention_bwd_flop(do_shape, q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """minti::flash_attn_bwd: 10*B*H*Nq*Nk*D (2.5x forward: the scores are recomputed)."""
    return sdpa_backward_flop_count(do_shape, q_shape, k_shape, v_shape)


# Registered once per process (a second registration is an error, and tests may import us).
if ATTENTION_FWD not in flop_counter.flop_registry:
    flop_counter.register_flop_formula(ATTENTION_FWD)(attention_fwd_flop)
    flop_counter.register_flop_formula(ATTENTION_BWD)(attention_bwd_flop)

ATTENTION_OPS = {ATTENTION_FWD, ATTENTION_BWD, torch.ops.aten._scaled_dot_product_flash_attention,
                 torch.ops.aten._scaled_dot_product_efficient_attention,
                 torch.ops.aten._scaled_dot_product_flash_attention_backward,
                 torch.ops.aten._scaled_dot_product_efficient_attention_backward}


# ---------------------------------------------------------------------------- the two steps

def build_reference(model: str, resolution: int, batch: int,
                    device: torch.device) -> tuple[Callable[[], object], object]:
    ref = reference.build(model, device)
    pixels = torch.zeros(batch, 3, resolution, resolution, device=device)
    tokens = torch.zeros(batch, 77, dtype=torch.long, device=device)
    return (lambda: reference.step(ref, pixels, tokens, autocast=device.type == "cuda")), ref


# ---------------------------------------------------------------------------- meta: FLOPs

def count_flops(step: Callable[[], object], swap_sdpa: bool = False) -> dict[str, int]:
    """FLOPs of one call of `step` by kind: total, attention, conv, matmul."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if swap_sdpa:  # count the reference's attention with the same formula as ours
        torch.nn.functional.scaled_dot_product_attention = memory_bench._flash_sdpa
    try:
        with FlopCounterMode(display=False) as counter:
            step()
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
    by_op = counter.get_flop_counts()["Global"]
    attention = sum(n for op, n in by_op.items() if op in ATTENTION_OPS)
    conv = sum(n for op, n in by_op.items() if "convolution" in str(op))
    return {"total": sum(by_op.values()), "attention": attention, "conv": conv,
            "matmul": sum(by_op.values()) - attention - conv}


def flops_minti(family: str, resolution: int, batch: int, plan: str) -> dict[str, int]:
    step, _, _, _ = memory_bench.build_minti(family, resolution, batch, plan, torch.device("meta"))
    return count_flops(step)


def flops_reference(model: str, resolution: int, batch: int) -> dict[str, int]:
    step, _ = build_reference(model, resolution, batch, torch.device("meta"))
    return count_flops(step, swap_sdpa=True)


def run_meta(args) -> dict:
    family = FAMILIES[args.model]
    counts = {plan: flops_minti(family, args.resolution, args.batch_size, plan) for plan in ("fast", "low")}
    counts["reference"] = flops_reference(args.model, args.resolution, args.batch_size)
    G = 1e9
    print(f"{args.model} {args.resolution}² batch {args.batch_size}: GFLOP per training step "
          "(meta trace, FlopCounterMode: matmul + conv + attention)")
    print(f"{'':22} {'total':>10} {'attention':>10} {'conv':>10} {'matmul':>10} {'/reference':>11}")
    ref_total = counts["reference"]["total"]
    for name, label in (("fast", "minti --memory fast"), ("low", "minti --memory low"),
                        ("reference", "reference (diffusers)")):
        c = counts[name]
        print(f"{label:22} {c['total'] / G:10.1f} {c['attention'] / G:10.1f} {c['conv'] / G:10.1f} "
              f"{c['matmul'] / G:10.1f} {c['total'] / ref_total:11.3f}")
    result = {"method": "FlopCounterMode on a meta-device trace",
              "device": "meta (FLOPs, no GPU)"}
    for name, c in counts.items():
        key = "reference" if name == "reference" else f"minti_{name}"
        result.update({f"{key}_{kind}_flops": n for kind, n in c.items()})
    result.update(minti_fast_ratio=round(counts["fast"]["total"] / ref_total, 4),
                  minti_low_ratio=round(counts["low"]["total"] / ref_total, 4))
    return result


# ---------------------------------------------------------------------------- CUDA: time

def time_steps(step: Callable[[], object], warmup: int, steps: int) -> list[float]:
    """Milliseconds of each of `steps` steps, after `warmup` untimed ones (autotuning, AdamW
    state, allocator). Synchronised around each step: wall time of the whole step, launch
    overhead included, as a training loop sees it. The peak memory counter restarts here, so
    it covers the steps and not the model build (minti's VAE is on the device until offloaded)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def run_cuda(args) -> dict:
    device = torch.device("cuda")
    step, plan, sd, _ = memory_bench.build_minti(FAMILIES[args.model], args.resolution, args.batch_size, args.memory,
                                                 device)
    minti_ms = time_steps(step, args.warmup, args.steps)
    minti_peak = torch.cuda.max_memory_allocated()
    del step, sd
    _free()
    step, ref = build_reference(args.model, args.resolution, args.batch_size, device)
    ref_ms = time_steps(step, args.warmup, args.steps)
    ref_peak = torch.cuda.max_memory_allocated()
    del step, ref
    _free()
    m, r = statistics.median(minti_ms), statistics.median(ref_ms)
    print(f"{torch.cuda.get_device_name()}  {args.model} {args.resolution}² batch {args.batch_size}  "
          f"median of {args.steps} steps after {args.warmup} warm-up")
    print(f"{'':28} {'ms/step':>9} {'min':>8} {'max':>8} {'peak GiB':>9}")
    print(f"{'minti (plan ' + plan + ')':28} {m:9.1f} {min(minti_ms):8.1f} {max(minti_ms):8.1f} {minti_peak / 2**30:9.3f}")
    print(f"{'reference (diffusers, fp16)':28} {r:9.1f} {min(ref_ms):8.1f} {max(ref_ms):8.1f} {ref_peak / 2**30:9.3f}")
    print(f"minti/reference = {m / r:.3f}  (target <= 0.6: {'met' if m / r <= 0.6 else 'NOT met'})")
    return {"method": "median wall time per step, torch.cuda.synchronize around each",
            "device": torch.cuda.get_device_name(), "memory_plan": plan, "steps": args.steps,
            "warmup": args.warmup, "minti_ms": round(m, 3), "reference_ms": round(r, 3),
            "ratio": round(m / r, 4), "minti_ms_all": [round(t, 3) for t in minti_ms],
            "reference_ms_all": [round(t, 3) for t in ref_ms],
            "minti_peak_bytes": minti_peak, "reference_peak_bytes": ref_peak}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=FAMILIES, default="sd15")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--memory", choices=memory.MODES, default="auto",
                   help="minti's memory plan on CUDA (without CUDA both fast and low are counted)")
    p.add_argument("--steps", type=int, default=20, help="timed steps on CUDA (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first on CUDA")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be at least 1")

    start = time.time()
    result = {"model": args.model, "resolution": args.resolution, "batch_size": args.batch_size}
    result.update(run_cuda(args) if torch.cuda.is_available() else run_meta(args))
    memory_bench.write_result(result, start, f"step-{args.model}-{args.resolution}.json", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
