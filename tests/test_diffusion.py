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


def _noised(prediction: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    acp = D.alphas_cumprod()
    return x0, noise, t, acp, D.add_noise(x0, noise, t, acp), D.target(prediction, x0, noise, t, acp)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_to_x0_inverts_add_noise_given_the_exact_target(prediction):
    x0, noise, t, acp, x_t, out = _noised(prediction)
    a = acp[t].float().reshape(-1, 1, 1, 1)
    got_x0, got_eps = D.to_x0(prediction, out, x_t, a)
    # x0 = (x_t - sqrt(1-a) eps) / sqrt(a) divides by sqrt(a) ~ 0.07 at t=999: float32 rounding grows
    torch.testing.assert_close(got_x0, x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_eps, noise, rtol=1e-4, atol=1e-4)
    # a Python float alpha-bar (what the Euler sampler passes) reads the same
    i = 2
    fx0, feps = D.to_x0(prediction, out[i:i + 1], x_t[i:i + 1], float(acp[t[i]]))
    torch.testing.assert_close(fx0, x0[i:i + 1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feps, noise[i:i + 1], rtol=1e-5, atol=1e-5)


class FakeUNet(torch.nn.Module):
    """Any function of (x_t, t, context, y) that is not the identity; records its inputs."""

    def forward(self, x, t, context, y=None):
        self.seen = (x, t, context, y)
        return torch.tanh(x) * (1 + t.float().reshape(-1, 1, 1, 1) / 1000) + context.mean((1, 2)).reshape(-1, 1, 1, 1)


def _hand_written_error(prediction, x0, noise, t, context):
    a = D.alphas_cumprod()[t].float().reshape(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    goal = noise if prediction == "eps" else a.sqrt() * noise - (1 - a).sqrt() * x0
    pred = torch.tanh(x_t) * (1 + t.float().reshape(-1, 1, 1, 1) / 1000) + context.mean((1, 2)).reshape(-1, 1, 1, 1)
    return (pred - goal) ** 2


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_diffusion_loss_is_the_hand_written_mse(prediction):
    g = torch.Generator().manual_seed(5)
    x0, noise = torch.randn(3, 4, 6, 6, generator=g), torch.randn(3, 4, 6, 6, generator=g)
    t, context = torch.tensor([3, 400, 950]), torch.randn(3, 7, 16, generator=g)
    weights = torch.rand(3, 1, 6, 6, generator=g)
    unet = FakeUNet()
    err = _hand_written_error(prediction, x0, noise, t, context)

    loss = D.diffusion_loss(unet, x0, noise, t, context, prediction=prediction)
    torch.testing.assert_close(loss, err.mean(), rtol=1e-6, atol=1e-7)
    assert unet.seen[1] is not None and torch.equal(unet.seen[1], t) and unet.seen[3] is None

    weighted = D.diffusion_loss(unet, x0, noise, t, context, prediction=prediction, weights=weights)
    by_hand = (err * weights).sum() / (weights.sum() * x0.shape[1])
    torch.testing.assert_close(weighted, by_hand, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(weighted, loss)  # the weights do count

    summed = D.diffusion_loss(unet, x0, noise, t, context, prediction=prediction, reduction="sum")
    torch.testing.assert_close(summed, err.sum(), rtol=1e-6, atol=1e-5)
