"""Cost of one textual-inversion training step: minti vs the diffusers example.

    python bench/step.py --model sd15 --resolution 512 [--batch-size 1] [--memory auto|low|fast]
                         [--steps 20] [--json]
    python bench/step.py --device cpu [--resolution 256|512] [--steps 3]
    python bench/step.py --model sd15 --resolution 512 --concepts 1 4 8

--concepts K...: one step of K concepts sharing a batch (minti.train_many, batch 1 each: one
UNet batch of K) against K separate batch-1 steps, both through the trainer's own step
(minti.training.step: forward_backward, optimizer_step). On CUDA the median wall time of each; without
CUDA the FLOPs of each on a meta trace, which sharing the batch cannot change (the work per
sample is the same; the gain on a GPU is a batch large enough to fill it).

On CUDA: the median wall time of a step (torch.cuda.synchronize() before and after each one,
after warm-up steps that also autotune the Triton kernels) for minti's step (bench/memory.py's
minti_step: cached latents, fp16 weights, fp32 vectors, the chosen memory plan) and for the
reference loop (bench/reference.py: the diffusers example with fp16 autocast, VAE encode
every step, AdamW over the whole embedding table; for --model sdxl the diffusers SDXL example,
both tables in AdamW). Target: minti/reference <= 0.6.

With --device cpu (resolution 256 unless given): FLOPs as below, then the median wall time of
a step of minti (plan fast) and of the reference, both in float32 on the CPU, after warm-up,
their steps timed alternately (--steps 3 by default). The issue's target there:
minti/reference <= 0.70 at 256² and 512² (the FLOP ratio is about 0.61).

Without CUDA (and without --device cpu): FLOPs of one step of each, counted with torch.utils.flop_counter.FlopCounterMode
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
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).parent))
import memory as memory_bench  # noqa: E402  (bench/memory.py: minti's step, the SDPA swap, write_result)
import reference  # noqa: E402

import minti.kernels  # noqa: E402,F401  (defines the minti:: custom ops)
from minti.diffusion import alphas_cumprod  # noqa: E402
from minti.loading.pipeline import random_model  # noqa: E402
from minti.training import distributed, memory  # noqa: E402
from minti.training.config import TrainConfig  # noqa: E402
from minti.training.data import SourceImage, TrainingData, Variant  # noqa: E402
from minti.training.norm import NormControl  # noqa: E402
from minti.training.placeholder import register_token  # noqa: E402
from minti.training.step import Concept, LossScaler, Vectors, forward_backward, optimizer_step  # noqa: E402

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


# ---------------------------------------------------------------------------- CPU: time

def _float32_minti(family: str, resolution: int, batch: int, mode: str):
    """memory_bench.build_minti with float32 weights (its default is fp16, for the GPU)."""
    return memory_bench.build_minti(family, resolution, batch, mode, torch.device("cpu"), dtype=torch.float32)


def _float32_reference(model: str, resolution: int, batch: int) -> Callable[[], object]:
    """The reference step with its fp16 UNet and VAE in float32. reference.step casts their
    inputs to fp16 (for the GPU's autocast): pre-hooks cast them back. autocast=True keeps it
    from making fp16 copies of the text encoders (that is its meta-device path); CUDA autocast
    does nothing to CPU ops."""
    ref = reference.build(model, "cpu")
    to_fp32 = lambda t: t.float() if torch.is_tensor(t) and t.is_floating_point() else t  # noqa: E731

    def cast_inputs(module, args, kwargs):
        return tuple(map(to_fp32, args)), {k: to_fp32(v) for k, v in kwargs.items()}

    for module in (ref.unet.float(), ref.vae.float().encoder):
        module.register_forward_pre_hook(cast_inputs, with_kwargs=True)
    pixels = torch.zeros(batch, 3, resolution, resolution)
    tokens = torch.zeros(batch, 77, dtype=torch.long)
    return lambda: reference.step(ref, pixels, tokens, autocast=True)


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _seconds(step: Callable[[], object]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def run_cpu(args) -> dict:
    """FLOPs (meta trace), then wall time per step of minti (plan fast: no recompute) and of
    the reference, both float32 on the CPU: warm-up, then steps timed alternately, so that
    whatever else the machine does falls on both."""
    result = run_meta(args)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*CUDA is not available.*")
        minti_step, _, _, _ = _float32_minti(FAMILIES[args.model], args.resolution, args.batch_size, "fast")
        ref_step = _float32_reference(args.model, args.resolution, args.batch_size)
        for _ in range(args.warmup):
            minti_step()
            ref_step()
        minti_s, ref_s = [], []
        for _ in range(args.steps):
            minti_s.append(_seconds(minti_step))
            ref_s.append(_seconds(ref_step))
    m, r = statistics.median(minti_s), statistics.median(ref_s)
    cpu = _cpu_name()
    print(f"\nCPU ({cpu}, {torch.get_num_threads()} threads), float32, median of {args.steps} alternating steps "
          f"after {args.warmup} warm-up")
    print(f"{'':28} {'s/step':>8} {'min':>8} {'max':>8}")
    print(f"{'minti (plan fast)':28} {m:8.2f} {min(minti_s):8.2f} {max(minti_s):8.2f}")
    print(f"{'reference (diffusers, fp32)':28} {r:8.2f} {min(ref_s):8.2f} {max(ref_s):8.2f}")
    print(f"minti/reference = {m / r:.3f}  (FLOP ratio {result['minti_fast_ratio']:.3f})")
    result.update(method="FLOPs: FlopCounterMode on a meta trace; time: median wall time per step, float32, "
                         "steps alternating", device=f"cpu ({cpu})", threads=torch.get_num_threads(),
                  steps=args.steps, warmup=args.warmup, minti_s=round(m, 3), reference_s=round(r, 3),
                  ratio=round(m / r, 4), minti_s_all=[round(t, 3) for t in minti_s],
                  reference_s_all=[round(t, 3) for t in ref_s])
    return result


# ---------------------------------------------------------------------------- many concepts

def build_concepts(family: str, resolution: int, k: int, device: torch.device):
    """K concepts as minti.train_many holds them (each its token, one vector per text encoder,
    AdamW, loss scaler and one cached latent, batch 1) on a random full-size model -> (sd, concepts, acp)."""
    sd = random_model(family, torch.float16, device)
    sd.offload_vae()  # latents are cached before training; the VAE is not on the device
    concepts = []
    for i in range(k):
        token = f"<bench{i}>"
        config = TrainConfig(token=token, images="-", resolution=resolution, seed=i)
        offset = register_token(sd, token, 1)
        image = SourceImage(Path(f"{i}.png"), torch.zeros(3, resolution, resolution, device="meta"), None)
        data = TrainingData([image], resolution, ["a photo of [name]"], token, seed=i)
        data.variants = [Variant(0, 0, 0, False, (resolution, resolution), (0, 0), (resolution, resolution))]
        data.latents = [torch.zeros(4, resolution // 8, resolution // 8)]  # on the host, as the trainer keeps them
        vectors = Vectors(token, [torch.nn.Parameter(torch.zeros(1, d, device=device)) for d in sd.embedding_dims],
                          offset, None, "bench")
        optimizer = torch.optim.AdamW(vectors.params, lr=5e-3, weight_decay=0.0)
        scaler = LossScaler(2.0 ** 16 if device.type == "cuda" else None)
        concepts.append(Concept(config, data, vectors, optimizer, scaler, lambda step: 5e-3, None, "",
                                NormControl.from_config("off", None, [])))
    return sd, concepts, alphas_cumprod().to(device, torch.float32)


def concepts_step(sd, concepts, acp) -> None:
    """One optimizer step of these concepts in one shared batch, as train_many's loop runs it."""
    losses = forward_backward(sd, concepts, acp, distributed.World())
    if losses.device.type == "meta":  # no values to check: AdamW as the trainer calls it
        for c in concepts:
            c.optimizer.step()
            c.optimizer.zero_grad(set_to_none=True)
        return
    for c, loss in zip(concepts, losses.tolist()):
        optimizer_step(c, loss, 5e-3)


def run_concepts(args) -> dict:
    """K concepts in one step vs K batch-1 steps: time on CUDA, FLOPs without."""
    family = FAMILIES[args.model]
    cuda = torch.cuda.is_available() and args.device != "cpu"
    device = torch.device("cuda" if cuda else "meta")
    rows = []
    for k in args.concepts:
        sd, concepts, acp = build_concepts(family, args.resolution, k, device)
        joint = lambda: concepts_step(sd, concepts, acp)  # noqa: E731
        separate = lambda: [concepts_step(sd, [c], acp) for c in concepts]  # noqa: E731
        if cuda:  # each with the plan it would get: --memory for a batch of K, and for a batch of 1
            memory.apply(sd, args.memory, args.resolution, k)
            joint_ms = statistics.median(time_steps(joint, args.warmup, args.steps))
            memory.apply(sd, args.memory, args.resolution, 1)
            separate_ms = statistics.median(time_steps(separate, args.warmup, args.steps))
            rows.append({"k": k, "joint_ms": round(joint_ms, 2), "separate_ms": round(separate_ms, 2),
                         "speedup": round(separate_ms / joint_ms, 3)})
        else:
            memory.apply(sd, "fast", args.resolution, k)
            joint_flops, separate_flops = count_flops(joint)["total"], count_flops(separate)["total"]
            rows.append({"k": k, "joint_gflop": round(joint_flops / 1e9, 1),
                         "separate_gflop": round(separate_flops / 1e9, 1),
                         "ratio": round(joint_flops / separate_flops, 4)})
        del sd, concepts, joint, separate
        if cuda:
            _free()
    where = torch.cuda.get_device_name() if cuda else "meta trace (FLOPs: matmul + conv + attention)"
    print(f"{args.model} {args.resolution}², K concepts at batch 1 each: one shared step vs K separate steps; {where}")
    if cuda:
        print(f"{'K':>3} {'shared ms':>10} {'K x 1 ms':>10} {'speed-up':>9}")
        for r in rows:
            print(f"{r['k']:>3} {r['joint_ms']:10.1f} {r['separate_ms']:10.1f} {r['speedup']:9.2f}")
    else:
        print(f"{'K':>3} {'shared GFLOP':>13} {'K x 1 GFLOP':>12} {'ratio':>7}")
        for r in rows:
            print(f"{r['k']:>3} {r['joint_gflop']:13.1f} {r['separate_gflop']:12.1f} {r['ratio']:7.3f}")
    return {"method": "median wall time per step, torch.cuda.synchronize around each" if cuda
            else "FlopCounterMode on a meta-device trace", "device": where, "concepts": rows,
            **({"steps": args.steps, "warmup": args.warmup} if cuda else {})}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=FAMILIES, default="sd15")
    p.add_argument("--resolution", type=int, default=None, help="default 512, 256 with --device cpu")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--memory", choices=memory.MODES, default="auto",
                   help="minti's memory plan on CUDA (without CUDA both fast and low are counted)")
    p.add_argument("--device", choices=("auto", "cpu"), default="auto",
                   help="auto: time on CUDA, else count FLOPs only; cpu: count FLOPs and time both steps "
                        "in float32 on the CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps (median reported): 20 on CUDA, 3 on the CPU")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first: 3 on CUDA, 1 on the CPU")
    p.add_argument("--concepts", type=int, nargs="+", metavar="K",
                   help="compare one step of K concepts sharing a batch with K batch-1 steps, for each K given")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = p.parse_args(argv)
    on_cpu = args.device == "cpu"
    args.resolution = args.resolution or (256 if on_cpu else 512)
    args.steps = (3 if on_cpu else 20) if args.steps is None else args.steps
    args.warmup = (1 if on_cpu else 3) if args.warmup is None else args.warmup
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be at least 1")

    start = time.time()
    result = {"model": args.model, "resolution": args.resolution, "batch_size": args.batch_size}
    if args.concepts:
        result.update(run_concepts(args))
        memory_bench.write_result(result, start, f"step-concepts-{args.model}-{args.resolution}.json", args.json)
        return 0
    if on_cpu:
        result.update(run_cpu(args))
    else:
        result.update(run_cuda(args) if torch.cuda.is_available() else run_meta(args))
    memory_bench.write_result(result, start, f"step-{args.model}-{args.resolution}.json", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
