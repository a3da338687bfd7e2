"""The one mapping table between diffusers-folder key names and single-file key names.

minti's modules use single-file names; a diffusers folder is converted on load with
`to_single_file(component, state_dict)`. Each component has its own section below.
"""
from __future__ import annotations

import torch

# ---- unet -------------------------------------------------------------------------------
# def unet_from_diffusers(sd: dict, **kw) -> dict   (filled by the UNet work)

# ---- vae --------------------------------------------------------------------------------
# def vae_from_diffusers(sd: dict, **kw) -> dict   (filled by the VAE work)

# ---- text encoders ------------------------------------------------------------------------
# def text_encoder_from_diffusers(sd: dict, layout: str, **kw) -> dict   (filled by the text-encoder work;
# layout 'hf' for CLIP-L, 'openclip' for SD2's text_encoder / SDXL's text_encoder_2)


def to_single_file(component: str, state_dict: dict[str, torch.Tensor], **kw) -> dict[str, torch.Tensor]:
    """Rename a diffusers component's state dict ("unet", "vae", "text_encoder",
    "text_encoder_2") to minti's module names (single-file names without the prefix)."""
    if component == "unet":
        return unet_from_diffusers(state_dict, **kw)
    if component == "vae":
        return vae_from_diffusers(state_dict, **kw)
    if component in ("text_encoder", "text_encoder_2"):
        return text_encoder_from_diffusers(state_dict, **kw)
    raise ValueError(f"unknown diffusers component {component!r}")
