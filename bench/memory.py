"""Peak memory of one textual-inversion training step: minti vs the diffusers example.

    python bench/memory.py --model sd15 --resolution 512 [--batch-size 1] [--memory low|fast] [--weights fp8]
                           [--json] [--profile]
    python bench/memory.py --model sdxl --resolution 1024 --vram 8 --json --no-reference

--vram GiB: the plan --memory auto chooses for a card with that much free (on CUDA too, instead
of the free memory); without CUDA the reported peak is then the chosen plan's confirming meta trace.

On CUDA: torch.cuda.max_memory_allocated around one full step (text encoder forward and
backward, UNet forward and backward, optimizer step), after a warm-up step, weights included.
Without CUDA: the same step traced at real size on the `meta` device, counting the bytes of
live tensors at the peak (minti.training.memtrace). Attention in the reference is counted as a
flash-style kernel there too (no N x N matrix), so the comparison is fair.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import reference  # noqa: E402

from minti.errors import UserError  # noqa: E402
from minti.diffusion import NUM_TRAIN_TIMESTEPS, alphas_cumprod, diffusion_loss  # noqa: E402
from minti.training import memory  # noqa: E402
from minti.training.memtrace import MemoryTracer  # noqa: E402
from minti.kernels import flash_attention  # noqa: E402
from minti.loading.pipeline import random_model  # noqa: E402

FAMILIES = {"sd15": "sd1", "sd21": "sd2", "sdxl": "sdxl"}
PROMPT = "a photo of <bench>"
GiB = 2**30


def minti_step(sd, vectors: list[torch.Tensor], optimizer, latents: torch.Tensor, prompt: str,
               acp: torch.Tensor) -> None:
    """One training step as minti.train runs it (see _Run.loss / train_step): cached latents,
    only the placeholder vectors trainable, the trainer's objective (diffusion_loss, fp32 loss),
    AdamW over the vectors alone. `acp`: the schedule on the device, made once as the trainer does."""
    B = latents.shape[0]
    noise = torch.randn_like(latents, dtype=torch.float32)
    t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (B,), device=latents.device)
    tokens = [tok.to(latents.device) for tok in sd.tokenize([prompt] * B)]
    context, pooled = sd.encode_tokens(tokens, vectors)
    size = (latents.shape[-2] * 8, latents.shape[-1] * 8)  # the training resolution, as the trainer's time ids
    y = sd.sdxl_vector(pooled, original_size=size, target_size=size) if sd.family == "sdxl" else None
    diffusion_loss(sd.unet, latents, noise, t, context, y, prediction=sd.prediction, acp=acp).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(fn, modules, extra, device: torch.device) -> tuple[int, int | None, list[str]]:
    """-> (peak bytes, first step's peak bytes or None, profile lines: where the peak happened
    and what was alive then).

    On CUDA the peak is the second step's. The first step's is kept too: a user's first step
    also compiles and autotunes the kernels (unless Triton's disk cache has them) and
    allocates the optimizer state. The meta trace has no first step to tell apart (None)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        first = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(), first, []
    with MemoryTracer(modules, extra=extra) as tracer:
        fn()
    lines = [f"peak reached at {tracer.peak_at}; alive then:"]
    lines += [f"  {nbytes / 2**20:9.1f} MiB  {label}" for label, nbytes in tracer.peak_breakdown()]
    return tracer.peak_bytes, None, lines


def build_minti(family: str, resolution: int, batch: int, mode: str, device: torch.device,
                vram: float | None = None, weights: str | None = None, dtype: torch.dtype = torch.float16):
    """minti set up as minti.train sets it up (bench/step.py times the same step)
    -> (step, plan, sd, the tensors that exist before the step). weights: None or "fp8" (minti.load's)."""
    sd = random_model(family, dtype, device, weights=weights)
    sd.offload_vae()  # latents are cached before training; the VAE is not on the device
    sd.add_placeholder("<bench>", 1)
    vectors = [torch.zeros(1, d, device=device, requires_grad=True) for d in sd.embedding_dims]
    optimizer = torch.optim.AdamW(vectors, lr=5e-3, weight_decay=0.0)
    plan = memory.apply(sd, mode, resolution=resolution, batch_size=batch, vram_gib=vram).name
    latents = torch.zeros(batch, 4, resolution // 8, resolution // 8, device=device, dtype=sd.dtype)
    acp = alphas_cumprod().to(device, torch.float32)
    step = lambda: minti_step(sd, vectors, optimizer, latents, PROMPT, acp)  # noqa: E731
    return step, plan, sd, [*vectors, latents, acp]


def run_minti(family: str, resolution: int, batch: int, mode: str, device: torch.device,
              vram: float | None = None, weights: str | None = None):
    step, _, sd, tensors = build_minti(family, resolution, batch, mode, device, vram, weights)
    plan = memory.apply(sd, mode, resolution, batch, vram)  # the same plan again, from memory's caches
    if device.type == "meta" and vram is not None:  # the planner has just traced this very step
        return plan.peak, None, [], plan
    peak, first, breakdown = measure(step, [sd.unet, *sd.text_encoders], tensors, device)
    return peak, first, breakdown, plan


def plan_fields(plan: memory.Plan, family: str, resolution: int, batch: int) -> dict:
    """The plan as the RESULTS.md table reads it: blocks, extra GFLOP, recompute as a share of low's."""
    sd = random_model(family, torch.float16, "meta")
    costs = memory.attributed_costs(sd, resolution, batch)
    return {"memory_plan": plan.name, "recompute_blocks": sorted(plan.recompute), "n_blocks": plan.n_blocks,
            "modelled_peak_gib": None if plan.peak is None else round(plan.peak / GiB, 3),
            "budget_gib": None if plan.budget is None else round(plan.budget / GiB, 3),
            "extra_gflop": round(plan.extra_flops / 1e9, 1),
            "recompute_of_low": round(plan.extra_flops / sum(costs.flops), 3),
            "unet_step_gflop": round(costs.unet_step_flops / 1e9, 1), "plan_line": plan.describe()}


def run_reference(family: str, resolution: int, batch: int, device: torch.device):
    ref = reference.build({v: k for k, v in FAMILIES.items()}[family], device)
    pixels = torch.zeros(batch, 3, resolution, resolution, device=device)
    tokens = torch.zeros(batch, 77, dtype=torch.long, device=device)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if device.type == "meta":  # count the reference's attention as a flash kernel, like ours
        torch.nn.functional.scaled_dot_product_attention = _flash_sdpa
    try:
        return measure(lambda: reference.step(ref, pixels, tokens, autocast=device.type == "cuda"),
                       ref.modules(), [*ref.originals, pixels], device)
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa


def _flash_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    return flash_attention(q, k, v, causal=is_causal or attn_mask is not None, scale=scale)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=FAMILIES, default="sd15")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--memory", choices=("auto", "low", "fast"), default="auto", help="minti's memory plan")
    p.add_argument("--vram", type=float, default=None, metavar="GiB", help="plan auto for a card with this much free")
    p.add_argument("--weights", choices=("fp8",), default=None, help="minti's frozen weights in fp8 (minti.load's "
                   "weights=); default float16")
    p.add_argument("--no-reference", action="store_true", help="skip the diffusers-example reference")
    p.add_argument("--profile", action="store_true", help="print which tensors are alive at minti's peak")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "meta")
    family = FAMILIES[args.model]
    start = time.time()
    try:
        peak, first, breakdown, plan = run_minti(family, args.resolution, args.batch_size, args.memory, device,
                                                 args.vram, args.weights)
    except UserError as e:  # the budget is too small even for low: what the trainer would say
        print(f"minti      {args.model} {args.resolution}² refused: {e}")
        write_result({"model": args.model, "resolution": args.resolution, "batch_size": args.batch_size,
                      "memory_plan": "refused", "budget_gib": args.vram, "refusal": str(e)}, start,
                     f"memory-{args.model}-{args.resolution}-{args.memory}-{args.vram:g}gib.json", args.json)
        return 0
    result = {"model": args.model, "resolution": args.resolution, "batch_size": args.batch_size,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "meta (modelled, no GPU)",
              "method": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "meta trace of live tensors",
              "weights": args.weights or "float16", "peak_bytes": peak, "peak_gib": round(peak / GiB, 3)}
    if plan.peak is not None:
        result.update(plan_fields(plan, family, args.resolution, args.batch_size))
    else:
        result["memory_plan"] = plan.name
    print(f"minti      {args.model} {args.resolution}² batch {args.batch_size} plan {plan.name}: {peak / GiB:.3f} GiB")
    print(f"minti      {plan.describe()}")
    if first is not None:
        result.update(first_step_peak_bytes=first, first_step_peak_gib=round(first / GiB, 3))
        print(f"minti      first step (kernels compiled and tuned, optimizer state allocated): {first / GiB:.3f} GiB")
    if args.profile:
        print("\n".join(breakdown) or "  (no per-tensor profile on CUDA: use the meta trace, without CUDA)")
    if not args.no_reference:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        ref_peak, ref_first, _ = run_reference(family, args.resolution, args.batch_size, device)
        result.update(reference_peak_bytes=ref_peak, reference_peak_gib=round(ref_peak / GiB, 3),
                      ratio=round(peak / ref_peak, 3))
        if ref_first is not None:
            result.update(reference_first_step_peak_bytes=ref_first)
        print(f"reference  (diffusers example loop): {ref_peak / GiB:.3f} GiB   minti/reference = {peak / ref_peak:.2f}")
    suffix = ("" if args.vram is None else f"-{args.vram:g}gib") + (f"-{args.weights}" if args.weights else "")
    write_result(result, start, f"memory-{args.model}-{args.resolution}-{args.memory}{suffix}.json", args.json)
    return 0


def write_result(result: dict, start: float, filename: str, print_json: bool) -> None:
    """Finish a benchmark's result (bench/step.py's too): add the seconds it took, write it to
    $OUT/filename when OUT is set (bench/gpu.sh collects those), print it as the last line with --json."""
    result["seconds"] = round(time.time() - start, 1)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, filename).write_text(json.dumps(result, indent=1))
    if print_json:
        print(json.dumps(result))


if __name__ == "__main__":
    raise SystemExit(main())
