"""The reference we measure minti against: a training step written the way the diffusers
textual-inversion example trains (its README settings: fp16 mixed precision, default
attention, no gradient checkpointing), built from diffusers' UNet2DConditionModel and
transformers' CLIPTextModel at the real SD sizes with random weights.

What that example keeps on the device, and so what this reference keeps:
  - text encoder weights in fp32 (it is the model being "trained"), run under fp16 autocast;
  - the whole 49408-row token-embedding table as the trainable parameter: its fp32 gradient,
    two fp32 AdamW moments, and a cloned copy of the original table (used to restore the
    rows that must not change after each step);
  - UNet and VAE weights in fp16; the VAE encodes the images every step.
For SDXL the reference is the diffusers SDXL example (examples/textual_inversion/
textual_inversion_sdxl.py): both text encoders' whole token tables are trainable and in one
AdamW, each with its cloned original; both encoders' penultimate hidden states make the
context, the second's projected output is the pooled vector, the time ids are (original size,
crop top-left, target size) and the VAE encodes every step (scaled by 0.13025). The example
casts its second text encoder to the weight dtype; here both stay fp32 (the FLOP count is the
same, the memory a little higher).
Bench-only: imports diffusers and transformers, which minti itself never does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Real configs of the released models, as their diffusers folders describe them.
UNET_CONFIGS = {
    "sd15": dict(block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
    "sd21": dict(block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20),
                 cross_attention_dim=1024, use_linear_projection=True, upcast_attention=True,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
    "sdxl": dict(block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, transformer_layers_per_block=(1, 2, 10),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816),
}
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768)
TEXT_CONFIGS = {
    "sd15": [CLIP_L],
    "sd21": [dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                  hidden_act="gelu", projection_dim=512)],
    "sdxl": [CLIP_L, dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                          hidden_act="gelu", projection_dim=1280)],
}


@dataclass
class Reference:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    originals: list[torch.Tensor]  # the example's cloned embedding tables
    optimizer: torch.optim.Optimizer
    family: str

    def modules(self) -> list[torch.nn.Module]:
        return [self.unet, self.vae, *self.text_encoders]


def build(family: str, device: torch.device | str) -> Reference:
    # here, not at the top: diffusers and transformers are optional (not minti's dependencies), and
    # bench/step.py and bench/memory.py import this module also for runs that never build the reference
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device(device):
        unet = UNet2DConditionModel(**UNET_CONFIGS[family]).to(torch.float16).requires_grad_(False)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4).to(torch.float16).requires_grad_(False)
        encoders = []
        for i, cfg in enumerate(TEXT_CONFIGS[family]):
            cls = CLIPTextModelWithProjection if i == 1 else CLIPTextModel
            te = cls(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **cfg)).requires_grad_(False)
            te.get_input_embeddings().weight.requires_grad_(True)
            encoders.append(te)
    unet.train()
    tables = [te.get_input_embeddings().weight for te in encoders]
    originals = [t.detach().clone() for t in tables]
    optimizer = torch.optim.AdamW(tables, lr=5e-4)
    return Reference(unet, vae, encoders, originals, optimizer, family)


def step(ref: Reference, pixels: torch.Tensor, tokens: torch.Tensor, autocast: bool) -> torch.Tensor:
    """One optimizer step of the example's loop. `autocast` is off on the meta device (there
    is none there): the text encoders then run in fp32, and the fp16 weight copies that
    autocast would make (and keep alive for backward, as the inputs of their matmuls'
    input gradients) are made explicitly and held until after backward."""
    B = pixels.shape[0]
    scale = 0.13025 if ref.family == "sdxl" else 0.18215
    latents = ref.vae.encode(pixels.to(torch.float16)).latent_dist.sample().detach() * scale
    noise = torch.randn_like(latents)
    t = torch.randint(0, 1000, (B,), device=latents.device)
    noisy = latents + noise  # the scheduler's add_noise: same shapes, same lifetimes
    casts = [] if autocast else [p.detach().to(torch.float16) for te in ref.text_encoders
                                 for name, p in te.named_parameters() if "embeddings" not in name]
    with torch.autocast("cuda", torch.float16, enabled=autocast):
        states, pooled = [], None
        for i, te in enumerate(ref.text_encoders):
            out = te(tokens, output_hidden_states=ref.family == "sdxl")
            if ref.family == "sdxl":
                states.append(out.hidden_states[-2])
                pooled = out.text_embeds if i == 1 else pooled
            else:
                states.append(out[0])
        context = torch.cat(states, dim=-1).to(torch.float16)
        kwargs = {}
        if ref.family == "sdxl":
            H, W = pixels.shape[-2:]  # the example's square crop: original size = target size, crop (0, 0)
            time_ids = torch.tensor([[H, W, 0, 0, H, W]] * B, device=latents.device, dtype=torch.float16)
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled.to(torch.float16), "time_ids": time_ids}
        pred = ref.unet(noisy, t, context, **kwargs).sample
    loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
    loss.backward()
    del casts
    ref.optimizer.step()
    ref.optimizer.zero_grad()
    with torch.no_grad():  # the example restores every row but the new token's
        for te, orig in zip(ref.text_encoders, ref.originals):
            te.get_input_embeddings().weight[:-1] = orig[:-1]
    return loss.detach()
