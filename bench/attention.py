"""Attention speed: minti's Triton flash attention vs torch SDPA (flash and memory-efficient
backends), forward and forward+backward, at the real SD 1.5 / SD 2.1 / SDXL UNet shapes.

    python bench/attention.py [--batch 1] [--dtype fp16]

Prints a table of median times (triton.testing.do_bench) and achieved TFLOP/s and writes
JSON to $OUT/attention.json if OUT is set, else bench/results/attention.json. Two more
minti columns time the alternatives to two of its choices, so one GPU run can tell whether
they pay: minti_padded (head dims 40/80/160 padded to a power of two instead of split into
two pieces) and minti_two_pass (dQ in a second backward pass instead of atomics). Needs CUDA:
without it, it says so and exits 0. Batch 1 by default: textual inversion trains one image
per step without classifier-free guidance.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import minti.kernels.attention_triton as attention_triton
import minti.kernels.configs as configs
from minti.kernels import flash_attention

# (model, block, heads, Nq, D) for every attention resolution of the UNet; each runs as
# self-attention (Nk = Nq) and as cross-attention to the 77 text tokens.
SHAPES = [
    # SD 1.5 at 512^2 (latent 64^2): 8 heads, head dim = channels / 8.
    ("sd15", "64^2", 8, 4096, 40), ("sd15", "32^2", 8, 1024, 80),
    ("sd15", "16^2", 8, 256, 160), ("sd15", "mid 8^2", 8, 64, 160),
    # SD 2.1 at 768^2 (latent 96^2): head dim 64, heads = channels / 64.
    ("sd21", "96^2", 5, 9216, 64), ("sd21", "48^2", 10, 2304, 64),
    ("sd21", "24^2", 20, 576, 64), ("sd21", "mid 12^2", 20, 144, 64),
    # SDXL at 1024^2 (latent 128^2; the 128^2 level has no attention): head dim 64.
    ("sdxl", "64^2", 10, 4096, 64), ("sdxl", "32^2", 20, 1024, 64),
]
TEXT_TOKENS = 77


def _flops(b: int, h: int, nq: int, nk: int, d: int, backward: bool) -> float:
    fwd = 4.0 * b * h * nq * nk * d  # two matmuls of 2*Nq*Nk*D each
    return fwd * 3.5 if backward else fwd  # backward = 2.5x forward (the usual convention)


def _sdpa(backend):
    def run(q, k, v):
        with sdpa_kernel([backend]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return run


def _time(fn, q, k, v, do, backward: bool) -> float | None:
    """Median ms, or None when the implementation rejects the shape/dtype."""
    import triton.testing  # Triton is optional: only a CUDA run (which has it) gets here

    try:
        out = fn(q, k, v)
        if backward:
            out.backward(do)
    except (RuntimeError, ValueError):  # ValueError: no Triton config measured for this head dim
        return None
    if backward:
        def step():
            fn(q, k, v).backward(do)
        return triton.testing.do_bench(step, grad_to_none=[q, k, v], return_mode="median")
    with torch.no_grad():
        return triton.testing.do_bench(lambda: fn(q, k, v), return_mode="median")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/attention.py needs CUDA (it times GPU kernels); nothing to do here.")
        return 0
    def minti(split: bool = True, one_pass: bool = True):
        # The flags are read at each launch, the backward's included: set them on every call.
        def run(q, k, v):
            configs.SPLIT_HEAD_DIM, attention_triton.ONE_PASS_BACKWARD = split, one_pass
            return flash_attention(q, k, v, backend="triton")
        return run

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    impls = {
        "minti": minti(),
        # The A/B for two choices of the Triton path: head dims that are not a power of two
        # padded to one instead of split into two pieces (configs.head_pieces), and the
        # backward's dQ in a second pass instead of atomics (attention_triton.ONE_PASS_BACKWARD).
        "minti_padded": minti(split=False),
        "minti_two_pass": minti(one_pass=False),
        "sdpa_flash": _sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa_efficient": _sdpa(SDPBackend.EFFICIENT_ATTENTION),
    }
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "attention.json"

    def save(complete: bool) -> None:
        # Rewritten after every shape, so a run cut short by its time limit keeps what it timed.
        path.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                                        complete=complete, rows=rows), indent=1))

    rows = []
    header = f"{'model':5} {'block':9} {'kind':5} {'H':>3} {'Nq':>5} {'Nk':>5} {'D':>4} | " + " | ".join(
        f"{name:>14} fwd ms (TF/s)  fwd+bwd ms (TF/s)" for name in impls)
    print(f"{torch.cuda.get_device_name()}  batch {args.batch}  {args.dtype}")
    print(header)
    b = args.batch
    for model, block, h, nq, d in SHAPES:
        for kind, nk in (("self", nq), ("cross", TEXT_TOKENS)):
            g = torch.Generator(device="cuda").manual_seed(0)
            q, k, v, do = (torch.randn(b, h, n, d, device="cuda", dtype=dtype, generator=g) for n in (nq, nk, nk, nq))
            q, k, v = (t.requires_grad_() for t in (q, k, v))
            with torch.no_grad():
                ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
                err = (impls["minti"](q, k, v).float() - ref).abs().max().item()
            row = dict(model=model, block=block, kind=kind, batch=b, heads=h, nq=nq, nk=nk, head_dim=d,
                       dtype=args.dtype, minti_max_abs_err_vs_fp32=err)
            cells = []
            # Nothing to compare where both layouts are the same (D a power of two), or for the
            # backward's variant forward-only.
            same_tiles = configs.head_pieces(d, split=True) == configs.head_pieces(d, split=False)
            for name, fn in impls.items():
                for mode, backward in (("fwd", False), ("fwd_bwd", True)):
                    unused = (name == "minti_padded" and same_tiles) or (name == "minti_two_pass" and not backward)
                    ms = None if unused else _time(fn, q, k, v, do, backward)
                    tflops = None if ms is None else _flops(b, h, nq, nk, d, backward) / (ms * 1e-3) / 1e12
                    row[f"{name}_{mode}_ms"] = ms
                    row[f"{name}_{mode}_tflops"] = tflops
                    cells.append("     n/a       " if ms is None else f"{ms:7.3f} ({tflops:5.1f})")
            rows.append(row)
            save(complete=False)
            print(f"{model:5} {block:9} {kind:5} {h:>3} {nq:>5} {nk:>5} {d:>4} | "
                  + " | ".join(f"{cells[i]} {cells[i + 1]}" for i in range(0, len(cells), 2)), flush=True)
    # Summary for the target: fwd+bwd at least as fast as the best SDPA backend.
    slower = [r for r in rows if _best_sdpa(r) is not None and r["minti_fwd_bwd_ms"] > _best_sdpa(r)]
    print(f"\nminti fwd+bwd slower than the best SDPA backend on {len(slower)} of {len(rows)} shapes"
          + "".join(f"\n  {r['model']} {r['block']} {r['kind']}: {r['minti_fwd_bwd_ms']:.3f} ms vs "
                    f"{_best_sdpa(r):.3f} ms" for r in slower))
    for other, what in (("minti_padded", "padded head dim vs split"), ("minti_two_pass", "two-pass backward vs one")):
        compared = [r for r in rows if r[f"{other}_fwd_bwd_ms"] is not None]
        if compared:
            print(f"{what}, fwd+bwd ({other} ms / minti ms; > 1: minti's default pays):"
                  + "".join(f"\n  {r['model']} {r['block']} {r['kind']} D={r['head_dim']}: "
                            f"{r[f'{other}_fwd_bwd_ms'] / r['minti_fwd_bwd_ms']:.2f}" for r in compared))
    configs.SPLIT_HEAD_DIM, attention_triton.ONE_PASS_BACKWARD = True, True
    save(complete=True)
    print(f"wrote {path}")
    return 0


def _best_sdpa(row: dict) -> float | None:
    times = [row[f"{n}_fwd_bwd_ms"] for n in ("sdpa_flash", "sdpa_efficient") if row[f"{n}_fwd_bwd_ms"] is not None]
    return min(times) if times else None


if __name__ == "__main__":
    sys.exit(main())
