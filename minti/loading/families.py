"""The model families minti loads, and every fact about them that the weights cannot tell.

One `Family` per row of FAMILIES. The loader, the sampler, the trainer and the CLI read this
table; nothing else in minti compares, matches or keys on a family's name.

    label        how messages name the family ("SD 1.x", "SD 2.x", "SDXL")
    parts        per model: its single-file key prefix, its diffusers folder, its real-size
                 config (the presets in minti.models.unet / vae / clip) and the name describe()
                 gives it. The presets hold the conventions shapes cannot tell: the UNet's
                 attention split (SD 1.x 8 heads, SD 2.x/XL head width 64), SD 2.x's attention
                 upcast, each text encoder's layout ("hf" / "openclip"), activation, padding id
                 and which hidden state conditions the UNet (`layer`, `final_norm`)
    vae_scale    latents = VAE posterior x vae_scale
    size         the resolution the family was trained at (v_size: its v-prediction models)
    fp32_parts   parts that stay float32 when loading in float16
    diffusers_text_cut  diffusers ships SD 2.x's OpenCLIP-H with its last block removed
    pooled_conditioning the last text encoder's pooled projection conditions the UNet (SDXL)
    size_conditioning   the UNet also takes the image's original size, crop and target size:
                 with the pooled text, SDXL's vector `y` (minti.models.unet.sdxl_conditioning_vector)
    buckets_by_default  training buckets images by aspect ratio unless told otherwise (SDXL's
                 size conditioning was trained on bucketed images; SD 1.x/2.x on square crops)

Derived from the presets: which family a UNet's structure belongs to (`family_with_unet`) and
which family text encoders of given widths belong to (`family_with_text_widths`), the shapes
`doctor` self-tests the kernels at (`kernel_shapes`) and the largest size a family trained at.

`Family.config(part, shapes, fmt)` is how the loader turns a part's shapes into a config: the
model's `from_state_dict` reads what the shapes determine, the preset supplies the rest. The
presets' head widths carry over to narrow (test) models: a model narrower than one preset head
gets a single head of its full width.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch

from minti.models import clip, unet, vae
from minti.models.clip import TextEncoderConfig
from minti.models.unet import UNetConfig
from minti.models.vae import VAEConfig

Config = UNetConfig | VAEConfig | TextEncoderConfig

# Shared by every family: detection reads the UNet before it knows which family a file is.
UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."


@dataclass(frozen=True)
class Part:
    """One model of a family: where its weights are and its real-size config."""

    prefix: str  # single-file key prefix
    component: str  # diffusers folder
    preset: Config
    described_as: str | None = None  # its name in describe() and the run log; None: its key in Family.parts

    @property
    def layout(self) -> str | None:
        """A text encoder's key layout: "hf" (transformers CLIPTextModel names) or "openclip"."""
        return self.preset.layout if isinstance(self.preset, TextEncoderConfig) else None


class AttentionShape(NamedTuple):
    heads: int
    head_dim: int
    downsampling: int  # the level's feature map is the latent's side / downsampling: 1, 2, 4


@dataclass(frozen=True)
class KernelShapes:
    """The real-size model's shapes at which `doctor` self-tests the kernels."""

    first_attention: AttentionShape  # the UNet's first input level with attention: the longest sequences
    deepest_attention: AttentionShape  # its deepest input level with attention: the widest heads
    text: tuple[int, int]  # (heads, head dim) of the widest text encoder's causal attention
    channels: int  # the UNet's channels at its first attention level (GroupNorm+SiLU; GEGLU is 8x wide)


@dataclass(frozen=True)
class Family:
    name: str
    label: str
    parts: dict[str, Part]  # "unet", "vae", "text"[, "text_2"]; text encoders in conditioning order
    vae_scale: float
    size: int
    v_size: int | None = None  # None: the family has no v-prediction release (eps unless marked)
    fp32_parts: tuple[str, ...] = ()
    diffusers_text_cut: bool = False
    pooled_conditioning: bool = False
    size_conditioning: bool = False
    buckets_by_default: bool = False

    @property
    def text_parts(self) -> list[str]:
        return [p for p in self.parts if p.startswith("text")]

    @property
    def text_widths(self) -> list[int]:
        """The token-embedding width of each text encoder, in conditioning order."""
        return [self.parts[p].preset.width for p in self.text_parts]

    @property
    def largest_size(self) -> int:
        """The largest resolution the family's releases trained at: what `doctor` tests and plans
        at without --resolution (the worst case for memory)."""
        return max(self.size, self.v_size or 0)

    @property
    def kernel_shapes(self) -> KernelShapes:
        cfg = self.parts["unet"].preset
        levels = [level for level, depth in enumerate(cfg.transformer_depth) if depth > 0]

        def channels(level: int) -> int:
            return cfg.model_channels * cfg.channel_mult[level]

        def attention(level: int) -> AttentionShape:
            return AttentionShape(*cfg.attention_split(channels(level)), downsampling=2 ** level)

        text = self.parts[self.text_parts[-1]].preset  # the last text encoder is the widest (SDXL's bigG)
        return KernelShapes(first_attention=attention(levels[0]), deepest_attention=attention(levels[-1]),
                            text=(text.heads, text.width // text.heads), channels=channels(levels[0]))

    def default_size(self, prediction: str) -> int:
        """Training and sampling resolution: what the family's models of this prediction type saw."""
        return self.v_size if prediction == "v" and self.v_size else self.size

    def part_dtype(self, part: str, dtype: torch.dtype) -> torch.dtype:
        """The dtype `part` loads in when `dtype` is asked for."""
        return torch.float32 if part in self.fp32_parts and dtype == torch.float16 else dtype

    def config(self, part: str, shapes: dict[str, tuple[int, ...]], fmt: str = "safetensors") -> Config:
        """The config of `part` from its shapes (prefix stripped, minti's names) plus this family's
        conventions. fmt "diffusers": the folder's own layout quirks apply."""
        preset = self.parts[part].preset
        if part == "unet":
            cfg = UNetConfig.from_state_dict(shapes)
            head_dim = preset.head_dim and min(preset.head_dim, cfg.model_channels)
            return dataclasses.replace(cfg, num_heads=preset.num_heads, head_dim=head_dim,
                                       upcast_attention=preset.upcast_attention, norm_groups=preset.norm_groups)
        if part == "vae":
            return dataclasses.replace(VAEConfig.from_state_dict(shapes), norm_groups=preset.norm_groups)
        cfg = TextEncoderConfig.from_state_dict(shapes, preset.layout)
        head_width = preset.width // preset.heads
        cfg = dataclasses.replace(cfg, heads=max(1, cfg.width // head_width), activation=preset.activation,
                                  layer=preset.layer, final_norm=preset.final_norm, pooled=preset.pooled,
                                  pad_token_id=preset.pad_token_id, eos_token_id=preset.eos_token_id)
        if self.diffusers_text_cut and fmt == "diffusers":
            # the folder's last hidden state is the single file's penultimate one
            cfg = dataclasses.replace(cfg, layer="last")
        return cfg


FAMILIES: dict[str, Family] = {
    "sd1": Family(
        "sd1", "SD 1.x",
        parts={"unet": Part(UNET_PREFIX, "unet", unet.SD1),
               "vae": Part(VAE_PREFIX, "vae", vae.SD),
               "text": Part("cond_stage_model.transformer.", "text_encoder", clip.CLIP_L_SD1)},
        vae_scale=0.18215, size=512),
    "sd2": Family(
        "sd2", "SD 2.x",
        parts={"unet": Part(UNET_PREFIX, "unet", unet.SD2),
               "vae": Part(VAE_PREFIX, "vae", vae.SD),
               "text": Part("cond_stage_model.model.", "text_encoder", clip.OPENCLIP_H_SD2)},
        vae_scale=0.18215, size=512, v_size=768, diffusers_text_cut=True),
    "sdxl": Family(
        "sdxl", "SDXL",
        parts={"unet": Part(UNET_PREFIX, "unet", unet.SDXL),
               "vae": Part(VAE_PREFIX, "vae", vae.SD),
               "text": Part("conditioner.embedders.0.transformer.", "text_encoder", clip.CLIP_L_SDXL,
                            described_as="text_clip_l"),
               "text_2": Part("conditioner.embedders.1.model.", "text_encoder_2", clip.OPENCLIP_BIGG_SDXL,
                              described_as="text_openclip_bigg")},
        # SDXL's VAE overflows in fp16 (NaN latents and images; diffusers upcasts it too). It encodes
        # the training images once and then leaves the device, so fp32 costs no training memory.
        vae_scale=0.13025, size=1024, fp32_parts=("vae",),
        pooled_conditioning=True, size_conditioning=True, buckets_by_default=True),
}
DEFAULT_FAMILY = "sd1"  # what `doctor` self-tests at without --model


def family_with_unet(label_emb: bool, linear_proj: bool) -> Family:
    """The family a UNet belongs to by its structure, so that narrow test models of the real layouts
    are recognised too: whether it has label_emb (the vector `y`: SDXL) decides first, then whether
    its proj_in is a Linear (SD 2.x) or a 1x1 conv (SD 1.x)."""
    same_label = [f for f in FAMILIES.values() if (f.parts["unet"].preset.adm_in_channels is not None) == label_emb]
    return next((f for f in same_label if f.parts["unet"].preset.use_linear_proj == linear_proj), same_label[0])


def family_with_text_widths(dims: list[int]) -> Family | None:
    """The family whose text encoders are `dims` wide (an embedding's vectors tell which), or None."""
    return next((f for f in FAMILIES.values() if f.text_widths == list(dims)), None)
