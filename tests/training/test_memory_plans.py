"""--memory auto: per-block recompute plans chosen from one attributed meta trace must fit the
budget, recompute less as the budget grows, and report the peak a real trace of them gives."""
import dataclasses
import re

import pytest
import torch

from minti.diffusion import diffusion_loss
from minti.errors import UserError
from minti.loading.pipeline import random_model
from minti.models.unet import SD1, UNet
from minti.training import memory
from minti.training.memtrace import MemoryTracer

GiB = 2**30
RESOLUTION = 128


@pytest.fixture(scope="module")
def narrow_sd():
    """An SD 1.x model on the meta device with a narrow UNet (13 blocks) and text encoder: seconds to trace."""
    sd = random_model("sd1", torch.float16, "meta")
    unet_cfg = dataclasses.replace(SD1, model_channels=64, channel_mult=(1, 2), norm_groups=8, context_dim=128,
                                   num_heads=4, transformer_depth=(1, 1), transformer_depth_middle=1)
    text_cfg = dataclasses.replace(sd.text_encoders[0].cfg, width=128, layers=2, heads=2)
    with torch.device("meta"):
        sd.unet = UNet(unet_cfg).half().requires_grad_(False)
        sd.text_encoders = [type(sd.text_encoders[0])(text_cfg).half().requires_grad_(False)]
    return sd


def budgets_between_low_and_fast(sd, n: int = 6) -> list[int]:
    costs = memory.attributed_costs(sd, RESOLUTION, 1)
    low = memory.need_bytes(memory.traced_peak(sd, RESOLUTION, 1, frozenset(range(costs.n_blocks))), costs.weights)
    fast = memory.need_bytes(costs.peak(frozenset()), costs.weights)
    return [low + (fast - low) * i // (n - 1) for i in range(n)]


def test_auto_plans_fit_their_budget_and_a_larger_budget_never_recomputes_more(narrow_sd):
    plans = [memory.choose(narrow_sd, RESOLUTION, 1, budget) for budget in budgets_between_low_and_fast(narrow_sd)]
    costs = memory.attributed_costs(narrow_sd, RESOLUTION, 1)
    for plan in plans:
        assert memory.need_bytes(plan.peak, costs.weights) <= plan.budget
    for smaller, larger in zip(plans, plans[1:]):
        assert larger.recompute <= smaller.recompute and larger.extra_flops <= smaller.extra_flops
    assert plans[0].recompute and plans[-1].name == "fast"
    assert len({plan.recompute for plan in plans}) >= 3  # the budgets in between get plans in between


def step_peak(sd, recompute: frozenset[int]) -> int:
    """Peak bytes of one training step of `sd` recomputing the blocks in `recompute`, counted
    without the planner: the plain MemoryTracer (whose counts test_memtrace checks against bytes
    worked out by hand) over a step written here, the text encoder, the objective and its backward
    into the token's vector, on sd itself rather than the planner's meta twin."""
    token = "<independent>"
    if token not in sd.tokenizers[0].placeholders:
        sd.add_placeholder(token, 1)
    sd.unet.recompute = recompute
    with torch.device("meta"):
        vector = torch.zeros(1, sd.embedding_dims[0], requires_grad=True)
        latents = torch.zeros(1, sd.unet.cfg.in_channels, RESOLUTION // 8, RESOLUTION // 8, dtype=sd.dtype)
    ids = sd.tokenize([f"a photo of {token}"])  # on the host: the card sees them once moved to it
    try:
        with MemoryTracer([sd.unet, *sd.text_encoders], extra=[vector, latents]) as tracer:
            tokens = [t.to("meta") for t in ids]
            context, _ = sd.encode_tokens(tokens, [vector])
            noise = torch.zeros(latents.shape, device="meta")
            t = torch.zeros(1, dtype=torch.long, device="meta")
            diffusion_loss(sd.unet, latents, noise, t, context, prediction=sd.prediction).backward()
    finally:
        sd.unet.recompute = frozenset()
    return tracer.peak_bytes


def test_the_chosen_plans_peak_is_what_an_independent_trace_of_it_gives(narrow_sd):
    plans = [memory.choose(narrow_sd, RESOLUTION, 1, budget) for budget in budgets_between_low_and_fast(narrow_sd, n=4)]
    assert len({plan.recompute for plan in plans}) >= 3  # fast, and plans that recompute some blocks
    for plan in plans:
        assert plan.peak == step_peak(narrow_sd, plan.recompute), sorted(plan.recompute)


def test_the_attributed_model_matches_the_traces_of_fast_and_low(narrow_sd):
    costs = memory.attributed_costs(narrow_sd, RESOLUTION, 1)
    every = frozenset(range(costs.n_blocks))
    assert costs.n_blocks == 13 and sorted(costs.order) == list(range(13))
    assert costs.peak(frozenset()) == memory.estimate_step_bytes(narrow_sd, RESOLUTION, 1)
    low = memory.estimate_step_bytes(narrow_sd, RESOLUTION, 1, recompute=every)
    assert abs(costs.peak(every) - low) <= 0.05 * (low - costs.weights)
    # frozen weights: the backward takes input gradients only, as many FLOPs as the forward (attention 2.5x)
    assert all(f > 0 for f in costs.flops[1:]) and costs.unet_step_flops > 2 * sum(costs.flops)


def test_a_budget_even_low_cannot_fit_is_refused_with_the_numbers_and_what_would_fit(narrow_sd):
    costs = memory.attributed_costs(narrow_sd, RESOLUTION, 1)
    low = memory.traced_peak(narrow_sd, RESOLUTION, 1, frozenset(range(costs.n_blocks)))
    # half of low's activations: no plan fits (recomputing fewer blocks can peak a little below
    # low, so a budget just under low's may still find one)
    budget = memory.need_bytes((low + costs.weights) // 2, costs.weights)
    with pytest.raises(UserError) as refused:
        memory.choose(narrow_sd, RESOLUTION, 1, budget)
    message = str(refused.value)
    assert f"needs {memory.need_bytes(low, costs.weights) / GiB:.2f} GiB" in message
    assert f"but {budget / GiB:.2f} GiB is free" in message
    smaller = int(re.search(r"--resolution (\d+)", message).group(1))
    assert smaller < RESOLUTION
    assert memory.need_bytes(memory.traced_peak(narrow_sd, smaller, 1, frozenset(range(costs.n_blocks))),
                             costs.weights) <= budget
    assert "--weights fp8" in message


def test_weights_alone_over_the_budget_name_only_8_bit_weights(narrow_sd):
    costs = memory.attributed_costs(narrow_sd, RESOLUTION, 1)
    with pytest.raises(UserError, match="even --memory low does not fit") as refused:
        memory.choose(narrow_sd, RESOLUTION, 1, costs.weights)
    assert "--resolution" not in str(refused.value) and "--weights fp8" in str(refused.value)


def test_the_plan_is_logged_in_one_line_with_blocks_peak_budget_and_flops(narrow_sd):
    budget_gib = budgets_between_low_and_fast(narrow_sd)[2] / GiB
    plan = memory.apply(narrow_sd, "auto", RESOLUTION, 1, vram_gib=budget_gib)
    assert narrow_sd.unet.recompute == plan.recompute
    n, peak, free, extra = re.fullmatch(r"memory: recompute (\d+) of 13 UNet blocks, modelled peak (\d+\.\d\d) GiB "
                                        r"of (\d+\.\d\d) free, \+(\d+)% UNet FLOPs", plan.describe()).groups()
    assert int(n) == len(plan.recompute) > 0 and peak == f"{plan.peak / GiB:.2f}" and free == f"{budget_gib:.2f}"
    assert int(extra) == round(100 * plan.extra_flops / plan.unet_step_flops) > 0


def test_on_the_cpu_without_a_budget_auto_is_fast_and_traces_nothing(narrow_sd, monkeypatch):
    monkeypatch.setattr(memory, "attributed_costs", lambda *a: pytest.fail("no budget: nothing to trace"))
    plan = memory.apply(narrow_sd, "auto", RESOLUTION, 1)
    assert plan.name == "fast" and narrow_sd.unet.recompute == frozenset()
    assert plan.describe() == ("memory: recompute 0 of 13 UNet blocks (fast; not modelled: no GPU memory to plan "
                               "against, see --vram)")
    assert memory.apply(narrow_sd, "low", RESOLUTION, 1).name == "low" and narrow_sd.unet.checkpointing


def test_on_cuda_the_budget_is_free_memory_plus_what_the_model_already_holds(narrow_sd, monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (3 * GiB, 8 * GiB))
    monkeypatch.setattr(narrow_sd, "device", torch.device("cuda"))
    assert memory.budget_bytes(narrow_sd, None) == 3 * GiB  # meta weights hold nothing on the card
    assert memory.budget_bytes(narrow_sd, 6.5) == int(6.5 * GiB)
