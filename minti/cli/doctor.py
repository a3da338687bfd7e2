"""`python -m minti doctor [--model PATH] [--resolution R]`: what minti will do on this machine.

Versions, the GPU and its limits, which path (Triton kernel or torch) each hot op takes and
why, a self-test of each Triton kernel's forward and backward against the torch path at the
model's shapes, and with --model the modelled peak memory of each plan against the free
VRAM. The output is meant to be pasted into a bug report as it is.
"""
from __future__ import annotations

import argparse
import platform
import subprocess
import time

import torch

import minti.kernels as kernels
import minti.models.backends as backends
from minti.cli.common import DTYPES
from minti.errors import UserError
from minti.loading.families import DEFAULT_FAMILY, FAMILIES
from minti.loading.pipeline import load
from minti.training import memory

SELF_TEST_TOL = {torch.float16: 2e-2, torch.bfloat16: 5e-2, torch.float32: 1e-3}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="a checkpoint: also test at its shapes and model its memory plans")
    parser.add_argument("--resolution", type=int, default=None, help="training resolution (default: the family's)")
    parser.add_argument("--dtype", default="float16", choices=DTYPES,
                        help="the dtype training would use (default float16)")
    parser.add_argument("--vram", type=float, default=None, metavar="GiB",
                        help="plan the memory for a card with this much free (default: this GPU's free memory)")


def _versions() -> list[str]:
    try:
        import triton  # optional: without it the torch path runs
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed (the torch path is used)"
    driver = "none"
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        pass
    return [f"python      {platform.python_version()} ({platform.system()} {platform.machine()})",
            f"torch       {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
            f"triton      {triton_version}",
            f"driver      {driver}"]


def _gpu(device: torch.device) -> list[str]:
    if device.type != "cuda":
        return ["gpu         no CUDA device: minti runs on the CPU with the torch path (slow, for tests)"]
    props = torch.cuda.get_device_properties(device)
    free, total = torch.cuda.mem_get_info(device)
    return [f"gpu         {props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs",
            f"memory      {free / 2**30:.2f} GiB free of {total / 2**30:.2f} GiB",
            f"shared mem  {props.shared_memory_per_block_optin // 1024} KiB per block (opt-in)"]


def _max_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


def _self_test_cases(family: str, resolution: int, device: torch.device, dtype: torch.dtype):
    """(name, function of backend -> output, inputs that get gradients) at the model's shapes."""
    shapes = FAMILIES[family].kernel_shapes
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_()

    side = resolution // 8
    cases = []
    for heads, d, down in (shapes.first_attention, shapes.deepest_attention):
        n = (side // down) ** 2
        q, kv = rand(1, heads, n, d), rand(1, heads, n, d)
        cases.append((f"attention {n}x{n} d{d}", lambda b, q=q, kv=kv: kernels.flash_attention(q, kv, kv, backend=b), [q, kv]))
        ctx = rand(1, heads, 77, d)
        cases.append((f"attention {n}x77 d{d}", lambda b, q=q, c=ctx: kernels.flash_attention(q, c, c, backend=b), [q, ctx]))
    heads, d = shapes.text
    t = rand(1, heads, 77, d)
    cases.append((f"attention causal 77 d{d}", lambda b: kernels.flash_attention(t, t, t, causal=True, backend=b), [t]))
    c = shapes.channels
    x, w, bias = rand(1, c, side, side), torch.ones(c, device=device, dtype=dtype), torch.zeros(c, device=device, dtype=dtype)
    cases.append((f"group_norm_silu {c}x{side}^2", lambda b: kernels.group_norm_silu(x, w, bias, 32, 1e-5, backend=b), [x]))
    h = rand(1, (side // shapes.first_attention.downsampling) ** 2, 8 * c)
    cases.append((f"geglu {h.shape[1]}x{8 * c}", lambda b: kernels.geglu(h, backend=b), [h]))
    return cases


def _self_test(family: str, resolution: int, device: torch.device, dtype: torch.dtype) -> tuple[list[str], bool]:
    reason = backends.triton_unusable_reason(device, dtype)
    if reason is not None:
        return [f"self-test   skipped: the Triton kernels do not run here ({reason})"], True
    lines, ok = [], True
    for name, call, leaves in _self_test_cases(family, resolution, device, dtype):
        start = time.perf_counter()
        results = []
        for backend in ("torch", "triton"):
            for leaf in leaves:
                leaf.grad = None
            out = call(backend)
            out.backward(torch.ones_like(out) / out.numel() ** 0.5)
            results.append([out.detach()] + [leaf.grad.clone() for leaf in leaves])
        torch.cuda.synchronize(device)
        err = max(_max_rel_err(got, want) for got, want in zip(results[1], results[0]))
        passed = err <= SELF_TEST_TOL[dtype]
        ok &= passed
        lines.append(f"self-test   {name:<28} fwd+bwd max rel err {err:.1e}  {'pass' if passed else 'FAIL'}"
                     f"  ({time.perf_counter() - start:.1f} s)")
    return lines, ok


def _memory_plans(path: str, resolution: int, device: torch.device, dtype: torch.dtype,
                  vram_gib: float | None = None) -> tuple[list[str], str]:
    sd = load(path, dtype=dtype, device="meta")
    resolution = resolution or _default_resolution(sd.family)
    free = int(vram_gib * memory.GiB) if vram_gib is not None else (
        torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None)
    costs = memory.attributed_costs(sd, resolution, 1)
    lines = [f"model       {path}: {sd.family}, {sd.prediction}, {resolution}px, batch 1 "
             f"(attributed trace {costs.seconds:.1f} s)"]
    for name, blocks in (("fast", frozenset()), ("low", frozenset(range(costs.n_blocks)))):
        peak = costs.peak(blocks)
        need = memory.need_bytes(peak, costs.weights)
        fits = "" if free is None else (" fits" if need <= free else " does NOT fit") + f" in {free / 2**30:.2f} GiB free"
        lines.append(f"plan {name:<6} modelled peak {peak / 2**30:.2f} GiB{fits} (needs {need / 2**30:.2f} GiB: "
                     f"x{memory.MARGIN} on the activations + {memory.RESERVE / 2**20:.0f} MiB)")
    if free is None:
        auto = "fast (no GPU memory to plan against; pass --vram GiB to see the plan for a card)"
    else:
        try:
            auto = memory.choose(sd, resolution, 1, free).describe().removeprefix("memory: ")
        except UserError as e:
            auto = f"nothing: {e}"
    lines.append(f"plan auto   would choose {auto}")
    return lines, sd.family


def _default_resolution(family: str) -> int:
    return FAMILIES[family].largest_size


def run(args: argparse.Namespace) -> int:
    dtype = getattr(torch, args.dtype)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    lines = ["minti doctor (paste all of this into a bug report)"] + _versions() + _gpu(device)
    lines.append("backends    " + backends.describe_backends(device, dtype))
    family = DEFAULT_FAMILY
    if args.model:
        plan_lines, family = _memory_plans(args.model, args.resolution, device, dtype, args.vram)
        lines += plan_lines
    print("\n".join(lines), flush=True)
    resolution = args.resolution or _default_resolution(family)
    test_lines, ok = _self_test(family, resolution, device, dtype)
    print("\n".join(test_lines))
    return 0 if ok else 1
