"""CLIP text encoders, written from scratch: CLIP-L in the transformers layout (SD 1.x,
SDXL's first encoder) and the OpenCLIP layout (ViT-H for SD 2.x, bigG for SDXL).

Attribute names mirror the single-file keys (under `cond_stage_model.transformer.` /
`cond_stage_model.model.` / `conditioner.embedders.N.…`).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TextEncoderConfig:
    layout: str = "hf"  # "hf" (transformers CLIPTextModel names) | "openclip"
    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12
    max_length: int = 77
    activation: str = "quick_gelu"  # CLIP-L; OpenCLIP ViT-H / bigG use "gelu"
    projection_dim: int | None = None  # OpenCLIP text_projection output width (pooled output)
    layer: str = "last"  # which hidden state conditions the UNet: "last" | "penultimate"
    final_norm: bool = True  # apply the final LayerNorm to that hidden state
    pad_token_id: int = 49407  # CLIP-L pads with EOS, the OpenCLIP towers with 0


CLIP_L_SD1 = TextEncoderConfig()
OPENCLIP_H_SD2 = TextEncoderConfig(layout="openclip", width=1024, layers=24, heads=16, activation="gelu",
                                   projection_dim=1024, layer="penultimate", final_norm=True, pad_token_id=0)
CLIP_L_SDXL = TextEncoderConfig(layer="penultimate", final_norm=False)
OPENCLIP_BIGG_SDXL = TextEncoderConfig(layout="openclip", width=1280, layers=32, heads=20, activation="gelu",
                                       projection_dim=1280, layer="penultimate", final_norm=False, pad_token_id=0)
