"""The VAE: layout against the real checkpoint manifests, config inference, and numerical
parity with diffusers' AutoencoderKL on the same random weights."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import minti.models.ops
from layouts import read_layout
from minti.loading.diffusers_keys import vae_from_diffusers
from minti.models.vae import SD, AutoencoderKL, VAEConfig

FAMILIES = ["sd15", "sd21", "sdxl"]


# the models on their pure-torch paths (the kernels have their own tests)
pytestmark = pytest.mark.usefixtures("torch_backend")


def shapes(sd: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


# ---- layout ------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_meta_model_has_exactly_the_single_file_keys_and_shapes(family):
    with torch.device("meta"):
        vae = AutoencoderKL(SD)  # one VAE for every family
    assert shapes(vae.state_dict()) == read_layout(family, "first_stage_model.")


# ---- config inference ----------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_config_is_inferred_from_a_real_layout(family):
    cfg = VAEConfig.from_state_dict(read_layout(family, "first_stage_model."))
    assert cfg == SD  # every family's VAE has the same architecture (only the latent scale differs)


def test_config_is_inferred_from_a_narrow_uneven_model():
    cfg = VAEConfig(in_channels=1, z_channels=3, ch=8, ch_mult=(1, 3, 2), num_res_blocks=3, norm_groups=4)
    with torch.device("meta"):
        sd = AutoencoderKL(cfg).state_dict()
    # norm_groups cannot be read from shapes; everything else must round-trip
    assert VAEConfig.from_state_dict(sd) == dataclasses.replace(cfg, norm_groups=32)


def test_config_inference_rejects_a_non_vae_state_dict():
    with pytest.raises(ValueError, match="not a VAE"):
        VAEConfig.from_state_dict(read_layout("sd15", "model.diffusion_model."))


# ---- parity with diffusers ------------------------------------------------------------------

def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random: norm scales near 1, weights ~1/sqrt(fan_in) so activations
    stay O(1) through the whole depth, biases small but nonzero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)


def build_pair(block_out_channels: tuple[int, ...], layers_per_block: int, groups: int, seed: int = 0):
    from diffusers import AutoencoderKL as DiffusersVAE

    n = len(block_out_channels)
    theirs = DiffusersVAE(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                          block_out_channels=block_out_channels, layers_per_block=layers_per_block,
                          norm_num_groups=groups, latent_channels=4).eval()
    randomize_(theirs, seed)
    ch = block_out_channels[0]
    cfg = VAEConfig(ch=ch, ch_mult=tuple(c // ch for c in block_out_channels), num_res_blocks=layers_per_block,
                    norm_groups=groups)
    ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(vae_from_diffusers(theirs.state_dict()), strict=True)
    return ours, theirs


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def narrow_pair():
    # three levels: a width change (nin_shortcut), an unchanged width, two resamples each way
    return build_pair((32, 64, 64), layers_per_block=2, groups=8)


@pytest.mark.parametrize("hw", [(32, 32), (24, 40)])
@torch.no_grad()
def test_encode_matches_diffusers_posterior(narrow_pair, hw):
    ours, theirs = narrow_pair
    x = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mean, logvar = ours.encode(x)
    dist = theirs.encode(x).latent_dist
    assert mean.shape == (2, 4, hw[0] // 4, hw[1] // 4)
    assert rel_err(mean, dist.mean) <= 1e-4
    assert rel_err(logvar, dist.logvar) <= 1e-4


@pytest.mark.parametrize("hw", [(8, 8), (6, 10)])
@torch.no_grad()
def test_decode_matches_diffusers(narrow_pair, hw):
    ours, theirs = narrow_pair
    z = torch.randn(2, 4, *hw, generator=torch.Generator().manual_seed(2))
    pixels = ours.decode(z)
    assert pixels.shape == (2, 3, hw[0] * 4, hw[1] * 4)
    assert rel_err(pixels, theirs.decode(z).sample) <= 1e-4


@torch.no_grad()
def test_encode_matches_diffusers_on_a_nearly_flat_image_where_norm_eps_matters():
    # With conv_in's bias zeroed and an almost constant image, the first GroupNorm sees a
    # variance near 1e-6, so a wrong eps (say 1e-5) changes the output by far more than 1e-4.
    ours, theirs = build_pair((16, 32), layers_per_block=1, groups=8, seed=7)
    ours.encoder.conv_in.bias.zero_()
    theirs.encoder.conv_in.bias.zero_()
    x = 1e-3 * torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(8))
    mean, logvar = ours.encode(x)
    dist = theirs.encode(x).latent_dist
    assert rel_err(mean, dist.mean) <= 1e-4
    assert rel_err(logvar, dist.logvar) <= 1e-4


@torch.no_grad()
def test_logvar_is_clamped_like_ldm(narrow_pair):
    ours, _ = narrow_pair
    x = torch.zeros(1, 3, 16, 16)
    bias = ours.quant_conv.bias
    saved = bias.clone()
    try:
        for value, expected in [(1e4, 20.0), (-1e4, -30.0)]:
            bias[4:] = value
            _, logvar = ours.encode(x)
            assert torch.all(logvar == expected)
    finally:
        bias.copy_(saved)


@torch.no_grad()
def test_bfloat16_weights_compute_in_bfloat16_and_stay_close_to_float32():
    ours, _ = build_pair((16, 32), layers_per_block=1, groups=8, seed=3)
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    mean32, _ = ours.encode(x)
    out32 = ours.decode(mean32)
    ours.to(torch.bfloat16)
    mean16, _ = ours.encode(x)  # float32 input is cast to the weights' dtype
    out16 = ours.decode(mean32)
    assert mean16.dtype == out16.dtype == torch.bfloat16
    assert rel_err(mean16.float(), mean32) < 5e-2
    assert rel_err(out16.float(), out32) < 5e-2


@pytest.mark.slow
@torch.no_grad()
def test_full_width_sd_vae_matches_diffusers_on_64x64():
    ours, theirs = build_pair((128, 256, 512, 512), layers_per_block=2, groups=32, seed=5)
    assert ours.cfg == SD
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(6)) * 2 - 1
    mean, logvar = ours.encode(x)
    dist = theirs.encode(x).latent_dist
    assert rel_err(mean, dist.mean) <= 1e-4
    assert rel_err(logvar, dist.logvar) <= 1e-4
    assert rel_err(ours.decode(mean), theirs.decode(dist.mean).sample) <= 1e-4
