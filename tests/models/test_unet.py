"""The UNet: key layout against the real checkpoints, config inference, and numerical parity
with diffusers' UNet2DConditionModel (the oracle) on narrow random-weight models."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from layouts import read_layout
from minti.models import ops
from minti.loading.diffusers_keys import unet_from_diffusers
from minti.models.unet import SD1, SD2, SDXL, UNet, UNetConfig, sdxl_conditioning_vector

PRESETS = {"sd15": SD1, "sd21": SD2, "sdxl": SDXL}


# the models on their pure-torch paths (the kernels have their own tests)
pytestmark = pytest.mark.usefixtures("torch_backend")


@pytest.mark.parametrize("name", PRESETS)
def test_meta_state_dict_matches_real_checkpoint_layout(name):
    with torch.device("meta"):
        model = UNet(PRESETS[name])
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == read_layout(name, "model.diffusion_model.")


@pytest.mark.parametrize("name", PRESETS)
def test_config_inferred_from_checkpoint_shapes_is_the_preset_in_everything_shapes_determine(name):
    # the attention split and upcast are family conventions (tests/loading/test_families.py)
    conventions = dict(num_heads=8, head_dim=None, upcast_attention=False)
    inferred = UNetConfig.from_state_dict(read_layout(name, "model.diffusion_model."))
    assert inferred == dataclasses.replace(PRESETS[name], **conventions)


# ---- parity with diffusers ----------------------------------------------------------------

def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (diffusers zero-inits some), scaled so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.ndim >= 2:
                p.copy_(r / math.sqrt(p[0].numel()))
            elif name.endswith("weight"):  # norm scales
                p.copy_(1 + 0.1 * r)
            else:
                p.copy_(0.1 * r)


def diffusers_unet(**kw):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(**kw).eval()


def ours_from(theirs, cfg: UNetConfig) -> UNet:
    ours = UNet(cfg).eval()
    ours.load_state_dict(unet_from_diffusers(theirs.state_dict()), strict=True)
    return ours


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# Narrow models in each family's shape. In diffusers' SD1/SD2 configs `attention_head_dim`
# is really the number of heads (8 for SD1; channels/head_dim per level for SD2/XL).
NARROW_SD1 = dict(
    diffusers=dict(block_out_channels=(32, 64, 64, 64), norm_num_groups=32, cross_attention_dim=48,
                   attention_head_dim=8, use_linear_projection=False),
    ours=UNetConfig(model_channels=32, channel_mult=(1, 2, 2, 2), context_dim=48, num_heads=8),
)
NARROW_SD2 = dict(
    diffusers=dict(block_out_channels=(32, 64, 64, 64), norm_num_groups=16, cross_attention_dim=40,
                   attention_head_dim=(2, 4, 4, 4), use_linear_projection=True, upcast_attention=True),
    ours=UNetConfig(model_channels=32, channel_mult=(1, 2, 2, 2), context_dim=40, head_dim=16,
                    use_linear_proj=True, upcast_attention=True, norm_groups=16),
)
POOLED, TIME_DIM = 24, 8
NARROW_SDXL = dict(
    diffusers=dict(block_out_channels=(32, 64, 64), norm_num_groups=32, cross_attention_dim=48,
                   down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                   transformer_layers_per_block=(1, 2, 3), attention_head_dim=(2, 4, 4),
                   use_linear_projection=True, addition_embed_type="text_time",
                   addition_time_embed_dim=TIME_DIM, projection_class_embeddings_input_dim=POOLED + 6 * TIME_DIM),
    ours=UNetConfig(model_channels=32, channel_mult=(1, 2, 2), transformer_depth=(0, 2, 3),
                    transformer_depth_middle=3, context_dim=48, head_dim=16, use_linear_proj=True,
                    adm_in_channels=POOLED + 6 * TIME_DIM),
)


def inputs(cfg: UNetConfig, seed: int = 0, size: int = 16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, size, size, generator=g)
    t = torch.tensor([10.0, 981.0])
    context = torch.randn(2, 77, cfg.context_dim, generator=g)
    return x, t, context


@pytest.mark.parametrize("family", [NARROW_SD1, NARROW_SD2], ids=["sd1", "sd2"])
def test_matches_diffusers_on_same_random_weights(family):
    torch.manual_seed(0)
    theirs = diffusers_unet(**family["diffusers"])
    randomize(theirs, seed=1)
    ours = ours_from(theirs, family["ours"])
    x, t, context = inputs(family["ours"])
    with torch.no_grad():
        want = theirs(x, t, encoder_hidden_states=context).sample
        got = ours(x, t, context)
        got_int_t = ours(x, t.long(), context)
    assert rel_err(got, want) <= 1e-4
    assert torch.equal(got, got_int_t)


def test_sdxl_matches_diffusers_with_size_and_crop_conditioning():
    torch.manual_seed(0)
    theirs = diffusers_unet(**NARROW_SDXL["diffusers"])
    randomize(theirs, seed=2)
    cfg = NARROW_SDXL["ours"]
    ours = ours_from(theirs, cfg)
    x, t, context = inputs(cfg, seed=3)
    pooled = torch.randn(2, POOLED, generator=torch.Generator().manual_seed(4))
    orig, crop, target = (768, 1024), (32, 0), (1024, 1024)
    time_ids = torch.tensor([[*orig, *crop, *target]] * 2, dtype=torch.float32)
    with torch.no_grad():
        want = theirs(x, t, encoder_hidden_states=context,
                      added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        y = sdxl_conditioning_vector(pooled, orig, crop, target, embed_dim=TIME_DIM)
        got = ours(x, t, context, y=y)
        # the conditioning matters: a different crop changes the output
        other = ours(x, t, context, y=sdxl_conditioning_vector(pooled, orig, (0, 0), target, embed_dim=TIME_DIM))
    assert y.shape == (2, POOLED + 6 * TIME_DIM)
    assert rel_err(got, want) <= 1e-4
    assert rel_err(other, want) > 1e-3


def test_sdxl_conditioning_vector_is_2816_wide_at_real_sizes():
    y = sdxl_conditioning_vector(torch.zeros(3, 1280), (1024, 1024), (0, 0), (1024, 1024))
    assert y.shape == (3, 2816)


def test_frozen_unet_passes_gradient_to_the_text_context_only():
    cfg = NARROW_SD1["ours"]
    torch.manual_seed(0)
    model = UNet(cfg).requires_grad_(False)
    x, t, context = inputs(cfg, size=8)
    context.requires_grad_(True)
    model(x, t, context).square().mean().backward()
    assert context.grad is not None and context.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_half_precision_weights_compute_in_their_dtype_and_stay_close():
    cfg = NARROW_SD2["ours"]
    torch.manual_seed(0)
    model = UNet(cfg)
    randomize(model, seed=5)
    x, t, context = inputs(cfg, size=8)
    with torch.no_grad():
        want = model(x, t, context)
        got = model.to(torch.bfloat16)(x, t, context)  # fp32 inputs are cast to the weights' dtype
    assert got.dtype == torch.bfloat16
    assert rel_err(got.float(), want) < 5e-2


@pytest.mark.slow
def test_full_width_sd15_matches_diffusers():
    torch.manual_seed(0)
    theirs = diffusers_unet(cross_attention_dim=768)  # diffusers defaults are the SD 1.x UNet
    randomize(theirs, seed=6)
    with torch.device("meta"):
        ours = UNet(SD1).eval()
    ours.load_state_dict(unet_from_diffusers(theirs.state_dict()), strict=True, assign=True)  # shares memory
    x, t, context = inputs(SD1, size=32)
    with torch.no_grad():
        want = theirs(x[:1], t[1:], encoder_hidden_states=context[:1]).sample
        got = ours(x[:1], t[1:], context[:1])
    assert rel_err(got, want) <= 1e-4


def test_attention_merges_and_splits_heads_without_copying_activations(torch_backend):
    # The projections produce and consume [B, N, H*D]; attention returns its output and input
    # gradients in that memory order, so splitting and merging heads are views. Each copy here
    # was a memory-bound launch per layer and direction on the CPU path.
    import kernel_testing as kt
    from minti.models.unet import Attention

    torch.manual_seed(0)
    attention = Attention(64, heads=4, head_dim=16, context_dim=48).requires_grad_(False)
    x = torch.randn(1, 256, 64, requires_grad=True)
    context = torch.randn(1, 77, 48, requires_grad=True)
    with kt.AtenOps() as ops_seen:
        attention(x, context).sum().backward()
    copies = {n: c for n, c in ops_seen.counts.items() if n in ("clone", "copy_", "contiguous", "_to_copy")}
    assert copies == {}, copies
