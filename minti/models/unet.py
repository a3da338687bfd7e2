"""The Stable Diffusion UNet (SD 1.x, 2.x, XL), written from scratch.

Attribute names mirror the single-file checkpoint keys under `model.diffusion_model.`,
so a state dict loads by name. Attention, GroupNorm+SiLU and GEGLU go through minti.models.ops.

Shape of the network (LDM's openaimodel.UNetModel):
    input_blocks   [conv_in] + per level: num_res_blocks x (ResBlock [+ SpatialTransformer]),
                   then a Downsample except after the last level
    middle_block   ResBlock, SpatialTransformer, ResBlock
    output_blocks  per level, deepest first: (num_res_blocks + 1) x (ResBlock on the concat
                   of h and a skip [+ SpatialTransformer]), then an Upsample except at level 0
    out            GroupNorm+SiLU, conv
Every entry of the three block lists is a `Block` called as block(h, emb, context).

Memory (textual inversion trains through this network with every weight frozen): convs
are ops.Conv2d, which keep no input for a weight gradient; each block whose index is in
`recompute` (numbered input_blocks 0.., then middle_block, then output_blocks) keeps only its
input and recomputes its inside during backward (minti.training.memory chooses which).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch.utils.checkpoint import checkpoint

from minti.models import ops


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

    def attention_split(self, channels: int) -> tuple[int, int]:
        """(heads, head dim) of the attention at a level of `channels`: SD 1.x fixes the head
        count, SD 2.x/XL the head width."""
        if self.head_dim:
            return channels // self.head_dim, self.head_dim
        return self.num_heads, channels // self.num_heads

    @classmethod
    def from_state_dict(cls, shapes: dict[str, tuple[int, ...]]) -> "UNetConfig":
        """Infer the config from single-file UNet key names (prefix stripped) and shapes.

        Only what shapes determine: the attention split (num_heads / head_dim), upcasting and
        norm_groups keep their defaults; the family table (minti.loading.families) sets them.
        """
        shapes = {k: tuple(v) for k, v in shapes.items()}
        n_inputs = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("input_blocks."))
        downsamples = sorted(int(k.split(".")[1]) for k in shapes
                             if k.startswith("input_blocks.") and k.endswith(".0.op.weight"))
        num_res_blocks = downsamples[0] - 1 if downsamples else n_inputs - 1
        levels = len(downsamples) + 1
        mc = shapes["input_blocks.0.0.weight"][0]

        def depth(prefix: str) -> int:  # number of transformer blocks under prefix
            ks = {int(k[len(prefix):].split(".")[0]) for k in shapes if k.startswith(prefix)}
            return max(ks) + 1 if ks else 0

        first = [1 + level * (num_res_blocks + 1) for level in range(levels)]  # first ResBlock of each level
        to_k = next((s for k, s in shapes.items() if k.endswith("attn2.to_k.weight")), None)
        proj_in = next((s for k, s in shapes.items() if k.endswith("proj_in.weight")), None)
        context_dim = to_k[1] if to_k is not None else 768
        adm = shapes.get("label_emb.0.0.weight")
        return cls(
            in_channels=shapes["input_blocks.0.0.weight"][1],
            out_channels=shapes["out.2.weight"][0],
            model_channels=mc,
            channel_mult=tuple(shapes[f"input_blocks.{i}.0.out_layers.3.weight"][0] // mc for i in first),
            num_res_blocks=num_res_blocks,
            transformer_depth=tuple(depth(f"input_blocks.{i}.1.transformer_blocks.") for i in first),
            transformer_depth_middle=depth("middle_block.1.transformer_blocks."),
            context_dim=context_dim,
            use_linear_proj=proj_in is not None and len(proj_in) == 2,
            adm_in_channels=adm[1] if adm is not None else None,
        )


SD1 = UNetConfig()
SD2 = UNetConfig(head_dim=64, context_dim=1024, use_linear_proj=True, upcast_attention=True)
SDXL = UNetConfig(channel_mult=(1, 2, 4), transformer_depth=(0, 2, 10), transformer_depth_middle=10,
                  head_dim=64, context_dim=2048, use_linear_proj=True, adm_in_channels=2816)


# ---- embeddings ---------------------------------------------------------------------------

def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """LDM's sinusoidal embedding [B] -> [B, dim] in fp32: cos half first, then sin.
    Always fp32: timesteps up to 999 times frequencies lose too many digits in fp16."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def sdxl_conditioning_vector(pooled: torch.Tensor, original_size: tuple[int, int],
                             crop_coords: tuple[int, int], target_size: tuple[int, int],
                             embed_dim: int = 256) -> torch.Tensor:
    """SDXL's `y`: pooled text [B,1280] then the sinusoidal embeddings of the six ints
    (orig h, orig w, crop top, crop left, target h, target w), embed_dim each -> [B, 2816]."""
    ints = torch.tensor([*original_size, *crop_coords, *target_size], device=pooled.device)
    sizes = timestep_embedding(ints, embed_dim).reshape(1, -1).expand(pooled.shape[0], -1)
    return torch.cat([pooled, sizes.to(pooled.dtype)], dim=-1)


# ---- building blocks ----------------------------------------------------------------------

class Norm(nn.GroupNorm):
    """GroupNorm with the following SiLU fused in (statistics in fp32, via ops)."""

    def __init__(self, channels: int, groups: int, eps: float = 1e-5, silu: bool = True):
        super().__init__(groups, channels, eps=eps)
        self.silu = silu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.group_norm_silu(x, self.weight, self.bias, self.num_groups, self.eps, silu=self.silu)


def conv3x3(cin: int, cout: int, stride: int = 1) -> ops.Conv2d:
    return ops.Conv2d(cin, cout, 3, stride=stride, padding=1)


class ResBlock(nn.Module):
    """Two GroupNorm-SiLU-conv steps with the time embedding added in between, plus a skip.
    The nn.Identity slots stand where LDM keeps its SiLU (now fused into Norm) and its
    Dropout (frozen use), so the indices match the checkpoint keys."""

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(Norm(cin, groups), nn.Identity(), conv3x3(cin, cout))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, cout))
        self.out_layers = nn.Sequential(Norm(cout, groups), nn.Identity(), nn.Identity(), conv3x3(cout, cout))
        self.skip_connection = nn.Identity() if cin == cout else ops.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Attention(nn.Module):
    """Multi-head attention; self-attention when context is None. Only to_out has a bias."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None,
                 upcast: bool = False):
        super().__init__()
        inner, context_dim = heads * head_dim, context_dim or dim
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim))  # index 0 as in the checkpoint (1 was Dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        B = x.shape[0]
        # [B, N, H*D] -> [B, H, N, D]
        q, k, v = (p.view(B, -1, self.heads, p.shape[-1] // self.heads).transpose(1, 2)
                   for p in (self.to_q(x), self.to_k(context), self.to_v(context)))
        out = ops.attention(q, k, v, upcast=self.upcast)
        return self.to_out(out.transpose(1, 2).reshape(B, x.shape[1], -1))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.geglu(self.proj(x))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # net.0 GEGLU, net.1 Dropout (identity when frozen), net.2 the output projection
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, upcast: bool):
        super().__init__()
        self.attn1 = Attention(dim, heads, head_dim, upcast=upcast)
        self.attn2 = Attention(dim, heads, head_dim, context_dim, upcast=upcast)
        self.ff = FeedForward(dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Image features as a sequence of h*w tokens through `depth` transformer blocks.
    SD 1.x projects in/out with 1x1 convs (before flattening), SD 2.x/XL with linears (after)."""

    def __init__(self, channels: int, heads: int, head_dim: int, depth: int, context_dim: int,
                 linear: bool, groups: int, upcast: bool):
        super().__init__()
        self.linear = linear
        self.norm = Norm(channels, groups, eps=1e-6, silu=False)
        proj = (lambda: nn.Linear(channels, channels)) if linear else (lambda: ops.Conv2d(channels, channels, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(channels, heads, head_dim, context_dim, upcast) for _ in range(depth))
        self.proj_out = proj()

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        h = h.flatten(2).transpose(1, 2)  # [B, H*W, C]
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear:
            h = self.proj_out(h)
        h = h.transpose(1, 2).reshape(B, C, H, W)
        if not self.linear:
            h = self.proj_out(h)
        return x + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = conv3x3(channels, channels, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv3x3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Block(nn.Sequential):
    """One entry of input_blocks / output_blocks, or the middle_block: its layers in order,
    each given what it needs (ResBlocks the time embedding, transformers the text)."""

    def forward(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, SpatialTransformer):
                h = layer(h, context)
            else:
                h = layer(h)
        return h


# ---- the UNet -----------------------------------------------------------------------------

class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        self.recompute: frozenset[int] = frozenset()  # blocks recomputed in backward instead of stored
        mc, groups = cfg.model_channels, cfg.norm_groups
        emb_dim = mc * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.adm_in_channels is not None:
            # SDXL: pooled text + size/crop embeddings, added to the time embedding
            self.label_emb = nn.Sequential(nn.Sequential(
                nn.Linear(cfg.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)))

        def transformer(ch: int, depth: int) -> SpatialTransformer:
            heads, head_dim = cfg.attention_split(ch)
            return SpatialTransformer(ch, heads, head_dim, depth, cfg.context_dim, cfg.use_linear_proj,
                                      groups, cfg.upcast_attention)

        self.input_blocks = nn.ModuleList([Block(ops.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_channels, ch = [mc], mc  # channels of each input block's output, consumed by output_blocks
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, mc * mult, emb_dim, groups)]
                ch = mc * mult
                if cfg.transformer_depth[level]:
                    layers.append(transformer(ch, cfg.transformer_depth[level]))
                self.input_blocks.append(Block(*layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(Block(Downsample(ch)))
                skip_channels.append(ch)

        self.middle_block = Block(ResBlock(ch, ch, emb_dim, groups),
                                  transformer(ch, cfg.transformer_depth_middle),
                                  ResBlock(ch, ch, emb_dim, groups))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), mc * mult, emb_dim, groups)]
                ch = mc * mult
                if cfg.transformer_depth[level]:
                    layers.append(transformer(ch, cfg.transformer_depth[level]))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(Block(*layers))

        self.out = nn.Sequential(Norm(ch, groups), nn.Identity(), ops.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor | None = None) -> torch.Tensor:
        """x [B,in,h,w] latents, t [B] timesteps, context [B,77,context_dim] text,
        y [B,adm_in_channels] for SDXL -> [B,out,h,w] in the weights' dtype."""
        dtype = self.out[0].weight.dtype  # a norm: never stored in fp8 (minti.models.fp8)
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(dtype))
        if self.cfg.adm_in_channels is not None:
            if y is None:
                raise ValueError("this UNet (SDXL) needs y: see sdxl_conditioning_vector")
            emb = emb + self.label_emb(y.to(dtype))
        h, context = x.to(dtype), context.to(dtype)
        recompute = self.recompute if torch.is_grad_enabled() else frozenset()

        def run(index: int, block: Block, h: torch.Tensor) -> torch.Tensor:
            if index in recompute:
                return checkpoint(block, h, emb, context, use_reentrant=False)
            return block(h, emb, context)

        skips = []
        for i, block in enumerate(self.input_blocks):
            h = run(i, block, h)
            skips.append(h)
        h = run(len(self.input_blocks), self.middle_block, h)
        for i, block in enumerate(self.output_blocks, start=len(self.input_blocks) + 1):
            h = run(i, block, torch.cat([h, skips.pop()], dim=1))
        return self.out(h)

    @property
    def blocks(self) -> list[Block]:
        """Every block in the numbering `recompute` uses: input_blocks, middle_block, output_blocks."""
        return [*self.input_blocks, self.middle_block, *self.output_blocks]

    @property
    def checkpointing(self) -> bool:
        """True when every block is recomputed (the `low` plan)."""
        return len(self.recompute) == len(self.blocks)

    @checkpointing.setter
    def checkpointing(self, every_block: bool) -> None:
        self.recompute = frozenset(range(len(self.blocks))) if every_block else frozenset()
