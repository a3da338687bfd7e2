"""The real checkpoint layouts (copied from shared/checkpoint-layouts so tests run anywhere).

read_layout("sd15") -> {key: shape}; with prefix="model.diffusion_model." only those keys,
prefix removed. For the diffusers manifest, keys are "component<TAB>key" -> use component=.
"""
from __future__ import annotations

from pathlib import Path

LAYOUTS = Path(__file__).parent / "layouts"


def read_layout(name: str, prefix: str = "", component: str | None = None) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for line in (LAYOUTS / f"{name}.tsv").read_text().splitlines():
        if not line.strip():
            continue
        cols = line.split("\t")
        if component is not None:
            comp, key, shape = cols
            if comp != component:
                continue
        else:
            key, shape = cols[0], cols[1]
        if not key.startswith(prefix):
            continue
        out[key[len(prefix):]] = tuple(int(s) for s in shape.split(",")) if shape else ()
    return out
