"""Memory plans for the training step: which UNet blocks to recompute instead of store.

    fast  store every activation the backward needs (frozen convs still keep no input)
    low   recompute every UNet block in backward: keep only block inputs (+1 UNet forward)
    auto  few recomputed FLOPs whose modelled peak fits the budget (free GPU memory, or --vram
          GiB): weights + MARGIN x activations + RESERVE <= budget; on the CPU without --vram
          always fast (memory is plentiful there, time is not)

The model behind auto is one attributed meta trace of the `fast` step (minti.training.memtrace):
at every op it records the live activation bytes and, per UNet block, the bytes that block
stored for the backward; recomputing a block removes its bytes from every moment except while
that block itself runs (forward or backward), where its inside exists again. The same trace
counts each block's forward FLOPs (its recompute cost). Blocks are ranked once, greedily by
bytes saved at the peak per FLOP (cheap, not proven cheapest); a budget takes the shortest
prefix of that ranking that fits, so a larger budget never recomputes more. The chosen plan is then traced for real and
lengthened until the trace fits too, so the peak it reports is the one it claimed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

from minti.diffusion import diffusion_loss
from minti.errors import UserError
from minti.loading.pipeline import random_model
from minti.models.clip import build_text_encoder
from minti.models.fp8 import use_fp8_weights
from minti.models.unet import UNet
from minti.training.memtrace import MemoryTracer

MODES = ("auto", "low", "fast")
# What the trace leaves out, on top of the modelled peak: allocator rounding and fragmentation
# grow with the activations (x MARGIN; the weights are allocated once and do not fragment),
# cuBLAS/cuDNN workspaces are a fixed size (RESERVE).
MARGIN = 1.15
RESERVE = 256 * 2**20
GiB = 2**30


# ---- the attributed trace ------------------------------------------------------------------

class _BlockTracer(MemoryTracer):
    """MemoryTracer that also knows which UNet block made each activation, records the bytes per
    block at every op (`events`), and counts each block's forward FLOPs. Weights are counted once
    and left out of the sweep (they never die), which keeps the trace fast."""

    def __init__(self, unet: torch.nn.Module, modules: list[torch.nn.Module], extra: list[torch.Tensor],
                 record: bool) -> None:
        super().__init__(modules, extra)
        self.blocks = list(unet.blocks)
        self.record = record
        self.weight_bytes = 0
        self.block_bytes = [0] * len(self.blocks)
        self.flops = [0] * len(self.blocks)
        self.unet_flops = 0  # forward and backward of the UNet
        self.in_unet_backward = False  # set by the caller from loss.backward() until context's gradient
        self.events: list[tuple[int, int, list[int]]] = []  # (live activation bytes, active block or -1, per block)
        self._block: int | None = None  # the block whose forward is running
        self._in_unet = False
        self._unet = unet
        self._owner: dict[int, int] = {}  # storage key -> block that made it
        self._weights: set[int] = set()  # storage keys of the weights

    def track(self, t: torch.Tensor, label: str) -> None:
        key = t.untyped_storage()._cdata
        if key in self._weights:  # a view of a weight (a linear's transpose): no new memory
            return
        if label == "weights":
            self._weights.add(key)
            self.weight_bytes += t.untyped_storage().nbytes()
            return
        if key in self.live and self.live[key].ref.expired():  # a freed storage's address, reused
            self._forget(key)
        fresh = key not in self.live
        super().track(t, label)
        if fresh and self._block is not None:
            self._owner[key] = self._block
            self.block_bytes[self._block] += self.live[key].nbytes

    def _sweep(self) -> None:
        for key in [k for k, v in self.live.items() if v.ref.expired()]:
            self._forget(key)

    def _forget(self, key: int) -> None:
        item = self.live.pop(key)
        self.current_bytes -= item.nbytes
        if key in self._owner:
            self.block_bytes[self._owner.pop(key)] -= item.nbytes

    def _observe(self, where: str) -> None:
        if self.current_bytes > self.peak_bytes:
            self.peak_bytes, self.peak_at = self.current_bytes, where

    def _enter_block(self, index: int):
        def hook(_module, _inputs):
            self._block = index
        return hook

    def _leave_block(self, index: int):
        def hook(_module, _inputs, output):
            self._block = None
            key = output.untyped_storage()._cdata  # the output lives on as the next block's input
            if self._owner.get(key) == index:
                self.block_bytes[self._owner.pop(key)] -= self.live[key].nbytes
        return hook

    def _unet_hook(self, inside: bool):
        def hook(*_args):
            self._in_unet = inside
        return hook

    def __enter__(self):
        for i, block in enumerate(self.blocks):
            self._hooks.append(block.register_forward_pre_hook(self._enter_block(i)))
            self._hooks.append(block.register_forward_hook(self._leave_block(i)))
        self._hooks.append(self._unet.register_forward_pre_hook(self._unet_hook(True)))
        self._hooks.append(self._unet.register_forward_hook(self._unet_hook(False)))
        result = super().__enter__()
        self.peak_bytes = self.current_bytes = self.current_bytes  # activations and inputs only
        return result

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if self._in_unet or self.in_unet_backward:
            flops = _forward_flops(func, args, kwargs or {}, out)
            self.unet_flops += flops
            if self._block is not None and self._in_unet:
                self.flops[self._block] += flops
        if self.record:
            # the block whose forward runs, or in backward the one being differentiated
            active = self._block if self._block is not None else self._last_alive_block()
            self.events.append((self.current_bytes, active, list(self.block_bytes)))
        return out

    def _last_alive_block(self) -> int:
        """In backward, the block being differentiated: the last one whose stored bytes are alive."""
        return next((i for i in reversed(range(len(self.blocks))) if self.block_bytes[i] > 0), -1)


def _forward_flops(func, args, kwargs, out) -> int:
    """FLOPs of one op as torch.utils.flop_counter counts them (matmul, conv, attention)."""
    packet = func._overloadpacket
    if packet in flop_registry:
        return flop_registry[packet](*args, **kwargs, out_val=out)
    if str(packet) == "minti.flash_attn_fwd":  # minti's Triton attention: counted like SDPA
        return sdpa_flop_count(args[0].shape, args[1].shape, args[2].shape)
    if str(packet) == "minti.flash_attn_bwd":
        return sdpa_backward_flop_count(*(a.shape for a in args[:4]))
    return 0


def _meta_twin(sd):
    """sd's networks rebuilt on the meta device from their configs (no weights, no copies)."""
    meta = random_model(sd.family, sd.dtype, "meta", prediction=sd.prediction)
    with torch.device("meta"):
        meta.unet = UNet(sd.unet.cfg).to(sd.dtype).requires_grad_(False)
        meta.text_encoders = [build_text_encoder(e.cfg).to(sd.dtype).requires_grad_(False)
                              for e in sd.text_encoders]
    if getattr(sd, "weights", None) == "fp8":  # the planner must see the bytes the card will hold
        for module in (meta.unet, *meta.text_encoders):
            use_fp8_weights(module)
        meta.weights = "fp8"
    return meta


def _trace_step(sd, resolution: int, batch_size: int, recompute: frozenset[int], record: bool) -> _BlockTracer:
    """One training step of sd's networks on the meta device under a _BlockTracer: the text
    encoders, then the trainer's objective (minti.diffusion.diffusion_loss) and its backward."""
    meta = _meta_twin(sd)
    meta.unet.recompute = recompute
    with torch.device("meta"):
        vectors = [torch.zeros(1, d, requires_grad=True) for d in meta.embedding_dims]
        latents = torch.zeros(batch_size, meta.unet.cfg.in_channels, resolution // 8, resolution // 8,
                              dtype=sd.dtype)
    meta.add_placeholder("<estimate>", 1)
    tokens = meta.tokenize(["a photo of <estimate>"] * batch_size)
    with _BlockTracer(meta.unet, [meta.unet, *meta.text_encoders], [*vectors, latents], record) as tracer:
        tokens = [t.to("meta") for t in tokens]
        context, pooled = meta.encode_tokens(tokens, vectors)
        y = meta.size_condition(pooled, original_size=(resolution, resolution), target_size=(resolution, resolution))
        noise = torch.zeros(latents.shape, device="meta")
        t = torch.zeros(batch_size, dtype=torch.long, device="meta")
        loss = diffusion_loss(meta.unet, latents, noise, t, context, y, prediction=meta.prediction)
        # the UNet's backward ends when the text's gradient is complete; the encoders' follows
        context.register_hook(lambda grad: setattr(tracer, "in_unet_backward", False))
        tracer.in_unet_backward = True
        loss.backward()
    return tracer


def estimate_step_bytes(sd, resolution: int, batch_size: int, checkpointing: bool = False,
                        recompute: frozenset[int] | None = None) -> int:
    """Peak bytes of one training step of sd's networks, weights included, traced on the meta
    device (seconds), recomputing the blocks in `recompute` (default: all with `checkpointing`)."""
    if recompute is None:
        recompute = frozenset(range(len(sd.unet.blocks))) if checkpointing else frozenset()
    tracer = _trace_step(sd, resolution, batch_size, recompute, record=False)
    return tracer.weight_bytes + tracer.peak_bytes


# ---- the cost model ------------------------------------------------------------------------

@dataclass
class BlockCosts:
    """What one attributed trace of the `fast` step says about each UNet block."""
    weights: int  # bytes of the weights (always alive)
    totals: torch.Tensor  # [E] live activation bytes at each op
    savable: torch.Tensor  # [E, B] bytes block b stored at each op, 0 while b itself runs
    flops: list[int]  # [B] forward FLOPs of each block: what recomputing it costs
    unet_step_flops: int  # FLOPs of the UNet's forward and backward in the fast step
    seconds: float  # how long the trace took
    order: list[int] = field(default_factory=list)  # blocks ranked by bytes saved per FLOP

    @property
    def n_blocks(self) -> int:
        return len(self.flops)

    def peak(self, recompute: frozenset[int]) -> int:
        """Modelled peak bytes (weights included) when the blocks in `recompute` are recomputed."""
        mask = torch.zeros(self.n_blocks, dtype=torch.float64)
        mask[list(recompute)] = 1.0
        return self.weights + int((self.totals - self.savable @ mask).max())


def attributed_costs(sd, resolution: int, batch_size: int) -> BlockCosts:
    """Trace sd's fast step once (cached per model shape and resolution) and rank the blocks."""
    key = _shape_key(sd, resolution, batch_size)
    if key not in _COSTS:
        start = time.perf_counter()
        tracer = _trace_step(sd, resolution, batch_size, frozenset(), record=True)
        totals = torch.tensor([e[0] for e in tracer.events], dtype=torch.float64)
        savable = torch.tensor([e[2] for e in tracer.events], dtype=torch.float64)
        active = torch.tensor([e[1] for e in tracer.events])
        running = active >= 0
        savable[running.nonzero().squeeze(1), active[running]] = 0.0
        costs = BlockCosts(tracer.weight_bytes, totals, savable, tracer.flops, tracer.unet_flops,
                           time.perf_counter() - start)
        costs.order = _rank(costs)
        _COSTS[key] = costs
    return _COSTS[key]


_COSTS: dict[tuple, BlockCosts] = {}


def _shape_key(sd, resolution: int, batch_size: int) -> tuple:
    return (sd.family, sd.prediction, sd.dtype, getattr(sd, "weights", None), repr(sd.unet.cfg),
            tuple(repr(e.cfg) for e in sd.text_encoders), resolution, batch_size)


def _rank(costs: BlockCosts) -> list[int]:
    """Greedy ranking: repeatedly the block that lowers the modelled peak most per FLOP; blocks
    that no longer lower it come last, cheapest first. Every prefix is a plan."""
    chosen: list[int] = []
    left = set(range(costs.n_blocks))
    peak = costs.peak(frozenset())
    while left:
        gains = {b: (peak - costs.peak(frozenset([*chosen, b]))) / max(costs.flops[b], 1) for b in left}
        best = max(sorted(left), key=lambda b: gains[b])
        if gains[best] <= 0:
            chosen += sorted(left, key=lambda b: costs.flops[b])
            break
        chosen.append(best)
        left.remove(best)
        peak = costs.peak(frozenset(chosen))
    return chosen


# ---- plans ---------------------------------------------------------------------------------

def need_bytes(peak: int, weights: int) -> int:
    """What a modelled peak needs on the card: the weights, the activations x MARGIN, RESERVE."""
    return weights + int((peak - weights) * MARGIN) + RESERVE


@dataclass
class Plan:
    """Which UNet blocks are recomputed, and what the model says that costs."""
    recompute: frozenset[int]
    n_blocks: int
    peak: int | None  # modelled peak bytes of one step, weights included; None: not modelled
    extra_flops: int  # recomputed forward FLOPs per step
    unet_step_flops: int  # the UNet's forward and backward FLOPs per step without recompute
    budget: int | None = None  # bytes the step may use (free VRAM or --vram); None: not planned

    @property
    def name(self) -> str:
        return "fast" if not self.recompute else "low" if len(self.recompute) == self.n_blocks else "partial"

    def describe(self) -> str:
        """The one line a run logs at start."""
        head = f"memory: recompute {len(self.recompute)} of {self.n_blocks} UNet blocks"
        if self.peak is None:
            return f"{head} ({self.name}; not modelled: no GPU memory to plan against, see --vram)"
        budget = "" if self.budget is None else f" of {self.budget / GiB:.2f} free"
        extra = 100 * self.extra_flops / max(self.unet_step_flops, 1)
        return f"{head}, modelled peak {self.peak / GiB:.2f} GiB{budget}, +{extra:.0f}% UNet FLOPs"


def plan_for(costs: BlockCosts, recompute: frozenset[int], peak: int | None = None,
             budget: int | None = None) -> Plan:
    return Plan(frozenset(recompute), costs.n_blocks, costs.peak(recompute) if peak is None else peak,
                sum(costs.flops[b] for b in recompute), costs.unet_step_flops, budget)


def choose(sd, resolution: int, batch_size: int, budget: int) -> Plan:
    """The shortest prefix of the blocks' ranking whose modelled peak fits `budget` bytes (with
    MARGIN and RESERVE), lengthened until one real trace of it fits too. UserError if none does."""
    costs = attributed_costs(sd, resolution, batch_size)
    fits = lambda peak: need_bytes(peak, costs.weights) <= budget  # noqa: E731
    prefixes = [frozenset(costs.order[:k]) for k in range(costs.n_blocks + 1)]
    k = next((k for k, blocks in enumerate(prefixes) if fits(costs.peak(blocks))), None)
    while k is not None and k < len(prefixes):
        # the fast plan's peak is the attributed trace's own; others are traced once to confirm
        peak = costs.peak(prefixes[k]) if k == 0 else traced_peak(sd, resolution, batch_size, prefixes[k])
        if fits(peak):
            return plan_for(costs, prefixes[k], peak, budget)
        k += 1
    raise refusal(sd, resolution, batch_size, budget)


def traced_peak(sd, resolution: int, batch_size: int, recompute: frozenset[int]) -> int:
    """estimate_step_bytes, remembered: the CLI plans before loading, the trainer again after."""
    key = (_shape_key(sd, resolution, batch_size), recompute)
    if key not in _TRACED:
        _TRACED[key] = estimate_step_bytes(sd, resolution, batch_size, recompute=recompute)
    return _TRACED[key]


_TRACED: dict[tuple, int] = {}


def refusal(sd, resolution: int, batch_size: int, budget: int) -> UserError:
    """Even `low` does not fit: the numbers, and what would (a smaller resolution, 8-bit weights)."""
    costs = attributed_costs(sd, resolution, batch_size)
    low = traced_peak(sd, resolution, batch_size, frozenset(range(costs.n_blocks)))
    message = (f"even --memory low does not fit: one training step at {resolution}px needs "
               f"{need_bytes(low, costs.weights) / GiB:.2f} GiB (modelled peak {low / GiB:.2f} GiB, of which weights "
               f"{costs.weights / GiB:.2f} GiB, x{MARGIN} on the activations + {RESERVE / 2**20:.0f} MiB workspaces) "
               f"but {budget / GiB:.2f} GiB is free")
    smaller = _largest_resolution_that_fits(sd, resolution, batch_size, budget)
    levers = [f"--resolution {smaller}"] if smaller else []
    levers.append("8-bit weights (`--weights fp8`, coming) to halve the weights")
    return UserError(f"{message}: try {' or '.join(levers)}, or free GPU memory")


def _largest_resolution_that_fits(sd, resolution: int, batch_size: int, budget: int) -> int | None:
    """A smaller resolution whose `low` step fits: the activations scale with the pixel count (flash
    attention keeps them linear in it), so start from that estimate and confirm it with a trace,
    stepping down in the UNet's multiple at most twice."""
    costs = attributed_costs(sd, resolution, batch_size)
    every_block = frozenset(range(costs.n_blocks))
    multiple = 8 * 2 ** (len(sd.unet.cfg.channel_mult) - 1)
    activations = costs.peak(every_block) - costs.weights
    room = (budget - RESERVE - costs.weights) / MARGIN
    guess = int(resolution * (max(room, 0) / activations) ** 0.5) // multiple * multiple
    for r in range(min(guess, resolution - multiple), 0, -multiple)[:3]:
        if need_bytes(traced_peak(sd, r, batch_size, every_block), costs.weights) <= budget:
            return r
    return None


def apply(sd, mode: str, resolution: int, batch_size: int, vram_gib: float | None = None) -> Plan:
    """Set sd.unet.recompute for `mode` and return the plan. auto plans against `vram_gib`, else
    the free CUDA memory (plus what sd's weights already hold there); on the CPU it is fast."""
    if mode not in MODES:
        raise ValueError(f"memory mode must be one of {MODES}, got {mode!r}")
    n_blocks = len(sd.unet.blocks)
    budget = budget_bytes(sd, vram_gib)
    if mode == "auto" and budget is not None:
        plan = choose(sd, resolution, batch_size, budget)
    else:
        recompute = frozenset(range(n_blocks)) if mode == "low" else frozenset()
        if budget is None:  # nothing to plan against: skip the trace
            plan = Plan(recompute, n_blocks, None, 0, 0)
        else:
            plan = plan_for(attributed_costs(sd, resolution, batch_size), recompute, budget=budget)
    sd.unet.recompute = plan.recompute
    return plan


def budget_bytes(sd, vram_gib: float | None) -> int | None:
    """Bytes a training step may use: --vram, else the free CUDA memory plus what sd's networks
    already take there (the plan's peak counts them); None on the CPU."""
    if vram_gib is not None:
        return int(vram_gib * GiB)
    if sd.device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(sd.device)
    modules = [m for m in (sd.unet, sd.vae, *sd.text_encoders) if m is not None]
    held = sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()]
               if t.device.type == "cuda")
    return free + held
