"""What each GPU can run: its limits, the attention kernels' block configs, the measured
register budget, and the pruning that keeps only the configs that fit the running GPU.

A pure-Python module (no Triton): the pruning is tested with made-up devices, and
bench/compile_targets.py compiles for the targets listed here without a GPU.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch


@dataclasses.dataclass(frozen=True)
class DeviceLimits:
    """What the kernels' launchers need to know about a GPU: a pure value, so config pruning
    can be tested with made-up devices."""
    capability: tuple[int, int]
    shared_bytes: int  # max dynamic shared memory per block, opt-in

    @property
    def runs_triton(self) -> bool:
        return self.capability >= (7, 5)  # Triton emits no code for Pascal (sm_6x) or older

    @property
    def has_bf16(self) -> bool:
        return self.capability >= (8, 0)  # Triton has no bf16 arithmetic before Ampere


KIB = 1024
# Per-block opt-in shared memory of each compute capability (CUDA C Programming Guide,
# "Technical Specifications per Compute Capability"); bench/compile_targets.py compiles for these.
TARGET_LIMITS = {
    "sm_75": DeviceLimits((7, 5), 64 * KIB),
    "sm_80": DeviceLimits((8, 0), 163 * KIB),
    "sm_86": DeviceLimits((8, 6), 99 * KIB),
    "sm_89": DeviceLimits((8, 9), 99 * KIB),
    "sm_90": DeviceLimits((9, 0), 227 * KIB),
    "sm_120": DeviceLimits((12, 0), 99 * KIB),
}


def device_limits(device: torch.device) -> DeviceLimits | None:
    """The limits of a CUDA device, None for any other device."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return DeviceLimits((props.major, props.minor), props.shared_memory_per_block_optin)


def dtype_supported(dtype: torch.dtype, limits: DeviceLimits) -> bool:
    """Triton compiles kernels in dtype for this device."""
    return limits.runs_triton and (dtype != torch.bfloat16 or limits.has_bf16)


# ----------------------------------------------------------------------------- head dim pieces

# Split a head dim that is not a power of two into two power-of-two pieces (True), or pad it
# to the next power of two (False). bench/attention.py times both ("minti_padded").
SPLIT_HEAD_DIM = True


def pow2_at_least_16(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())  # tl.arange needs a power of two; tl.dot K >= 16


def head_pieces(d: int, split: bool | None = None) -> tuple[int, int]:
    """(D_LO, D_HI): the power-of-two column pieces that cover head dim d, D_HI = 0 for one.

    Padding d to a power of two wastes matmul work on zeros: 80 -> 128 is 60% more, 160 ->
    256 too, and SD 1.x's head dims are 40, 80 and 160. Two pieces waste at most the second
    one's rounding: 40 = 32 + 16 (8 zeros, padding has 24), 80 = 64 + 16, 160 = 128 + 32.
    Where two pieces save nothing (24 = 16 + 16, 200 = 128 + 128) one padded tile is used.
    The register budget and the shared-memory estimate count the pieces' summed width.
    """
    split = SPLIT_HEAD_DIM if split is None else split
    padded = pow2_at_least_16(d)
    lo = max(16, 1 << (d.bit_length() - 1))  # largest power of two <= d
    if not split or d <= lo:
        return padded, 0
    hi = pow2_at_least_16(d - lo)
    return (lo, hi) if lo + hi < padded else (padded, 0)


# ----------------------------------------------------------------------------- attention configs

# (BLOCK_M, BLOCK_N, num_warps, num_stages) the autotuner may time on a GPU, per kernel:
# "fwd" (attn_fwd), "bwd_dkdv" (attn_bwd_dkdv, with or without atomic dQ), "bwd_dq"
# (attn_bwd_dq), larger blocks first. usable_configs keeps the first MAX_TUNED_CONFIGS of
# them that fit the running GPU's shared memory and its register budget (WIDEST_CLEAN).
ATTENTION_CONFIGS = {
    "fwd": [(128, 64, 8, 3), (128, 32, 4, 3), (64, 32, 4, 2), (32, 32, 4, 2), (16, 32, 4, 1), (16, 16, 8, 1),
            (16, 16, 4, 1)],
    "bwd_dkdv": [(64, 64, 8, 2), (32, 64, 4, 2), (32, 32, 4, 2), (16, 32, 4, 2), (16, 32, 8, 1), (16, 16, 8, 1),
                 (16, 16, 4, 2)],
    "bwd_dq": [(128, 32, 8, 2), (64, 64, 8, 2), (64, 32, 4, 2), (32, 32, 4, 2), (16, 16, 8, 1)],
}
MAX_TUNED_CONFIGS = 3  # each one more is tuned at the first step and compiled by the sweep on every target

Config = tuple[int, int, int, int]
_CONFIG_NAME = re.compile(r"(\d+)x(\d+) w(\d+) s(\d+)")


def config_name(config: Config) -> str:
    """(128, 64, 8, 3) -> "128x64 w8 s3", as bench/RESULTS.md writes configs."""
    block_m, block_n, warps, stages = config
    return f"{block_m}x{block_n} w{warps} s{stages}"


def parse_config(name: str) -> Config:
    match = _CONFIG_NAME.fullmatch(name)
    if match is None:
        raise ValueError(f"not a config name like '128x64 w8 s3': {name!r}")
    return tuple(int(g) for g in match.groups())


# ----------------------------------------------------------------------------- the register budget

REGISTER_BUDGET_FILE = Path(__file__).with_name("register_budget.json")


@dataclasses.dataclass
class RegisterBudget:
    """register_budget.json: per target class, operand kind and kernel, the widest head dim
    (summed pieces) each config compiled at without a register spill (its "about" says how it
    was measured). `measured` is what `bench/compile_targets.py --derive` wrote; `overrides`
    are entries set by hand after the full sweep, each with its reason, applied on top."""
    about: list[str]
    measured: dict[str, dict[str, dict[str, dict[Config, int]]]]  # class -> operand -> kind -> widths
    overrides: list[dict]  # {"class", "operand", "kind", "config", "widest" (0: removed), "reason"}

    def table(self) -> dict[str, dict[str, dict[str, dict[Config, int]]]]:
        """The budget the pruning reads: the measured widths with the overrides applied."""
        table = {cls: {operand: {kind: dict(widths) for kind, widths in kinds.items()}
                       for operand, kinds in operands.items()} for cls, operands in self.measured.items()}
        for override in self.overrides:
            widths = table[override["class"]][override["operand"]][override["kind"]]
            config = parse_config(override["config"])
            if override["widest"]:
                widths[config] = override["widest"]
            else:
                widths.pop(config, None)
        return table

    def with_measured(self, rows: dict[str, dict[str, dict[str, dict[Config, int]]]]) -> RegisterBudget:
        """This budget with the (class, operand) rows of a new measurement in place of the old
        ones; widths of 0 (not clean at any head dim) are left out, the overrides kept."""
        measured = {cls: dict(operands) for cls, operands in self.measured.items()}
        for cls, operands in rows.items():
            for operand, kinds in operands.items():
                measured.setdefault(cls, {})[operand] = {
                    kind: {config: width for config, width in widths.items() if width} for kind, widths in kinds.items()}
        return RegisterBudget(self.about, measured, self.overrides)

    def dumps(self) -> str:
        measured = {cls: {operand: {kind: {config_name(c): w for c, w in widths.items()} for kind, widths in kinds.items()}
                          for operand, kinds in operands.items()} for cls, operands in self.measured.items()}
        return _json_text({"about": self.about, "measured": measured, "overrides": self.overrides}) + "\n"


def load_register_budget(path: Path = REGISTER_BUDGET_FILE) -> RegisterBudget:
    data = json.loads(Path(path).read_text())
    measured = {cls: {operand: {kind: {parse_config(c): w for c, w in widths.items()} for kind, widths in kinds.items()}
                      for operand, kinds in operands.items()} for cls, operands in data["measured"].items()}
    return RegisterBudget(data["about"], measured, data["overrides"])


def _json_text(value, depth: int = 0) -> str:
    """JSON with one line per list item and per innermost dict (a kernel's widths, an override)."""
    nested = isinstance(value, list) or (isinstance(value, dict) and any(isinstance(v, (dict, list))
                                                                         for v in value.values()))
    if not (nested and value):
        return json.dumps(value)
    inner, outer = "  " * (depth + 1), "  " * depth
    if isinstance(value, list):
        lines = [inner + _json_text(v, depth + 1) for v in value]
        return "[\n" + ",\n".join(lines) + f"\n{outer}]"
    lines = [f"{inner}{json.dumps(k)}: {_json_text(v, depth + 1)}" for k, v in value.items()]
    return "{\n" + ",\n".join(lines) + f"\n{outer}}}"


# class -> operand kind -> kernel kind -> {config: widest clean width}; read once, at import.
WIDEST_CLEAN = load_register_budget().table()


def target_class(capability: tuple[int, int]) -> str:
    """The WIDEST_CLEAN row of a compute capability: Turing, Ampere/Ada, Hopper, Blackwell."""
    if capability < (8, 0):
        return "sm_75"
    if capability < (9, 0):
        return "sm_8x"
    return "sm_90" if capability < (10, 0) else "sm_120"


def operand_kind(dtype: torch.dtype) -> str:
    """The register budget's operand kind: "half" (fp16/bf16 tensor-core dots) or "fp32"
    (exact fp32 dots on CUDA cores)."""
    return "fp32" if dtype == torch.float32 else "half"


# ----------------------------------------------------------------------------- pruning

def shared_bytes_estimate(kind: str, config: Config, d: int, dtype: torch.dtype) -> int:
    """Shared memory a config needs, an upper bound modelled on what Triton allocates: the
    blocks its software pipeline streams (num_stages copies, plus one where a target without
    asynchronous copies stages them through registers), the tiles loaded once, and the layout
    conversions of the tiles that feed a second dot. bench/compile_targets.py checks it
    against the compiled kernels on every target."""
    block_m, block_n, _warps, stages = config
    width = sum(head_pieces(d))
    e = torch.empty((), dtype=dtype).element_size()
    if kind == "fwd":  # K and V streamed; Q loaded once; P re-laid out for P V
        return (stages + 1) * 2 * block_n * width * e + block_m * width * e + block_m * block_n * e
    if kind == "bwd_dq":  # K and V streamed; Q and dO loaded once; dS re-laid out for dS K
        return (stages + 1) * 2 * block_n * width * e + 2 * block_m * width * e + block_m * block_n * e
    # bwd_dkdv: Q and dO streamed; K and V loaded once; P^T and dS^T re-laid out for dV and dK
    return (stages + 1) * 2 * block_m * width * e + 2 * block_n * width * e + 2 * block_m * block_n * e


def usable_configs(kind: str, d: int, dtype: torch.dtype, limits: DeviceLimits) -> list[Config]:
    """The configs of ATTENTION_CONFIGS[kind] the autotuner may try on a device with these
    limits at head dim d: the first MAX_TUNED_CONFIGS whose shared memory fits and that compiled
    without spilling at this head dim's width on this class of GPU (WIDEST_CLEAN). A pure
    function, tested with made-up devices; empty where Triton cannot run in dtype at all."""
    if not dtype_supported(dtype, limits):
        return []
    width = sum(head_pieces(d))
    widest = WIDEST_CLEAN[target_class(limits.capability)][operand_kind(dtype)][kind]
    usable = [c for c in ATTENTION_CONFIGS[kind]
              if widest.get(c, 0) >= width and shared_bytes_estimate(kind, c, d, dtype) <= limits.shared_bytes]
    return usable[:MAX_TUNED_CONFIGS]


def has_configs(d: int, dtype: torch.dtype, limits: DeviceLimits | None) -> bool:
    """Every attention kernel keeps a config for head dim d on this device (None: the CPU,
    where the interpreter runs fixed blocks). False past the widest head dim the register
    budget was measured at (160) and where dtype has no Triton kernels on the device."""
    return limits is None or all(usable_configs(kind, d, dtype, limits) for kind in ATTENTION_CONFIGS)
