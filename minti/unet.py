"""The Stable Diffusion UNet (SD 1.x, 2.x, XL), written from scratch.

Attribute names mirror the single-file checkpoint keys under `model.diffusion_model.`,
so a state dict loads by name. Attention, GroupNorm+SiLU and GEGLU go through minti.ops.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)  # per level; 0 = no attention there
    transformer_depth_middle: int = 1
    num_heads: int = 8  # SD 1.x: fixed head count (head dim varies 40/80/160)
    head_dim: int | None = None  # SD 2.x and XL: fixed head dim 64 (overrides num_heads)
    context_dim: int = 768
    use_linear_proj: bool = False  # SD 1.x: 1x1 conv proj_in/out; SD 2.x/XL: linear
    adm_in_channels: int | None = None  # SDXL: 2816 (pooled text 1280 + 6 size/crop embeddings x 256)
    upcast_attention: bool = False  # SD 2.x: attention scores in fp32 under half precision
    norm_groups: int = 32


SD1 = UNetConfig()
SD2 = UNetConfig(head_dim=64, context_dim=1024, use_linear_proj=True, upcast_attention=True)
SDXL = UNetConfig(channel_mult=(1, 2, 4), transformer_depth=(0, 2, 10), transformer_depth_middle=10,
                  head_dim=64, context_dim=2048, use_linear_proj=True, adm_in_channels=2816)
