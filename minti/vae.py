"""The Stable Diffusion VAE (AutoencoderKL), written from scratch.

Attribute names mirror the single-file keys under `first_stage_model.`.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class VAEConfig:
    in_channels: int = 3
    z_channels: int = 4
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    norm_groups: int = 32
    scaling_factor: float = 0.18215  # SDXL: 0.13025


SD = VAEConfig()
SDXL = VAEConfig(scaling_factor=0.13025)
