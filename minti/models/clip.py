"""CLIP text encoders, written from scratch: CLIP-L in the transformers layout (SD 1.x,
SDXL's first encoder) and the OpenCLIP layout (ViT-H for SD 2.x, bigG for SDXL).

Attribute names mirror the single-file keys (under `cond_stage_model.transformer.` /
`cond_stage_model.model.` / `conditioner.embedders.N.…`), so a stripped state dict loads with
strict=True and a model built on the meta device has exactly the checkpoint's keys and shapes.

Both towers are the same pre-LayerNorm causal transformer; they differ in names, in the MLP
activation (quick_gelu vs gelu), in OpenCLIP's fused q/k/v projection, and in OpenCLIP's pooled
output (ln_final at the EOS token, times text_projection) that SDXL feeds to its UNet.

Textual inversion: token ids >= vocab_size are placeholders whose input vectors come from
`extra_embeddings`; the (frozen) token table is only indexed, never copied or differentiated.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minti.models import ops


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
    eos_token_id: int = 49407  # the pooled output is read at the first EOS
    mlp_width: int | None = None  # None: 4 * width (true of every CLIP text tower)
    pooled: bool = True  # compute the pooled projection when the tower has one (SDXL's bigG needs it)

    @property
    def hidden(self) -> int:
        return self.mlp_width or 4 * self.width

    @classmethod
    def from_state_dict(cls, shapes: dict, layout: str) -> TextEncoderConfig:
        """What the key names and shapes of a stripped state dict (minti's names, i.e. after
        text_encoder_from_diffusers for a diffusers folder) determine: vocabulary, width, depth,
        length, MLP width and projection. `shapes` maps keys to shapes or tensors. Heads,
        activation, padding and which hidden state conditions the UNet keep their defaults: the
        family table (minti.loading.families) sets them."""
        shape = {k: tuple(v.shape) if hasattr(v, "shape") else tuple(v) for k, v in shapes.items()}
        if layout == "hf":
            p = "text_model."
            vocab, width = shape[p + "embeddings.token_embedding.weight"]
            max_length = shape[p + "embeddings.position_embedding.weight"][0]
            block = re.compile(r"text_model\.encoder\.layers\.(\d+)\.")
            mlp_width = shape[p + "encoder.layers.0.mlp.fc1.weight"][0]
            projection_dim = None
        elif layout == "openclip":
            vocab, width = shape["token_embedding.weight"]
            max_length = shape["positional_embedding"][0]
            block = re.compile(r"transformer\.resblocks\.(\d+)\.")
            mlp_width = shape["transformer.resblocks.0.mlp.c_fc.weight"][0]
            projection_dim = shape["text_projection"][1] if "text_projection" in shape else None
        else:
            raise ValueError(f"unknown text encoder layout {layout!r}: use 'hf' or 'openclip'")
        layers = 1 + max(int(m.group(1)) for k in shape if (m := block.match(k)))
        return cls(layout=layout, vocab_size=vocab, width=width, layers=layers, max_length=max_length,
                   projection_dim=projection_dim, mlp_width=None if mlp_width == 4 * width else mlp_width)


# The real-size towers, one per text encoder of each family (minti.loading.families refers to them).
CLIP_L_SD1 = TextEncoderConfig()
OPENCLIP_H_SD2 = TextEncoderConfig(layout="openclip", width=1024, layers=24, heads=16, activation="gelu",
                                   projection_dim=1024, layer="penultimate", final_norm=True, pad_token_id=0,
                                   pooled=False)  # SD 2.x never uses it: skip the last block
CLIP_L_SDXL = TextEncoderConfig(layer="penultimate", final_norm=False)
OPENCLIP_BIGG_SDXL = TextEncoderConfig(layout="openclip", width=1280, layers=32, heads=20, activation="gelu",
                                       projection_dim=1280, layer="penultimate", final_norm=False, pad_token_id=0)


# ---- shared pieces -----------------------------------------------------------------------

def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU; CLIP-L was trained with it."""
    return x * torch.sigmoid(1.702 * x)


def _activation(name: str):
    if name == "quick_gelu":
        return quick_gelu
    if name == "gelu":
        return F.gelu
    raise ValueError(f"unknown activation {name!r}")


def _table(rows: int, width: int) -> nn.Embedding:
    """An embedding table the checkpoint fills, without nn.Embedding's random init: the models
    are built on the meta device, where the first normal_ imports torch's Python refs (seconds)."""
    return nn.Embedding(rows, width, _weight=torch.empty(rows, width))


def embed_tokens(table: nn.Embedding, tokens: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
    """Token vectors [B,L,width]; ids >= table size take row id - size of `extra`.

    clamp + lookup + where: the 49408-row table is indexed, never cloned, and the gradient of a
    placeholder position goes to `extra` only (where() sends zero to the clamped table row).
    """
    vocab = table.num_embeddings
    x = table(tokens.clamp(max=vocab - 1))
    if tokens.is_meta:  # shapes only (memory tracing): no values to check
        if extra is None:
            return x
        vectors = extra[(tokens - vocab).clamp(min=0, max=extra.shape[0] - 1)].to(x.dtype)
        return torch.where((tokens >= vocab).unsqueeze(-1), vectors, x)
    # one host sync per prompt batch: an id past the end would otherwise be a device-side assert
    top = int(tokens.max())
    if top < vocab:
        return x
    n_extra = 0 if extra is None else extra.shape[0]
    if top >= vocab + n_extra:
        raise ValueError(f"token id {top} needs extra_embeddings with {top - vocab + 1} rows, got {n_extra}")
    vectors = extra[(tokens - vocab).clamp(min=0)].to(x.dtype)
    return torch.where((tokens >= vocab).unsqueeze(-1), vectors, x)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, H*D] -> a [B, H, N, D] view, the layout ops.attention takes."""
    B, N, C = x.shape
    return x.view(B, N, heads, C // heads).transpose(1, 2)  # [B,H,N,D]


def merge_heads(y: torch.Tensor) -> torch.Tensor:
    """[B, H, N, D] -> [B, N, H*D]: a view when y is token-major, as ops.attention returns it."""
    B, H, N, D = y.shape
    return y.transpose(1, 2).reshape(B, N, H * D)


def eos_positions(tokens: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Index of the first EOS in each row. CLIP pools at argmax(tokens) because EOS is the
    largest id, but placeholder ids are larger still; argmax stays the fallback for rows without
    an EOS."""
    is_eos = tokens == eos_token_id
    return torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), tokens.argmax(dim=1))


# per layout, one block's (first norm, attention, second norm, MLP, MLP in, MLP out) key names
BLOCK_NAMES = {"hf": ("layer_norm1", "self_attn", "layer_norm2", "mlp", "fc1", "fc2"),
               "openclip": ("ln_1", "attn", "ln_2", "mlp", "c_fc", "c_proj")}


class MLP(nn.Module):
    """Linear, activation, linear. The two linears are registered under the tower's checkpoint
    names: CLIP-L's fc1/fc2, OpenCLIP's c_fc/c_proj."""

    def __init__(self, cfg: TextEncoderConfig, names: tuple[str, str]):
        super().__init__()
        self.names = names
        self.add_module(names[0], nn.Linear(cfg.width, cfg.hidden))
        self.add_module(names[1], nn.Linear(cfg.hidden, cfg.width))
        self.act = _activation(cfg.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, down = (getattr(self, name) for name in self.names)
        return down(self.act(up(x)))


class ResidualBlock(nn.Module):
    """The pre-LayerNorm transformer block of both towers: x + attn(norm(x)), then
    x + mlp(norm(x)). Its parts are registered under the tower's checkpoint names (BLOCK_NAMES)."""

    def __init__(self, cfg: TextEncoderConfig, attention: nn.Module):
        super().__init__()
        norm1, attn, norm2, mlp, *mlp_names = self.names = BLOCK_NAMES[cfg.layout]
        self.add_module(norm1, nn.LayerNorm(cfg.width))
        self.add_module(attn, attention)
        self.add_module(norm2, nn.LayerNorm(cfg.width))
        self.add_module(mlp, MLP(cfg, tuple(mlp_names)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm1, attn, norm2, mlp = (getattr(self, name) for name in self.names[:4])
        x = x + attn(norm1(x))
        return x + mlp(norm2(x))


# ---- CLIP-L, transformers layout -------------------------------------------------------------

class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.token_embedding = _table(cfg.vocab_size, cfg.width)
        self.position_embedding = _table(cfg.max_length, cfg.width)
        # Kept only so keys round-trip with real files (SD 1.x and SDXL store it). The forward
        # uses positions 0..L-1 directly: merged checkpoints often store this buffer as float,
        # some with values like 76.9999 that truncate to the wrong position.
        self.register_buffer("position_ids", torch.arange(cfg.max_length).unsqueeze(0), persistent=True)
        self.register_load_state_dict_pre_hook(CLIPEmbeddings._fix_position_ids)

    @staticmethod
    def _fix_position_ids(module, state_dict, prefix, *args) -> None:
        """Files may lack the buffer, store it as float (cast to the load dtype on the way) or
        without its batch dimension: whatever they hold becomes int64 [1, max_length]."""
        key = prefix + "position_ids"
        ids = state_dict.get(key)
        if ids is None:  # new transformers / diffusers exports drop it: it is just 0..L-1
            like = state_dict.get(prefix + "position_embedding.weight")
            device = like.device if like is not None else module.position_ids.device
            ids = torch.arange(module.position_embedding.num_embeddings, device=device)
        elif ids.is_floating_point():
            ids = ids.float().round()
        state_dict[key] = ids.long().reshape(1, -1)

    def forward(self, tokens: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
        return embed_tokens(self.token_embedding, tokens, extra) + self.position_embedding.weight[:tokens.shape[1]]


class CLIPAttention(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(proj(x), self.heads) for proj in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(merge_heads(ops.attention(q, k, v, causal=True)))


class CLIPTextModel(nn.Module):
    """CLIP-L text tower; keys `text_model.embeddings.…`, `text_model.encoder.layers.N.…`,
    `text_model.final_layer_norm.…`. Returns (hidden [B,L,width], None): SD never uses its pooled."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        assert cfg.layout == "hf", cfg.layout
        self.cfg = cfg
        self.text_model = nn.ModuleDict(dict(
            embeddings=CLIPEmbeddings(cfg),
            encoder=nn.ModuleDict(dict(layers=nn.ModuleList(
                ResidualBlock(cfg, CLIPAttention(cfg)) for _ in range(cfg.layers)))),
            final_layer_norm=nn.LayerNorm(cfg.width),
        ))

    def forward(self, tokens: torch.Tensor, extra_embeddings: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        tm = self.text_model
        x = tm.embeddings(tokens, extra_embeddings)
        layers = tm.encoder.layers
        for layer in layers[:-1]:
            x = layer(x)
        if self.cfg.layer == "last":  # the penultimate state needs no last layer
            x = layers[-1](x)
        elif self.cfg.layer != "penultimate":
            raise ValueError(f"unknown layer {self.cfg.layer!r}: use 'last' or 'penultimate'")
        return (tm.final_layer_norm(x) if self.cfg.final_norm else x), None


# ---- OpenCLIP layout (ViT-H, bigG) -----------------------------------------------------------

class FusedSelfAttention(nn.Module):
    """nn.MultiheadAttention's parameter names (in_proj_weight = q, k, v stacked on dim 0).

    The fused parameter is kept as it is stored rather than split into q/k/v behind load and
    save hooks: one matmul instead of three, and keys round-trip with no layout quirk at all.
    The diffusers (transformers-named) export is fused once, in text_encoder_from_diffusers.
    """

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.heads = cfg.heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * cfg.width, cfg.width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * cfg.width))
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (split_heads(t, self.heads) for t in (q, k, v))
        return self.out_proj(merge_heads(ops.attention(q, k, v, causal=True)))


class OpenCLIPTextModel(nn.Module):
    """OpenCLIP text tower; keys `token_embedding.weight`, `positional_embedding`,
    `transformer.resblocks.N.…`, `ln_final.…`, `text_projection` (when cfg.projection_dim),
    `logit_scale`. Returns (hidden [B,L,width], pooled [B,projection_dim] or None)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        assert cfg.layout == "openclip", cfg.layout
        self.cfg = cfg
        self.token_embedding = _table(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.max_length, cfg.width))
        self.transformer = nn.ModuleDict(dict(resblocks=nn.ModuleList(
            ResidualBlock(cfg, FusedSelfAttention(cfg)) for _ in range(cfg.layers))))
        self.ln_final = nn.LayerNorm(cfg.width)
        # A diffusers SD 2.x text_encoder is a plain CLIPTextModel: no projection, so the config
        # built from it has projection_dim None and no pooled output (SD 2.x does not use one).
        self.text_projection = (nn.Parameter(torch.empty(cfg.width, cfg.projection_dim))
                                if cfg.projection_dim else None)
        # CLIP's image-text temperature: unused for text, kept because single files store it.
        self.logit_scale = nn.Parameter(torch.empty(()))
        self.register_load_state_dict_pre_hook(OpenCLIPTextModel._default_logit_scale)

    @staticmethod
    def _default_logit_scale(module, state_dict, prefix, *args) -> None:
        # diffusers exports lack it; fill open_clip's initial value (beside the other weights, in
        # their dtype) so strict loading works
        if prefix + "logit_scale" not in state_dict:
            like = state_dict.get(prefix + "token_embedding.weight", module.logit_scale)
            state_dict[prefix + "logit_scale"] = torch.full((), math.log(1 / 0.07), dtype=like.dtype,
                                                            device=like.device)

    def forward(self, tokens: torch.Tensor, extra_embeddings: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.cfg.layer not in ("last", "penultimate"):
            raise ValueError(f"unknown layer {self.cfg.layer!r}: use 'last' or 'penultimate'")
        x = embed_tokens(self.token_embedding, tokens, extra_embeddings) + self.positional_embedding[:tokens.shape[1]]
        blocks = self.transformer.resblocks
        for block in blocks[:-1]:
            x = block(x)
        penultimate = x
        pooled = None
        # the last block runs only when its output is used: SD 2.x skips it, SDXL needs it to pool
        want_pooled = self.text_projection is not None and self.cfg.pooled
        if self.cfg.layer == "last" or want_pooled:
            x = blocks[-1](x)
            if want_pooled:
                eos = eos_positions(tokens, self.cfg.eos_token_id)
                pooled = self.ln_final(x[torch.arange(x.shape[0], device=x.device), eos]) @ self.text_projection
        hidden = x if self.cfg.layer == "last" else penultimate
        return (self.ln_final(hidden) if self.cfg.final_norm else hidden), pooled


def build_text_encoder(cfg: TextEncoderConfig) -> nn.Module:
    """The text encoder for cfg.layout (build it under torch.device("meta") before loading)."""
    if cfg.layout == "hf":
        return CLIPTextModel(cfg)
    if cfg.layout == "openclip":
        return OpenCLIPTextModel(cfg)
    raise ValueError(f"unknown text encoder layout {cfg.layout!r}: use 'hf' or 'openclip'")
