"""The Stable Diffusion VAE (AutoencoderKL), written from scratch.

Attribute names mirror the single-file keys under `first_stage_model.` (the LDM
`ldm.modules.diffusionmodules.model` Encoder/Decoder), so a stripped single-file state dict
loads with strict=True. SD 1.x, SD 2.x and SDXL all share this layout and size; only the latent
scaling factor differs, and that is a family fact the pipeline applies (minti.loading.families).

    encoder: conv_in -> down[i] (ResBlocks, then a stride-2 conv except at the last level)
             -> mid (ResBlock, attention, ResBlock) -> norm_out, SiLU, conv_out -> quant_conv
    decoder: post_quant_conv -> conv_in -> mid -> up[i] from deepest to shallowest
             (ResBlocks, then nearest x2 + conv except at level 0) -> norm_out, SiLU, conv_out
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minti.models import ops

EPS = 1e-6  # LDM's Normalize(): GroupNorm(32, C, eps=1e-6)


@dataclass
class VAEConfig:
    in_channels: int = 3  # image channels, in and out
    z_channels: int = 4  # latent channels (LDM's embed_dim equals z_channels in every SD VAE)
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    norm_groups: int = 32

    @classmethod
    def from_state_dict(cls, shapes: dict[str, tuple]) -> VAEConfig:
        """Infer the architecture from stripped key names (no `first_stage_model.`) and shapes.

        Values may be shapes or tensors. norm_groups cannot be read from a state dict: it keeps
        its default (32 in every SD VAE)."""
        shape = {k: tuple(v.shape) if hasattr(v, "shape") else tuple(v) for k, v in shapes.items()}
        try:
            ch, in_channels = shape["encoder.conv_in.weight"][:2]
            z_channels = shape["decoder.conv_in.weight"][1]
        except KeyError as e:
            raise ValueError(f"not a VAE state dict (missing {e.args[0]!r})") from None
        levels = sorted({int(m.group(1)) for k in shape if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
        blocks = {int(m.group(1)) for k in shape if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
        # each level's width is the output width of its first ResBlock
        ch_mult = tuple(shape[f"encoder.down.{i}.block.0.conv1.weight"][0] // ch for i in levels)
        if levels != list(range(len(levels))) or not blocks:
            raise ValueError("VAE state dict has gaps in encoder.down.N.block.M")
        if shape["encoder.conv_out.weight"][0] != 2 * z_channels:
            raise ValueError("encoder.conv_out must produce mean and logvar (2 * z_channels)")
        return cls(in_channels=in_channels, z_channels=z_channels, ch=ch, ch_mult=ch_mult,
                   num_res_blocks=len(blocks))


SD = VAEConfig()  # every family's VAE: SD 1.x, SD 2.x and SDXL


class GroupNorm(nn.Module):
    """Affine GroupNorm whose parameters are named like nn.GroupNorm's; runs through ops
    (fp32 statistics, optional fused SiLU)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, silu: bool = False) -> torch.Tensor:
        return ops.group_norm_silu(x, self.weight, self.bias, self.groups, eps=EPS, silu=silu)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = GroupNorm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = GroupNorm(c_out, groups)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        # LDM only creates the 1x1 shortcut when the width changes (the key exists only then)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.norm1(x, silu=True))
        h = self.conv2(self.norm2(h, silu=True))  # dropout is 0 in every SD VAE
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, projections as 1x1 convs."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = GroupNorm(c, groups)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        # [B,C,H,W] -> [B,1,HW,C]: one head of width C, scale C^-0.5 as in LDM
        q, k, v = (t.reshape(B, 1, C, H * W).transpose(2, 3) for t in (self.q(h), self.k(h), self.v(h)))
        h = ops.attention(q, k, v).transpose(2, 3).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # LDM pads right/bottom only, then convolves unpadded: not the same as padding=1
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
    def __init__(self, c: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(c, c, groups)
        self.attn_1 = AttnBlock(c, groups)
        self.block_2 = ResnetBlock(c, c, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution: `block` (ResBlocks), then `downsample` / `upsample` (or neither)."""

    def __init__(self, c_in: int, c_out: int, n_blocks: int, groups: int, resample: type[nn.Module] | None):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(c_in if i == 0 else c_out, c_out, groups) for i in range(n_blocks))
        if resample is Downsample:
            self.downsample = Downsample(c_out)
        elif resample is Upsample:
            self.upsample = Upsample(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList(
            Level(cfg.ch if i == 0 else widths[i - 1], w, cfg.num_res_blocks, cfg.norm_groups,
                  Downsample if i != last else None)
            for i, w in enumerate(widths))
        self.mid = Mid(widths[-1], cfg.norm_groups)
        self.norm_out = GroupNorm(widths[-1], cfg.norm_groups)
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.z_channels, 3, padding=1)  # mean and logvar

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(self.norm_out(h, silu=True))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[-1], 3, padding=1)
        self.mid = Mid(widths[-1], cfg.norm_groups)
        # up[i] is the level at resolution i (up[0] is full size) but runs from last to first;
        # each has one more ResBlock than the encoder's and takes the width of the level below.
        self.up = nn.ModuleList(
            Level(widths[min(i + 1, last)], w, cfg.num_res_blocks + 1, cfg.norm_groups,
                  Upsample if i != 0 else None)
            for i, w in enumerate(widths))
        self.norm_out = GroupNorm(widths[0], cfg.norm_groups)
        self.conv_out = nn.Conv2d(widths[0], cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(self.norm_out(h, silu=True))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixels [B,3,H,W] in [-1,1] (H, W multiples of 2**(levels-1)) -> (mean, logvar) of
        the unscaled latent posterior, each [B,z,H/8,W/8] for SD. Computed in the weights' dtype."""
        x = pixels.to(self.quant_conv.weight.dtype)
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # as LDM's DiagonalGaussianDistribution

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents [B,z,h,w] -> pixels [B,3,8h,8w] (roughly [-1,1], not clamped)."""
        z = z.to(self.post_quant_conv.weight.dtype)
        return self.decoder(self.post_quant_conv(z))
