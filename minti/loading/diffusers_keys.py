"""The one mapping table between diffusers-folder key names and single-file key names.

minti's modules use single-file names; a diffusers folder is converted on load with
`to_single_file(component, state_dict)`. Each component has its own section below.
"""
from __future__ import annotations

import re

import torch

# ---- unet -------------------------------------------------------------------------------
# Inside a ResBlock (diffusers "resnets.N"): LDM keeps the Sequential indices of
# GroupNorm, SiLU, conv (in_layers), SiLU, Linear (emb_layers), GroupNorm, SiLU, Dropout, conv.
# Transformer internals (norm, proj_in, transformer_blocks...) already share their names.
_UNET_RESNET_RULES = [
    (r"(resnets\.\d+\.)norm1\.", r"\1in_layers.0."),
    (r"(resnets\.\d+\.)conv1\.", r"\1in_layers.2."),
    (r"(resnets\.\d+\.)time_emb_proj\.", r"\1emb_layers.1."),
    (r"(resnets\.\d+\.)norm2\.", r"\1out_layers.0."),
    (r"(resnets\.\d+\.)conv2\.", r"\1out_layers.3."),
    (r"(resnets\.\d+\.)conv_shortcut\.", r"\1skip_connection."),
]
_UNET_FIXED_RULES = [
    (r"^time_embedding\.linear_1\.", "time_embed.0."),
    (r"^time_embedding\.linear_2\.", "time_embed.2."),
    (r"^add_embedding\.linear_1\.", "label_emb.0.0."),  # SDXL
    (r"^add_embedding\.linear_2\.", "label_emb.0.2."),
    (r"^conv_in\.", "input_blocks.0.0."),
    (r"^conv_norm_out\.", "out.0."),
    (r"^conv_out\.", "out.2."),
    (r"^mid_block\.resnets\.(\d+)\.", lambda m: f"middle_block.{2 * int(m[1])}."),
    (r"^mid_block\.attentions\.0\.", "middle_block.1."),
]
_UNET_SINGLE_FILE_ROOTS = ("time_embed.", "label_emb.", "input_blocks.", "middle_block.", "output_blocks.", "out.")


def unet_from_diffusers(sd: dict, **kw) -> dict:
    """Rename a diffusers UNet2DConditionModel state dict to single-file names (SD 1/2/XL).

    Diffusers numbers blocks per level (down_blocks.L.resnets.J); LDM numbers them flat
    (input_blocks.I.0), each level holding n ResBlocks plus one Downsample (n + 1 going up,
    where the extra ResBlock eats the Downsample's skip). n is read from the keys, and so is
    whether an up level has attention, which moves its Upsample from slot .1 to .2.
    """
    n = 1 + max(int(m[1]) for k in sd if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k)))
    up_with_attention = {int(m[1]) for k in sd if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    rules = _UNET_RESNET_RULES + _UNET_FIXED_RULES + [
        (r"^down_blocks\.(\d+)\.resnets\.(\d+)\.",
         lambda m: f"input_blocks.{1 + int(m[1]) * (n + 1) + int(m[2])}.0."),
        (r"^down_blocks\.(\d+)\.attentions\.(\d+)\.",
         lambda m: f"input_blocks.{1 + int(m[1]) * (n + 1) + int(m[2])}.1."),
        (r"^down_blocks\.(\d+)\.downsamplers\.0\.conv\.",
         lambda m: f"input_blocks.{(int(m[1]) + 1) * (n + 1)}.0.op."),
        (r"^up_blocks\.(\d+)\.resnets\.(\d+)\.",
         lambda m: f"output_blocks.{int(m[1]) * (n + 1) + int(m[2])}.0."),
        (r"^up_blocks\.(\d+)\.attentions\.(\d+)\.",
         lambda m: f"output_blocks.{int(m[1]) * (n + 1) + int(m[2])}.1."),
        (r"^up_blocks\.(\d+)\.upsamplers\.0\.",
         lambda m: f"output_blocks.{int(m[1]) * (n + 1) + n}.{2 if int(m[1]) in up_with_attention else 1}."),
    ]
    out = {}
    for key, value in sd.items():
        new = key
        for pattern, repl in rules:
            new = re.sub(pattern, repl, new)
        if not new.startswith(_UNET_SINGLE_FILE_ROOTS):
            raise ValueError(f"unet_from_diffusers: no rule for diffusers key {key!r}")
        out[new] = value
    return out


# ---- vae --------------------------------------------------------------------------------
# (pattern, replacement) applied in order to every key. Both diffusers generations are
# covered: current attention names (to_q/to_k/to_v/to_out.0) and the 2022-era ones
# (query/key/value/proj_attn). decoder.up_blocks is handled separately (index reversal).
_VAE_RULES = [
    (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.mid.attn_1."),
    (r"\.attn_1\.group_norm\.", ".attn_1.norm."),
    (r"\.attn_1\.(?:to_q|query)\.", ".attn_1.q."),
    (r"\.attn_1\.(?:to_k|key)\.", ".attn_1.k."),
    (r"\.attn_1\.(?:to_v|value)\.", ".attn_1.v."),
    (r"\.attn_1\.(?:to_out\.0|proj_attn)\.", ".attn_1.proj_out."),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
    (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
]
_VAE_UP = re.compile(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.")
_VAE_LINEAR_ATTN = re.compile(r"\.attn_1\.(q|k|v|proj_out)\.weight$")


def vae_from_diffusers(sd: dict, **kw) -> dict:
    """diffusers AutoencoderKL state dict -> single-file names (without `first_stage_model.`).

    diffusers stores the attention projections as Linear [C,C]; LDM as 1x1 convs [C,C,1,1],
    so those are reshaped (a view, no copy). diffusers lists decoder.up_blocks from the
    deepest level up, LDM's decoder.up.N by resolution: up_blocks.i is up.(n-1-i)."""
    n_up = len({m.group(1) for k in sd if (m := _VAE_UP.match(k))})

    def up(m: re.Match) -> str:
        part = "block" if m.group(2) == "resnets" else "upsample"
        return f"decoder.up.{n_up - 1 - int(m.group(1))}.{part}."

    out = {}
    for key, t in sd.items():
        new = _VAE_UP.sub(up, key)
        for pattern, repl in _VAE_RULES:
            new = re.sub(pattern, repl, new)
        if _VAE_LINEAR_ATTN.search(new) and t.ndim == 2:
            t = t.reshape(*t.shape, 1, 1)
        if new in out:
            raise ValueError(f"two diffusers VAE keys map to {new!r} (mixed old and new attention names?)")
        out[new] = t
    return out

# ---- text encoders ------------------------------------------------------------------------
# diffusers stores every text encoder as a transformers CLIPTextModel(WithProjection). For CLIP-L
# those are already the single-file names; the OpenCLIP towers (SD 2.x text_encoder, SDXL
# text_encoder_2) are renamed piece by piece, with q/k/v fused into nn.MultiheadAttention's
# in_proj. Applied in order to each key (after the `text_model.` prefix is dropped).
_OPENCLIP_RENAMES = [
    ("embeddings.token_embedding.weight", "token_embedding.weight"),
    ("embeddings.position_embedding.weight", "positional_embedding"),
    ("final_layer_norm.", "ln_final."),
    ("encoder.layers.", "transformer.resblocks."),
    (".self_attn.out_proj.", ".attn.out_proj."),
    (".layer_norm1.", ".ln_1."),
    (".layer_norm2.", ".ln_2."),
    (".mlp.fc1.", ".mlp.c_fc."),
    (".mlp.fc2.", ".mlp.c_proj."),
]


def text_encoder_from_diffusers(state_dict: dict[str, torch.Tensor], layout: str, **kw) -> dict[str, torch.Tensor]:
    """A diffusers text_encoder / text_encoder_2 state dict -> minti's names for `layout`
    ("hf": CLIP-L, "openclip": ViT-H / bigG).

    What the OpenCLIP result lacks compared with a single file: `logit_scale` (never exported;
    OpenCLIPTextModel fills a default on load, it is unused) and, for SD 2.x, `text_projection`
    and the 24th block (diffusers exports only the 23 blocks SD 2.x uses, as a plain
    CLIPTextModel). Its final_layer_norm becomes ln_final, which SD 2.x applies to its output.
    """
    # transformers >= 5 saves CLIPTextModel without the `text_model.` prefix; older folders and
    # CLIPTextModelWithProjection (SDXL text_encoder_2) have it
    sd = {k.removeprefix("text_model."): v for k, v in state_dict.items()}
    if layout == "hf":
        return {"text_model." + k: v for k, v in sd.items()}  # position_ids may be absent: the module fills it
    if layout != "openclip":
        raise ValueError(f"unknown text encoder layout {layout!r}: use 'hf' or 'openclip'")
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key == "embeddings.position_ids":  # OpenCLIP has no such buffer
            continue
        if key == "text_projection.weight":  # nn.Linear [out, in] -> OpenCLIP's x @ P with P [in, out]
            out["text_projection"] = value.t().contiguous()
            continue
        if ".self_attn.q_proj." in key:
            block, kind = key.split(".self_attn.q_proj.")
            parts = [sd[f"{block}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{block.replace('encoder.layers.', 'transformer.resblocks.')}.attn.in_proj_{kind}"] = torch.cat(parts)
            continue
        if ".self_attn.k_proj." in key or ".self_attn.v_proj." in key:  # fused with q above
            continue
        new = key
        for old, rep in _OPENCLIP_RENAMES:
            new = new.replace(old, rep)
        if new == key:
            raise ValueError(f"unexpected key {key!r} in an OpenCLIP-layout diffusers text encoder")
        out[new] = value
    return out


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
