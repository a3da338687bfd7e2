import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from layouts import read_layout
from tiny_build import build_tiny_module

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "weights" / "build_tiny.py"
PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")


_module = build_tiny_module


def _sd15() -> dict[str, tuple[int, ...]]:
    return read_layout("sd15")


@pytest.fixture(scope="module")
def quick_build(tmp_path_factory):
    """One --quick build in a subprocess (the build reroutes minti.models.ops for training)."""
    d = tmp_path_factory.mktemp("tiny")
    cmd = [sys.executable, str(SCRIPT), "--quick", "--out", str(d / "tiny.safetensors"), "--scratch", str(d / "scratch"),
           "--demo-dir", str(d / "demo"), "--grid", str(d / "grid.png")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    return d, cmd, run.stdout


def test_quick_build_writes_an_sd1_single_file_under_30_mb(quick_build):
    from safetensors import safe_open

    d, _, out = quick_build
    path = d / "tiny.safetensors"
    assert path.stat().st_size <= 30_000_000
    sd15 = _sd15()
    buffers = {k for k in sd15 if not k.startswith(("model.", "first_stage_model.", "cond_stage_model."))}
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        dtypes = {k: f.get_slice(k).get_dtype() for k in keys}
        token = f.get_slice("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight").get_shape()
    assert token == [49408, 64]  # the real CLIP vocabulary
    assert {k for k in keys if not k.startswith(PREFIXES)} == buffers  # the 12 DDPM schedule buffers
    # the text encoder is CLIP-L's layout with 3 layers: exactly SD 1.5's keys for layers 0-2
    text = {k for k in keys if k.startswith(PREFIXES[2])}
    want = {k for k in sd15 if k.startswith(PREFIXES[2]) and not any(f"layers.{i}." in k for i in range(3, 12))}
    assert text == want
    # UNet and VAE keys are SD 1.5 names; fewer blocks, so compare with the indices blanked
    def pattern(k):
        return re.sub(r"\.\d+(?=\.)", ".N", k)
    assert {pattern(k) for k in keys if k.startswith(PREFIXES[:2])} <= {pattern(k) for k in sd15}
    assert all(dtypes[k] == "F16" for k in keys if k.startswith(PREFIXES) and not k.endswith("position_ids"))
    assert dtypes[PREFIXES[2] + "embeddings.position_ids"] == "I64"
    assert "minti.load: family sd1" in out  # the build reloaded its file and compared outputs


def test_quick_build_file_loads_as_the_configured_model(quick_build):
    import minti

    bt = _module()
    d, _, _ = quick_build
    sd = minti.load(d / "tiny.safetensors", dtype=torch.float32, device="cpu")
    assert sd.family == "sd1" and sd.prediction == "eps" and sd.vae_scale == pytest.approx(bt.VAE_SCALE)
    assert sd.unet.cfg == bt.UNET
    assert sd.vae.cfg.ch == bt.VAE.ch and sd.vae.cfg.ch_mult == bt.VAE.ch_mult
    assert sd.vae.cfg.num_res_blocks == bt.VAE.num_res_blocks
    te = sd.text_encoders[0].cfg
    assert (te.width, te.layers, te.heads, te.vocab_size) == (bt.TEXT.width, bt.TEXT.layers, bt.TEXT.heads, 49408)
    assert sd.embedding_dims == [64]


def test_quick_build_writes_the_demo_concept_and_a_grid(quick_build):
    from PIL import Image

    from minti.demo import toy_images

    d, _, _ = quick_build
    files = sorted((d / "demo").glob("*.png"))
    assert len(files) == 5
    want = toy_images.concept_samples(5, seed=0)
    for f, s in zip(files, want):
        assert Image.open(f).size == (64, 64)
        assert Image.open(f).convert("RGB").tobytes() == s.image.tobytes()
    assert Image.open(d / "grid.png").size[0] > 64


def test_rerun_resumes_from_the_finished_stages_and_rewrites_the_same_file(quick_build):
    d, cmd, _ = quick_build
    digest = hashlib.sha256((d / "tiny.safetensors").read_bytes()).hexdigest()
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "vae 1/" not in run.stdout and "unet 1/" not in run.stdout  # nothing retrained
    assert hashlib.sha256((d / "tiny.safetensors").read_bytes()).hexdigest() == digest
    # the build's time adds up over its runs (the README reports the whole build, resumes included)
    assert json.loads((d / "scratch" / "build-time.json").read_text())["runs"] == 2


def test_a_scratch_dir_of_another_config_is_refused(quick_build, tmp_path):
    d, _, _ = quick_build
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--unet-steps", "4", "--scratch", str(d / "scratch"),
                          "--out", str(tmp_path / "x.safetensors")], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "another config" in run.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_normalised_latents_have_sd_scale_and_decode_the_same():
    bt = _module()
    torch.manual_seed(0)
    vae = bt.AutoencoderKL(bt.VAE).eval()
    from minti.demo import toy_images

    x = bt.to_pixels(torch.from_numpy(toy_images.dataset(12, seed=4)[0]).permute(0, 3, 1, 2))
    with torch.no_grad():
        before = vae.decode(vae.encode(x)[0])
        bt.normalise_latents(vae, x)
        mean, _ = vae.encode(x)
        after = vae.decode(mean)
    scaled = mean * bt.VAE_SCALE
    assert torch.allclose(scaled.mean((0, 2, 3)), torch.zeros(4), atol=1e-4)
    assert torch.allclose(scaled.std((0, 2, 3)), torch.ones(4), atol=1e-4)
    assert torch.allclose(before, after, atol=1e-4)


def test_the_gradient_guard_catches_a_backend_without_weight_gradients(monkeypatch):
    from minti.models import ops

    bt = _module()
    cfg = bt.quick(bt.BuildConfig())
    x, noise = torch.randn(2, 3, 32, 32), torch.randn(2, 4, 8, 8)
    vae = bt.AutoencoderKL(bt.VAE)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    bt.vae_step(vae, opt, x, noise, cfg, check=True)  # the real ops: every weight trains
    # a GroupNorm whose backward gives its weights no gradient (as a frozen-weight kernel does)
    plain = ops.group_norm_silu
    monkeypatch.setattr(ops, "group_norm_silu", lambda x, w, b, *a, **k: plain(x, w.detach(), b.detach(), *a, **k))
    with pytest.raises(RuntimeError, match="no gradient"):
        bt.vae_step(vae, opt, x, noise, cfg, check=True)


def test_ddpm_buffers_are_sd_scaled_linear():
    from minti.diffusion import alphas_cumprod

    bt = _module()
    b = bt.ddpm_buffers()
    assert b["betas"][0].item() == pytest.approx(0.00085, rel=1e-5)
    assert b["betas"][-1].item() == pytest.approx(0.012, rel=1e-5)
    assert torch.allclose(b["alphas_cumprod"], alphas_cumprod().float())
    assert torch.allclose(b["sqrt_one_minus_alphas_cumprod"] ** 2 + b["sqrt_alphas_cumprod"] ** 2, torch.ones(1000))
