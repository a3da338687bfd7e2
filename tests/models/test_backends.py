"""The models give the same numbers whichever backend runs the hot ops (Triton runs in its
CPU interpreter here): output and text gradient within the dtype's tolerance. And "auto"
picks the path from the device, the dtype and what each kernel takes."""
import dataclasses
import importlib

import pytest
import torch

import minti.kernels.configs as configs
import minti.kernels.launch as launch
from minti.models import backends, ops
from minti.models.clip import CLIP_L_SD1, OPENCLIP_H_SD2, build_text_encoder
from minti.models.unet import SD1, SD2, UNet


@pytest.fixture(autouse=True)
def restore_backend():
    yield
    ops.set_backend("auto")


@pytest.fixture
def triton_must_run(monkeypatch):
    """A failed Triton launch raises instead of quietly taking the torch path; returns a
    function that gives the Triton calls run so far, per op."""
    pytest.importorskip("triton")
    if not (launch.INTERPRETED or torch.cuda.is_available()):
        pytest.skip("no CUDA and TRITON_INTERPRET unset")
    monkeypatch.setattr(launch, "STRICT", True)
    return lambda: dict(launch.TRITON_RUNS)


def narrow_unet(cfg) -> UNet:
    cfg = dataclasses.replace(cfg, model_channels=32, channel_mult=(1, 2), norm_groups=8,
                              context_dim=cfg.context_dim // 16, num_heads=4,
                              head_dim=8 if cfg.head_dim else None, transformer_depth=(1, 1),
                              transformer_depth_middle=1)
    torch.manual_seed(0)
    unet = UNet(cfg).requires_grad_(False)
    for p in unet.parameters():
        p.normal_(0, 0.05)
    return unet


def run_unet(unet: UNet, backend: str):
    ops.set_backend(backend)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 8, 8, generator=g)  # small: Triton is interpreted here
    context = torch.randn(1, 77, unet.cfg.context_dim, generator=g).requires_grad_(True)
    out = unet(x, torch.tensor([300]), context)
    (grad,) = torch.autograd.grad(out.pow(2).mean(), context)
    return out.detach(), grad


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def ran_triton_both_ways(before: dict, after: dict, ops_: tuple[str, ...]) -> bool:
    """Each op ran at least one Triton forward and one Triton backward between the two counts."""
    return all(after.get(op, 0) - before.get(op, 0) >= 2 for op in ops_)


@pytest.mark.parametrize("cfg", [SD1, SD2], ids=["sd1", "sd2"])
def test_unet_output_and_text_gradient_agree_across_backends(cfg, triton_must_run):
    unet = narrow_unet(cfg)
    out_t, grad_t = run_unet(unet, "torch")
    before = triton_must_run()
    out_k, grad_k = run_unet(unet, "triton")
    assert ran_triton_both_ways(before, triton_must_run(), backends.OPS)
    assert rel(out_k, out_t) <= 1e-4 and rel(grad_k, grad_t) <= 1e-4


@pytest.mark.parametrize("preset", [CLIP_L_SD1, OPENCLIP_H_SD2], ids=["clip-l", "openclip"])
def test_text_encoder_causal_attention_agrees_across_backends(preset, triton_must_run):
    cfg = dataclasses.replace(preset, width=64, layers=2, heads=4, mlp_width=128,
                              projection_dim=32 if preset.projection_dim else None)
    torch.manual_seed(0)
    enc = build_text_encoder(cfg).requires_grad_(False)
    for name, p in enc.named_parameters():
        p.normal_(0, 0.05) if p.ndim > 1 else p.normal_(1.0 if name.endswith("weight") else 0.0, 0.05)
    tokens = torch.randint(0, 49406, (2, 77))
    extra = torch.randn(1, 64, requires_grad=True)
    tokens[:, 5] = 49408  # a placeholder: the gradient reaches `extra` through causal attention
    results = []
    before = triton_must_run()
    for backend in ("torch", "triton"):
        ops.set_backend(backend)
        hidden, _ = enc(tokens, extra_embeddings=extra)
        (grad,) = torch.autograd.grad(hidden.pow(2).mean(), extra)
        results.append((hidden.detach(), grad))
    assert ran_triton_both_ways(before, triton_must_run(), ("attention",))
    (h_t, g_t), (h_k, g_k) = results
    assert rel(h_k, h_t) <= 1e-4 and rel(g_k, g_t) <= 1e-4


class CudaLike:
    """What choose() reads of a tensor, for a CUDA device this machine does not have."""

    def __init__(self, dtype: torch.dtype, head_dim: int = 64):
        self.device, self.is_cuda, self.dtype, self.shape = torch.device("cuda"), True, dtype, (1, 8, 77, head_dim)


@pytest.mark.parametrize("limits,dtype,d,path", [
    (configs.TARGET_LIMITS["sm_86"], torch.float16, 64, "triton"),
    (configs.TARGET_LIMITS["sm_86"], torch.bfloat16, 160, "triton"),
    (configs.TARGET_LIMITS["sm_75"], torch.float32, 40, "triton"),
    (configs.TARGET_LIMITS["sm_75"], torch.bfloat16, 64, "torch"),  # no bf16 in Triton before sm_80
    (configs.DeviceLimits((6, 1), 48 * 1024), torch.float16, 64, "torch"),  # Triton emits no sm_61 code
    (configs.TARGET_LIMITS["sm_86"], torch.float64, 64, "torch"),  # no fp64 attention kernel
    (configs.TARGET_LIMITS["sm_86"], torch.float16, 256, "torch"),  # past the measured register budget
    (configs.TARGET_LIMITS["sm_86"], torch.float16, 264, "torch"),  # past any Triton tile
], ids=["sm86-fp16", "sm86-bf16-d160", "sm75-fp32-d40", "sm75-bf16", "sm61", "fp64", "d256", "d264"])
def test_auto_takes_triton_only_where_the_gpu_and_the_attention_kernel_run_the_input(monkeypatch, limits, dtype,
                                                                                      d, path):
    monkeypatch.setattr(configs, "device_limits", lambda device: limits)
    monkeypatch.setattr(launch, "HAS_TRITON", True)
    monkeypatch.setattr(launch, "INTERPRETED", False)
    monkeypatch.setattr(importlib.import_module("minti.kernels.flash_attention"), "INTERPRETED", False)
    assert backends.choose("attention", CudaLike(dtype, d)) == path
    rules_only = "torch" if backends.triton_unusable_reason("cuda", dtype) else "triton"  # the other ops
    assert backends.choose("geglu", CudaLike(dtype, d)) == rules_only
    for forced in ("torch", "triton"):  # a forced path is taken as asked (the kernel raises if it cannot)
        assert backends.choose("attention", CudaLike(dtype, d), forced) == forced
    monkeypatch.setattr(launch, "HAS_TRITON", False)
    assert backends.choose("attention", CudaLike(dtype, d)) == "torch"


def test_auto_takes_torch_on_the_cpu_and_an_unknown_backend_is_refused():
    x = torch.randn(2, 8)
    assert [backends.choose(op, x) for op in backends.OPS] == ["torch"] * 3
    with pytest.raises(ValueError, match="unknown backend"):
        backends.choose("geglu", x, "cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        ops.set_backend("cuda")
