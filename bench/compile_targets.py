"""Compile every Triton kernel for every GPU generation people train on, without a GPU.

For each target (sm_75 ... sm_120), dtype (fp16, bf16 where the target has it, fp32) and
launch site of the SD 1.5 / 2.1 / XL UNet and text encoders (attention, GroupNorm+SiLU,
GEGLU), every config the launcher or the autotuner can pick on that target (the config
lists after minti.kernels' per-device pruning) is compiled ahead of time with
triton.compile(..., target=GPUTarget("cuda", cc, 32)). Registers and stack come from
`cuobjdump --dump-resource-usage` (shipped inside the triton wheel), spills from the SASS
(`cuobjdump --dump-sass`: every STL/LDL is a register spilled to local memory; those inside
a loop are counted apart), shared memory from the compiled metadata, checked against the
target's per-block limit and against the estimate the pruning trusts.

    python bench/compile_targets.py                      # the full sweep, the table on stdout
    python bench/compile_targets.py --targets sm_75 --dtypes float16 --kernels attention
    python bench/compile_targets.py --all-configs        # also the configs pruning removes
    python bench/compile_targets.py --derive --targets sm_86 --dtypes float16   # the register budget

Exit 1 when a selectable config fails to compile, needs more shared memory than its
target has or than the pruning estimated, or spills inside a loop; or when a launch site has
no selectable config at all, or none that compiles without a single spill (not checked with
--smallest-only). A spill outside every loop (a few bytes ptxas parks before the loops and
reads back after them, once per program) is listed as a NOTE.
Compiles are deduplicated (the same constexprs, argument types and alignment give the
same binary), and serial: the cost is the CPU's. Triton's disk cache keeps the binaries, so
a second run compiles nothing it compiled before.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

os.environ.pop("TRITON_INTERPRET", None)  # real JIT functions, not the interpreter's
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import triton  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402

import minti.kernels.attention_triton as attention  # noqa: E402
import minti.kernels.configs as configs  # noqa: E402
from minti.kernels.geglu import CUDA_BLOCK, geglu_bwd, geglu_fwd  # noqa: E402
from minti.kernels.group_norm_silu import (CUDA_CHUNK, gn_bwd_dx, gn_bwd_merge, gn_bwd_sums, gn_fwd,  # noqa: E402
                                           gn_merge, gn_stats)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


# ----------------------------------------------------------------------------- launch sites

@dataclasses.dataclass(frozen=True)
class AttentionSite:
    model: str
    nq: int
    nk: int
    heads: int
    d: int
    causal: bool = False


def attention_sites() -> list[AttentionSite]:
    """Self- and cross-attention (77 text tokens) at every UNet level with attention, the
    middle block's self-attention, and the text encoders' causal attention."""
    sites = []
    # model -> (latent side, heads, head dim) of each attention level, the middle block last
    unets = {"SD 1.5 512": [(64, 8, 40), (32, 8, 80), (16, 8, 160), (8, 8, 160)],
             "SD 2.1 768": [(96, 5, 64), (48, 10, 64), (24, 20, 64), (12, 20, 64)],
             "SDXL 1024": [(64, 10, 64), (32, 20, 64), (32, 20, 64)]}
    for model, levels in unets.items():
        for side, heads, d in levels:
            sites += [AttentionSite(model, side * side, side * side, heads, d),
                      AttentionSite(model, side * side, 77, heads, d)]
    for model, heads in [("CLIP-L", 12), ("OpenCLIP-H", 16), ("OpenCLIP-bigG", 20)]:
        sites.append(AttentionSite(model, 77, 77, heads, 64, causal=True))
    return list(dict.fromkeys(sites))


def norm_sizes() -> list[tuple[str, int, int, int]]:
    """(model, channels, groups, spatial elements) of the UNet and VAE GroupNorms."""
    sizes = []
    for model, side, widths in [("SD 1.5 512", 64, (320, 640, 1280, 1280)), ("SD 2.1 768", 96, (320, 640, 1280, 1280)),
                                ("SDXL 1024", 128, (320, 640, 1280))]:
        sizes += [(model, c, 32, (side >> i) ** 2) for i, c in enumerate(widths)]
        sizes.append((f"VAE {model.split()[-1]}", 128, 32, (side * 8) ** 2))  # the encoder's first level
    return sizes


def geglu_sizes() -> list[tuple[str, int, int]]:
    """(model, rows, 2F) of the feed-forward GEGLU inputs (F = 4C)."""
    sizes = []
    for model, side, widths in [("SD 1.5 512", 64, (320, 640, 1280)), ("SD 2.1 768", 96, (320, 640, 1280)),
                                ("SDXL 1024", 128, (640, 1280))]:
        first = 0 if model != "SDXL 1024" else 1
        sizes += [(model, (side >> (first + i)) ** 2, 8 * c) for i, c in enumerate(widths)]
    return sizes


# ----------------------------------------------------------------------------- one compile

@dataclasses.dataclass
class Result:
    ok: bool
    shared: int = 0
    regs: int = 0
    stack: int = 0  # bytes of per-thread stack frame (cuobjdump STACK), spilled or not
    spill: int = 0  # bytes of spill stores per thread (STL in the SASS), ptxas's "spill stores"
    hot_spill: int = 0  # bytes of spill loads and stores inside a loop of the SASS
    error: str = ""


def _specialize(fn, args: dict):
    """signature, constexprs and alignment attributes as the launcher would build them."""
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        value = args[name]
        if fn.params[i].is_constexpr:
            signature[name], constexprs[(i,)] = "constexpr", value
            continue
        ty, desc = native_specialize_impl(BaseBackend, value, False, True, True)
        signature[name] = ty
        if ty == "constexpr":  # integers equal to 1 are specialised away
            constexprs[(i,)] = value
        elif isinstance(desc, str):
            attrs[(i,)] = BaseBackend.parse_attr(desc)
    return signature, constexprs, attrs


# One SASS instruction: address, optional predicate, opcode, operands.
_SASS_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


def spills_in_sass(sass: str) -> tuple[int, int]:
    """(bytes of spill stores, bytes of spill loads and stores inside loops) of one kernel.

    A spill is a store to or load from local memory (STL/LDL); Triton's kernels have no
    local arrays, so every one is ptxas moving a register out. A loop is the address range
    between a backward branch and its target; a spill outside every loop (ptxas parks a value
    computed in the prologue and needed in the epilogue) runs once per program, one inside
    runs on every block of the loop. Both count as spills for the sweep.
    """
    instructions = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in _SASS_INSTRUCTION.finditer(sass)]
    loops = []
    for address, opcode, operands in instructions:
        target = re.match(r"\s*(0x[0-9a-f]+)", operands)
        if opcode.startswith("BRA") and target and int(target.group(1), 16) < address:
            loops.append((int(target.group(1), 16), address))
    stores = hot = 0
    for address, opcode, _ in instructions:
        if opcode.startswith(("STL", "LDL")):
            width = 16 if ".128" in opcode else 8 if ".64" in opcode else 4
            stores += width if opcode.startswith("STL") else 0
            hot += width if any(start <= address <= end for start, end in loops) else 0
    return stores, hot


def _cuobjdump(cubin: bytes, *flags: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([CUOBJDUMP, *flags, f.name], capture_output=True, text=True, check=True).stdout


def _resources(cubin: bytes) -> dict:
    usage = dict(field.partition(":")[::2] for field in _cuobjdump(cubin, "--dump-resource-usage").split()
                 if field.partition(":")[0] in ("REG", "STACK"))
    spill, hot_spill = spills_in_sass(_cuobjdump(cubin, "--dump-sass"))
    return dict(regs=int(usage.get("REG", 0)), stack=int(usage.get("STACK", 0)), spill=spill, hot_spill=hot_spill)


_CACHE: dict = {}


def compile_one(fn, args: dict, cc: int, num_warps: int, num_stages: int) -> Result:
    signature, constexprs, attrs = _specialize(fn, args)
    key = (fn.__name__, cc, num_warps, num_stages, tuple(sorted(signature.items())),
           tuple(sorted(constexprs.items())), tuple(sorted((k, str(v)) for k, v in attrs.items())))
    if key not in _CACHE:
        src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        try:
            compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                                      options={"num_warps": num_warps, "num_stages": num_stages})
            _CACHE[key] = Result(True, compiled.metadata.shared, **_resources(compiled.asm["cubin"]))
        except Exception as e:  # a compile error is a finding, not a crash of the sweep
            _CACHE[key] = Result(False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}")
    return _CACHE[key]


# ----------------------------------------------------------------------------- kernels' launches

def _tensor(dtype):
    return torch.empty(16, dtype=dtype)  # only dtype and 16-byte alignment matter here


def attention_launches(site: AttentionSite, dtype: torch.dtype):
    """(kernel name, JIT function, arguments without blocks, config kind) of one attention call."""
    t, f32 = _tensor(dtype), _tensor(torch.float32)
    h, nq, nk, d = site.heads, site.nq, site.nk, site.d
    # The models hand q/k/v over as [B, N, H, D] viewed as [B, H, N, D].
    sq = dict(zip(("b", "h", "m", "d"), (nq * h * d, d, h * d, 1)))
    sk = dict(zip(("b", "h", "m", "d"), (nk * h * d, d, h * d, 1)))
    pieces = dict(D=d, **attention.piece_args(d), CAUSAL=site.causal, PRECISION=attention.precision(dtype))
    strides = dict(sqb=sq["b"], sqh=sq["h"], sqm=sq["m"], sqd=1, skb=sk["b"], skh=sk["h"], skn=sk["m"], skd=1,
                   svb=sk["b"], svh=sk["h"], svn=sk["m"], svd=1)
    fwd = dict(Q=t, K=t, V=t, O=t, LSE=f32, **strides, sob=nq * h * d, soh=nq * d, som=d, sod=1,
               H=h, Nq=nq, Nk=nk, scale=d ** -0.5, **pieces)
    bwd = dict(Q=t, K=t, V=t, DO=t, LSE=f32, DELTA=f32, **strides, sdb=nq * h * d, sdh=nq * d, sdm=d, sdd=1,
               H=h, Nq=nq, Nk=nk, scale=d ** -0.5, **pieces)
    yield "attn_fwd", attention.attn_fwd, fwd, "fwd"
    for atomic in (True, False):
        # split query ranges write fp32 partial dK/dV; a single range (SPLITS=1, which Triton
        # specialises into another binary) writes them in the inputs' dtype (_triton_bwd)
        for splits in (2, 1):
            out = _tensor(torch.float32) if splits > 1 else t
            args = dict(bwd, DK=out, DV=out, DQ=f32 if atomic else t, SPLITS=splits, DQ_ATOMIC=atomic)
            name = f"attn_bwd_dkdv{'' if atomic else '_2pass'}{'' if splits > 1 else '_1range'}"
            yield name, attention.attn_bwd_dkdv, args, "bwd_dkdv"
    yield "attn_bwd_dq_2pass", attention.attn_bwd_dq, dict(bwd, DQ=t), "bwd_dq"


def shape_classes(sites: list[AttentionSite]) -> list[AttentionSite]:
    """One site per (head dim, causal, self or cross): what the test suite's subset compiles."""
    return list({(s.d, s.causal, s.nk == 77): s for s in sites}.values())


def attention_rows(targets, dtypes, all_configs: bool, head_dims=None, one_per_class: bool = False,
                   smallest_only: bool = False):
    sites = [s for s in attention_sites() if head_dims is None or s.d in head_dims]
    sites = shape_classes(sites) if one_per_class else sites
    for target, limits in targets.items():
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            if not configs.dtype_supported(dtype, limits):
                continue
            for site in sites:
                for name, fn, args, kind in attention_launches(site, dtype):
                    chosen = (configs.ATTENTION_CONFIGS[kind] if all_configs
                              else configs.usable_configs(kind, site.d, dtype, limits))
                    chosen = chosen[-1:] if smallest_only else chosen  # the lists run from large to small
                    estimates = [configs.shared_bytes_estimate(kind, c, site.d, dtype) for c in chosen]
                    yield (target, dtype_name, name, f"{site.model} {site.nq}x{site.nk} d{site.d}", fn, args,
                           list(zip(chosen, estimates)))


SD_HEAD_DIMS = (40, 64, 80, 160)  # SD 1.x: 40, 80, 160; SD 2.x, SDXL and every text encoder: 64


def derive(targets, dtypes) -> dict:
    """The register budget (configs.WIDEST_CLEAN's rows) as measured on these targets: every
    ATTENTION_CONFIGS candidate compiled at the self-attention site of each SD head dim,
    narrowest first, until one spills, fails, or needs more shared memory than the target has
    or than the pruning estimates; a config's entry is the widest head-dim width (summed
    pieces) reached, 0 for none. Both dK/dV kernels count for "bwd_dkdv". Targets of one
    class keep the smallest width any of them reached."""
    sites = {s.d: s for s in shape_classes(attention_sites()) if not s.causal and s.nk != 77}
    head_dims = sorted(SD_HEAD_DIMS, key=lambda d: sum(configs.head_pieces(d)))
    table: dict = {}
    for target, limits in targets.items():
        cc = limits.capability[0] * 10 + limits.capability[1]
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            if not configs.dtype_supported(dtype, limits):
                continue
            row = table.setdefault(configs.target_class(limits.capability), {}).setdefault(configs.operand_kind(dtype), {})
            for kind, candidates in configs.ATTENTION_CONFIGS.items():
                for config in candidates:
                    block_m, block_n, warps, stages = config
                    widest = 0
                    for d in head_dims:
                        estimate = configs.shared_bytes_estimate(kind, config, d, dtype)
                        if estimate > limits.shared_bytes:
                            break
                        results = [compile_one(fn, {**args, "BLOCK_M": block_m, "BLOCK_N": block_n}, cc, warps, stages)
                                   for _, fn, args, k in attention_launches(sites[d], dtype) if k == kind]
                        if not all(r.ok and not r.spill and r.shared <= estimate for r in results):
                            break
                        widest = sum(configs.head_pieces(d))
                    widths = row.setdefault(kind, {})
                    widths[config] = min(widest, widths.get(config, widest))
                    print(f"{target} {dtype_name} {kind} {config}: widest clean {widest}", file=sys.stderr, flush=True)
    return table


def small_kernel_rows(targets, dtypes, one_size: bool = False):
    """GroupNorm+SiLU and GEGLU: fixed blocks, Triton's default 4 warps and 3 stages."""
    for target, limits in targets.items():
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            if not configs.dtype_supported(dtype, limits):
                continue
            t, f32 = _tensor(dtype), _tensor(torch.float32)
            chunk = CUDA_CHUNK
            for model, c, g, s in norm_sizes()[-1:] if one_size else norm_sizes():
                m = c // g * s
                n_chunks = triton.cdiv(m, chunk)
                shape = f"{model} C{c} {int(s ** 0.5)}^2"
                common = dict(M=m, S=s, C=c, G=g, CHUNK=chunk)
                launches = [
                    ("gn_stats", gn_stats, dict(X=t, COUNT=f32, MEAN=f32, M2=f32, M=m, n_chunks=n_chunks, CHUNK=chunk)),
                    ("gn_merge", gn_merge, dict(COUNT=f32, CMEAN=f32, M2=f32, MEAN=f32, RSTD=f32, M=m,
                                                    n_chunks=n_chunks, eps=1e-5, N_CHUNKS=triton.next_power_of_2(n_chunks))),
                    ("gn_fwd", gn_fwd, dict(X=t, W=t, B=t, MEAN=f32, RSTD=f32, OUT=t, SILU=True, **common)),
                    ("gn_bwd_sums", gn_bwd_sums, dict(X=t, DOUT=t, W=t, B=t, MEAN=f32, RSTD=f32, SUM1=f32, SUM2=f32,
                                                          n_chunks=n_chunks, SILU=True, **common)),
                    ("gn_bwd_merge", gn_bwd_merge, dict(SUM1=f32, SUM2=f32, C1=f32, C2=f32, M=m, n_chunks=n_chunks,
                                                            N_CHUNKS=triton.next_power_of_2(n_chunks))),
                    ("gn_bwd_dx", gn_bwd_dx, dict(X=t, DOUT=t, W=t, B=t, MEAN=f32, RSTD=f32, C1=f32, C2=f32, DX=t,
                                                      SILU=True, **common)),
                ]
                for name, fn, args in launches:
                    yield target, dtype_name, name, shape, fn, args, [((0, 0, 4, 3), None)]
            for model, rows, width in geglu_sizes()[:1] if one_size else geglu_sizes():
                f = width // 2
                args = dict(X=t, OUT=t, n_out=rows * f, F_half=f, stride_row=width, BLOCK=CUDA_BLOCK)
                yield target, dtype_name, "geglu_fwd", f"{model} {rows}x{width}", geglu_fwd, args, [((0, 0, 4, 3), None)]
                args = dict(X=t, DOUT=t, DX=t, n_out=rows * f, F_half=f, stride_row=width, BLOCK=CUDA_BLOCK)
                yield target, dtype_name, "geglu_bwd", f"{model} {rows}x{width}", geglu_bwd, args, [((0, 0, 4, 3), None)]


# ----------------------------------------------------------------------------- sweep and report

def sweep(targets, dtypes, kernel_names, all_configs: bool = False, verbose: bool = False, head_dims=None,
          one_per_class: bool = False, smallest_only: bool = False, one_size: bool = False):
    """Per (target, dtype, kernel): counts, worst shared / registers / spill, and the failures.
    kernel_names: "attention", "small", or single kernels by their row name (attn_fwd, gn_fwd, ...)."""
    groups = {"attention", "small"}
    singles = set(kernel_names) - groups
    rows = []
    if "attention" in kernel_names or any(n.startswith("attn_") for n in singles):
        rows += list(attention_rows(targets, dtypes, all_configs, head_dims, one_per_class, smallest_only))
    if "small" in kernel_names or any(not n.startswith("attn_") for n in singles):
        rows += list(small_kernel_rows(targets, dtypes, one_size))
    if not groups & set(kernel_names):
        rows = [row for row in rows if row[2] in singles]
    stats = defaultdict(lambda: dict(configs=0, failed=0, over=0, hot=0, cold=0, shared=0, regs=0, spill=0))
    problems, notes = [], []
    for target, dtype_name, name, shape, fn, args, selectable in rows:
        limits = configs.TARGET_LIMITS[target]
        s = stats[(target, dtype_name, name)]
        if not selectable:
            problems.append(f"{target} {dtype_name} {name} {shape}: no selectable config")
        clean = False  # some selectable config of this launch compiles without a single spill
        for (block_m, block_n, warps, stages), estimate in selectable:
            blocks = {"BLOCK_M": block_m, "BLOCK_N": block_n} if block_m else {}
            r = compile_one(fn, {**args, **blocks}, limits.capability[0] * 10 + limits.capability[1], warps, stages)
            s["configs"] += 1
            where = f"{target} {dtype_name} {name} {shape} {block_m}x{block_n} w{warps} s{stages}"
            if not r.ok:
                s["failed"] += 1
                problems.append(f"{where}: compile failed: {r.error}")
                continue
            s["shared"], s["regs"], s["spill"] = max(s["shared"], r.shared), max(s["regs"], r.regs), max(s["spill"], r.spill)
            if r.shared > limits.shared_bytes:
                s["over"] += 1
                problems.append(f"{where}: shared {r.shared} > {limits.shared_bytes}")
            if estimate is not None and r.shared > estimate:  # pruning trusts the estimate
                problems.append(f"{where}: shared {r.shared} above the pruning estimate {estimate}")
            if r.hot_spill:  # spill traffic on every block of a loop
                s["hot"] += 1
                problems.append(f"{where}: spills {r.spill} bytes per thread, {r.hot_spill} bytes moved in its loops")
            elif r.spill:  # parked once per program, before the loops and read back after
                s["cold"] += 1
                notes.append(f"{where}: {r.spill} bytes spilled outside its loops")
            clean |= r.spill == 0
            if verbose:
                print(f"{where}: shared {r.shared}, regs {r.regs}, stack {r.stack}, spill {r.spill} "
                      f"({r.hot_spill} in loops)", flush=True)
        if selectable and not clean and not smallest_only:  # --smallest-only compiles one config of several
            problems.append(f"{target} {dtype_name} {name} {shape}: every selectable config spills")
    return stats, problems, notes


def table(stats) -> str:
    lines = ["| target | dtype | kernel | configs | failed | over shared limit | spill in a loop | spill outside loops "
             "| max shared (limit) | max regs | max spill B |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (target, dtype_name, name), s in sorted(stats.items()):
        limit = configs.TARGET_LIMITS[target].shared_bytes
        lines.append(f"| {target} | {dtype_name} | {name} | {s['configs']} | {s['failed']} | {s['over']} | {s['hot']} | "
                     f"{s['cold']} | {s['shared'] // 1024} KiB ({limit // 1024}) | {s['regs']} | {s['spill']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", default=",".join(configs.TARGET_LIMITS), help="comma-separated, e.g. sm_75,sm_86")
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--kernels", default="attention,small",
                   help="attention, small (GroupNorm+SiLU and GEGLU), or kernels by name (attn_fwd, geglu_bwd, ...)")
    p.add_argument("--all-configs", action="store_true", help="compile every listed config, not only the selectable")
    p.add_argument("--verbose", action="store_true", help="one line per compile")
    p.add_argument("--head-dims", help="attention head dims only, e.g. 160 or 40,80")
    p.add_argument("--one-per-class", action="store_true",
                   help="one attention site per (head dim, causal, self/cross) instead of every site")
    p.add_argument("--smallest-only", action="store_true",
                   help="only the last (smallest) selectable attention config per site")
    p.add_argument("--one-size", action="store_true", help="GroupNorm+SiLU and GEGLU at one size each")
    p.add_argument("--derive", action="store_true",
                   help="measure the register budget instead, for --targets and --dtypes, into --budget")
    p.add_argument("--budget", default=str(configs.REGISTER_BUDGET_FILE),
                   help="the register budget file --derive rewrites: the classes and operand kinds it measured "
                        "are replaced, the others and the overrides kept (default: the one the kernels read)")
    args = p.parse_args(argv)
    targets = {t: configs.TARGET_LIMITS[t] for t in args.targets.split(",")}
    if args.derive:
        measured = derive(targets, args.dtypes.split(","))
        budget = configs.load_register_budget(args.budget).with_measured(measured)
        with open(args.budget, "w") as f:
            f.write(budget.dumps())
        rows = ", ".join(f"{cls} {operand}" for cls, operands in measured.items() for operand in operands)
        print(f"wrote {args.budget}: measured {rows or 'nothing'}; {len(budget.overrides)} overrides kept")
        return 0
    head_dims = {int(d) for d in args.head_dims.split(",")} if args.head_dims else None
    start = time.time()
    stats, problems, notes = sweep(targets, args.dtypes.split(","), args.kernels.split(","), args.all_configs, args.verbose,
                            head_dims, args.one_per_class, args.smallest_only, args.one_size)
    print(f"triton {triton.__version__}, torch {torch.__version__}, {len(_CACHE)} distinct compiles in "
          f"{time.time() - start:.0f} s")
    print(table(stats))
    for line in notes:
        print("NOTE", line)
    for line in problems:
        print("PROBLEM", line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
