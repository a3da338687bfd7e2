"""The samplers against diffusers' schedulers, on random tensors with a fake denoiser."""
import pytest
import torch

from minti import sampling as sampler
from minti.diffusion import alphas_cumprod


def fake_denoiser(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # Any smooth function of (x, t) exercises the step rule; this one is not linear in x.
    return torch.tanh(0.7 * x) * (t.float().reshape(-1, 1, 1, 1) / 1000.0 + 0.3) + 0.05 * x


def diffusers_loop(scheduler, x, steps, prediction):
    scheduler.set_timesteps(steps)
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        out = fake_denoiser(x_in, t.float().expand(x.shape[0]))
        x = scheduler.step(out, t, x).prev_sample
    return x


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddim_matches_diffusers_ddim_scheduler(prediction):
    from diffusers import DDIMScheduler

    ref = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                        set_alpha_to_one=False, steps_offset=1,
                        prediction_type="epsilon" if prediction == "eps" else "v_prediction")
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    expected = diffusers_loop(ref, x.clone(), 20, prediction)
    ours = sampler.ddim(fake_denoiser, x.clone(), 20, prediction)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    assert sampler.ddim_timesteps(20) == ref.timesteps.tolist()


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_euler_matches_diffusers_euler_scheduler(prediction):
    from diffusers import EulerDiscreteScheduler

    ref = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                 prediction_type="epsilon" if prediction == "eps" else "v_prediction")
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    expected = diffusers_loop(ref, x.clone(), 15, prediction)
    ours = sampler.euler(fake_denoiser, x.clone(), 15, prediction)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def test_ddim_with_an_oracle_denoiser_keeps_the_noise_and_lands_at_t0():
    # Given the true noise, every DDIM step keeps the implied noise fixed, so the result is x0
    # noised to the last timestep t=0 with the noise of x_T (SD's final alpha is acp[0], not 1).
    acp = alphas_cumprod()
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3)).clamp(-1, 1)
    xT = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))

    def oracle(x, t):
        a = acp[t.long()].float().reshape(-1, 1, 1, 1)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    out = sampler.ddim(oracle, xT, 25, "eps")
    t_first = sampler.ddim_timesteps(25)[0]
    eps = oracle(xT, torch.tensor([t_first]))
    expected = acp[0].float().sqrt() * x0 + (1 - acp[0].float()).sqrt() * eps
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert (out - x0).abs().max() < 0.15  # and that is close to the clean sample


def test_initial_noise_depends_on_the_seed_not_the_batch():
    a = sampler.initial_noise([7, 8], (4, 8, 8))
    b = sampler.initial_noise([8], (4, 8, 8))
    assert torch.equal(a[1], b[0]) and not torch.equal(a[0], a[1])


def test_bad_step_counts_are_rejected():
    with pytest.raises(ValueError):
        sampler.ddim_timesteps(0)
    with pytest.raises(ValueError):
        sampler.euler_sigmas(0, alphas_cumprod())


def test_guided_model_mixes_unconditional_and_conditional_rows_and_runs_once_unguided():
    calls = []

    def unet(x, t, context, y=None):
        calls.append(x.shape[0])
        return x * context[:, :1, :1, None] + t.reshape(-1, 1, 1, 1)

    x, t = torch.randn(2, 4, 3, 3), torch.tensor([10.0, 20.0])
    uncond, cond = torch.full((2, 5, 8), 0.5), torch.full((2, 5, 8), 2.0)
    out = sampler.guided_model(unet, torch.cat([uncond, cond]), None, 3.0)(x, t)
    expected_u, expected_c = x * 0.5 + t.reshape(-1, 1, 1, 1), x * 2.0 + t.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(out, expected_u + 3.0 * (expected_c - expected_u))
    assert calls == [4]
    torch.testing.assert_close(sampler.guided_model(unet, cond, None, 1.0)(x, t), expected_c)
    assert calls == [4, 2]
