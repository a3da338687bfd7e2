"""minti.diffusion: the noise schedule, targets and the training objective, against diffusers."""
import pytest
import torch

from minti import diffusion as D


def test_alphas_cumprod_match_diffusers_scaled_linear():
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
    ours = D.alphas_cumprod()
    assert ours.shape == (1000,)
    torch.testing.assert_close(ours.float(), ref.alphas_cumprod, rtol=1e-6, atol=1e-7)


def test_add_noise_and_v_target_match_diffusers():
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    acp = D.alphas_cumprod()
    torch.testing.assert_close(D.add_noise(x0, noise, t, acp), ref.add_noise(x0, noise, t), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(D.target("v", x0, noise, t, acp), ref.get_velocity(x0, noise, t), rtol=1e-5, atol=1e-6)
    assert D.target("eps", x0, noise, t, acp) is noise


def test_unknown_prediction_type_is_an_error():
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="prediction"):
        D.target("sample", x, x, torch.tensor([1]), D.alphas_cumprod())
