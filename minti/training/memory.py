"""Memory plans for the training step: how much to recompute instead of store.

    fast  store every activation the backward needs (frozen convs still keep no input)
    low   checkpoint each UNet block: keep only block inputs, recompute the inside in backward
          (+1 UNet forward per step, about +30% step time)
    auto  fast if its modelled peak fits in the free GPU memory with a margin, else low;
          on the CPU (memory is plentiful, time is not) always fast
"""
from __future__ import annotations

import torch

MODES = ("auto", "low", "fast")
MARGIN = 1.15  # allocator fragmentation and workspaces on top of the modelled peak


def apply(sd, mode: str, resolution: int, batch_size: int) -> str:
    """Set sd's models up for `mode`; returns the plan actually used ("fast" or "low")."""
    if mode not in MODES:
        raise ValueError(f"memory mode must be one of {MODES}, got {mode!r}")
    plan = mode if mode != "auto" else _choose(sd, resolution, batch_size)
    sd.unet.checkpointing = plan == "low"
    return plan


def _choose(sd, resolution: int, batch_size: int) -> str:
    if sd.device.type != "cuda":
        return "fast"
    free, _total = torch.cuda.mem_get_info(sd.device)  # the weights are already loaded
    need = estimate_step_bytes(sd, resolution, batch_size, checkpointing=False) - _weight_bytes(sd)
    return "fast" if need * MARGIN <= free else "low"


def _weight_bytes(sd) -> int:
    modules = [sd.unet, *sd.text_encoders]
    return sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])


def estimate_step_bytes(sd, resolution: int, batch_size: int, checkpointing: bool) -> int:
    """Peak bytes of one training step of this model, traced on the meta device (seconds): the
    text encoders, then the trainer's objective (minti.diffusion.diffusion_loss) and its backward."""
    from minti.diffusion import diffusion_loss
    from minti.loading.pipeline import random_model
    from minti.training.memtrace import MemoryTracer

    meta = random_model(sd.family, sd.dtype, "meta", prediction=sd.prediction)
    meta.unet.checkpointing = checkpointing
    dims = meta.embedding_dims
    with torch.device("meta"):
        vectors = [torch.zeros(1, d, requires_grad=True) for d in dims]
        latents = torch.zeros(batch_size, 4, resolution // 8, resolution // 8, dtype=sd.dtype)
    meta.add_placeholder("<estimate>", 1)
    tokens = meta.tokenize(["a photo of <estimate>"] * batch_size)
    with MemoryTracer([meta.unet, *meta.text_encoders], extra=[*vectors, latents]) as tracer:
        tokens = [t.to("meta") for t in tokens]
        context, pooled = meta.encode_tokens(tokens, vectors)
        y = (meta.sdxl_vector(pooled, original_size=(resolution, resolution), target_size=(resolution, resolution))
             if meta.family == "sdxl" else None)
        noise = torch.zeros(latents.shape, device="meta")
        t = torch.zeros(batch_size, dtype=torch.long, device="meta")
        diffusion_loss(meta.unet, latents, noise, t, context, y, prediction=meta.prediction).backward()
    return tracer.peak_bytes
