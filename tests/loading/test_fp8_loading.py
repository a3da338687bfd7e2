"""minti.load(weights="fp8") on narrow checkpoints in the real layouts (tests/checkpoints.py):
what is quantised, how close the outputs stay, that loading never holds a full-precision copy
of the quantised weights, that only the new vectors get gradients, and what a meta trace counts."""
import weakref

import pytest
import torch

import minti
from checkpoints import make_single_file
from minti.loading import pipeline
from minti.loading.checkpoint import Checkpoint
from minti.models.fp8 import FP8, weight_bytes
from minti.training.memtrace import MemoryTracer

pytestmark = pytest.mark.usefixtures("torch_backend")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8ckpt")
    return {"sd1": make_single_file(root, "sd1"), "sdxl": make_single_file(root, "sdxl", dtype=torch.float16)}


def quantized_keys(module: torch.nn.Module) -> set[str]:
    return {k for k, v in module.state_dict().items() if v.dtype == FP8}


def unet_and_context(sd, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, 4, 8, 8, generator=g)
    context, pooled = sd.encode_text(["a photo of a cat", "a red star"])
    y = sd.sdxl_vector(pooled, original_size=(64, 64)) if sd.family == "sdxl" else None
    with torch.no_grad():
        return sd.unet(z.to(sd.dtype), torch.tensor([10, 700]), context, y).float(), context.float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_fp8_load_quantizes_unet_and_text_linear_conv_weights_only(files, family):
    sd = minti.load(files[family], dtype=torch.float32, device="cpu", weights="fp8")
    assert sd.weights == "fp8"
    for part, module in sd.parts().items():
        assert not any(t.is_meta for t in [*module.parameters(), *module.buffers()]), part
        q = quantized_keys(module)
        if part == "vae":
            assert q == set()
            continue
        assert q and all(module.get_parameter(k).ndim >= 2 for k in q), part
        full_precision = {k for k, v in module.state_dict().items() if v.is_floating_point() and v.dtype != FP8}
        assert all(v.dtype == torch.float32 for k, v in module.state_dict().items() if k in full_precision)
        assert all(not p.requires_grad for p in module.parameters()) and not module.training


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_fp8_loaded_model_agrees_with_the_fp32_loaded_one(files, family):
    full = minti.load(files[family], dtype=torch.float32, device="cpu")
    fp8 = minti.load(files[family], dtype=torch.float32, device="cpu", weights="fp8")
    (out_full, ctx_full), (out_fp8, ctx_fp8) = unet_and_context(full), unet_and_context(fp8)
    # phase 1's tolerance for narrow random UNets (tests/models/test_fp8.py: measured 12-16% of the
    # output's max, ~30 layers compounding each weight's 2.65% rounding); the text towers are
    # 12-32 blocks deep and stay closer: measured 0.087 (sd1) and 0.094 (sdxl)
    assert rel_err(out_fp8, out_full) < 0.25
    assert rel_err(ctx_fp8, ctx_full) < 0.11
    assert rel_err(out_fp8, out_full) > 1e-4  # the weights really are rounded


def test_fp8_loading_never_holds_two_full_precision_weights_that_get_quantized(files, monkeypatch):
    """Each tensor the file yields for an fp8 layer must be gone by the time the next is read:
    at most one full-precision quantised weight alive at any moment. The full-precision load
    keeps them all until the end (one dict), which this instrument sees (it can fail)."""
    read = Checkpoint.read
    most_alive = {}

    def counting_read(self, part, names, dtype, device):
        alive: list[weakref.ref] = []
        for name, tensor in read(self, part, names, dtype, device):
            if tensor.ndim >= 2 and "embedding" not in name and name != "text_projection":
                alive = [r for r in alive if r() is not None] + [weakref.ref(tensor)]
                most_alive[part] = max(most_alive.get(part, 0), len(alive))
            yield name, tensor
            del tensor

    monkeypatch.setattr(Checkpoint, "read", counting_read)
    minti.load(files["sd1"], dtype=torch.float32, device="cpu", weights="fp8")
    assert most_alive["unet"] == 1 and most_alive["text"] == 1
    assert most_alive["vae"] > 10  # not quantised: loaded as one dict, as without fp8
    most_alive.clear()
    minti.load(files["sd1"], dtype=torch.float32, device="cpu")
    assert most_alive["unet"] > 10


def test_fp8_model_passes_gradient_to_the_new_vectors_only(files):
    sd = minti.load(files["sd1"], dtype=torch.float32, device="cpu", weights="fp8")
    sd.add_placeholder("<v>", 2)
    vectors = torch.randn(2, sd.embedding_dims[0], requires_grad=True)
    context, _ = sd.encode_text(["a photo of <v>"], extra=[vectors])
    out = sd.unet(torch.randn(1, 4, 8, 8), torch.tensor([500]), context)
    out.square().mean().backward()
    assert vectors.grad is not None and vectors.grad.abs().sum() > 0
    assert all(p.grad is None for m in sd.parts().values() for p in m.parameters())


def test_meta_load_and_random_model_count_one_byte_per_fp8_weight(files):
    meta = minti.load(files["sd1"], dtype=torch.float16, device="meta", weights="fp8")
    full = minti.load(files["sd1"], dtype=torch.float16, device="meta")
    for part in ("unet", "text"):
        q = quantized_keys(meta.parts()[part])
        n = sum(v.numel() for k, v in full.parts()[part].state_dict().items() if k in q)
        assert weight_bytes(meta.parts()[part])["fp8"] == n
    # the real-size model the benchmarks trace: SD 1.5's UNet has 859.5M parameters, ~all in Linear/Conv
    real = pipeline.random_model("sd1", torch.float16, "meta", weights="fp8")
    unet = weight_bytes(real.unet)
    assert 850e6 < unet["fp8"] < 859.6e6 and unet["rest"] < 2 * 10e6
    assert weight_bytes(real.vae)["fp8"] == 0


def test_meta_trace_of_a_loaded_fp8_step_counts_fp8_weights_and_one_widened_layer(files):
    def traced(sd):
        with torch.device("meta"):
            z, context = torch.zeros(1, 4, 8, 8), torch.zeros(1, 77, sd.unet.cfg.context_dim, requires_grad=True)
            t = torch.zeros(1)
        with MemoryTracer([sd.unet], extra=[z, t, context]) as tracer:
            start = tracer.current_bytes
            sd.unet(z, t, context).square().mean().backward()
        return start - sum(weight_bytes(sd.unet).values()), tracer.peak_bytes - start

    fp8 = minti.load(files["sd1"], dtype=torch.float32, device="meta", weights="fp8", components=("unet",))
    full = minti.load(files["sd1"], dtype=torch.float32, device="meta", components=("unet",))
    (inputs_fp8, step_fp8), (inputs_full, step_full) = traced(fp8), traced(full)
    assert inputs_fp8 == inputs_full  # the start is exactly the fp8 weights (and scales) plus the inputs
    widest = max(p.numel() * 4 for p in fp8.unet.parameters() if p.dtype == FP8)
    assert step_fp8 <= step_full + widest


def test_weights_other_than_fp8_are_refused_naming_the_value(files):
    with pytest.raises(ValueError, match="'int8'"):
        minti.load(files["sd1"], device="meta", weights="int8")
    with pytest.raises(ValueError, match="'fp16'"):
        pipeline.random_model("sd1", device="meta", weights="fp16")
