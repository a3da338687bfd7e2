"""Count the bytes a training step keeps alive, without a GPU.

Run the real-size models on the `meta` device (tensors with shapes and dtypes but no data)
under `MemoryTracer`: every tensor an op creates is recorded with its storage size, and a
storage counts until nothing references it any more — the same lifetime the CUDA caching
allocator sees. The largest total over the step is the modelled peak, which is what
`torch.cuda.max_memory_allocated` reports on a GPU, minus allocator rounding and
workspace buffers (cuBLAS, cuDNN), which are small at batch 1.

    with MemoryTracer(models) as tracer:
        loss = step()
        loss.backward()
    tracer.peak_bytes, tracer.peak_breakdown()
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


@dataclass
class _Live:
    ref: StorageWeakRef
    nbytes: int
    label: str


@dataclass
class MemoryTracer(TorchDispatchMode):
    """Tracks live tensor storages while active. `modules` are scanned for their weights
    and buffers at entry, so the peak includes them (they exist before the step)."""

    modules: list[torch.nn.Module] = field(default_factory=list)
    extra: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__()
        self.live: dict[int, _Live] = {}
        self.current_bytes = 0
        self.peak_bytes = 0
        self._peak_snapshot: list[_Live] = []
        self.peak_at = "-"  # the op (module path : op) whose output made the peak
        self._scope: list[str] = []
        self._hooks: list = []

    # -- bookkeeping -----------------------------------------------------------------------
    def track(self, t: torch.Tensor, label: str) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.live and not self.live[key].ref.expired():
            return
        nbytes = storage.nbytes()
        self.live[key] = _Live(StorageWeakRef(storage), nbytes, label)
        self.current_bytes += nbytes

    def _sweep(self) -> None:
        dead = [k for k, v in self.live.items() if v.ref.expired()]
        for k in dead:
            self.current_bytes -= self.live.pop(k).nbytes

    def _observe(self, where: str) -> None:
        if self.current_bytes > self.peak_bytes:
            self.peak_bytes = self.current_bytes
            self._peak_snapshot = list(self.live.values())
            self.peak_at = where

    def peak_breakdown(self, top: int = 15) -> list[tuple[str, int]]:
        """Which tensors were alive at the peak, grouped by label (module path : op)."""
        by_label: Counter[str] = Counter()
        for item in self._peak_snapshot:
            by_label[item.label] += item.nbytes
        return by_label.most_common(top)

    # -- module scopes, so a tensor is labelled with the layer that made it -------------------
    def _push(self, name: str):
        def hook(_module, _inputs):
            self._scope.append(name)
        return hook

    def _pop(self, _module, _inputs, _output):
        if self._scope:
            self._scope.pop()

    def __enter__(self):
        for root in self.modules:
            for t in list(root.parameters()) + list(root.buffers()):
                self.track(t, "weights")
            for name, m in root.named_modules():
                self._hooks.append(m.register_forward_pre_hook(self._push(name or type(root).__name__)))
                self._hooks.append(m.register_forward_hook(self._pop))
        for t in self.extra:
            self.track(t, "inputs")
        self._observe("start")
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        node = torch._C._current_autograd_node()  # set while autograd runs a backward function
        scope = self._scope[-1] if self._scope else (f"backward[{node.name()}]" if node else "-")
        label = f"{scope}:{func.__name__.split('.')[0]}"
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t, label)
        self._sweep()
        self._observe(label)
        return out
