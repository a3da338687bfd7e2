"""minti.load on narrow random checkpoints in the real layouts (tests/checkpoints.py)."""
import functools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import minti
from checkpoints import diffusers_models, make_diffusers_folder, make_single_file, single_file_from_diffusers
from checkpoints import make_state_dict as _make_state_dict
from minti.loading import families
from minti.loading.detect import CheckpointError

FAMILIES = ["sd1", "sd2", "sdxl"]
PROMPTS = ["a photo of a cat", "an oil painting of a lighthouse at dusk"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One fp32 .safetensors per family, written once for this module."""
    root = tmp_path_factory.mktemp("ckpt")
    return {f: make_single_file(root, f) for f in FAMILIES}


@functools.lru_cache(maxsize=None)
def make_state_dict(family, **kw):  # the file's tensors, for comparing values (read-only here)
    return _make_state_dict(family, **kw)


def load32(path, **kw):
    return minti.load(path, dtype=torch.float32, device="cpu", **kw)


def unet_out(sd, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    context, pooled = sd.encode_text(PROMPTS)
    y = sd.sdxl_vector(pooled, (64, 64)) if sd.family == "sdxl" else None
    return sd.unet(x, torch.tensor([10, 900]), context, y)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_loads_strictly_frozen_in_eval_mode_and_runs(files, family):
    sd = load32(files[family])
    assert sd.family == family and sd.source == files[family]
    modules = [sd.unet, sd.vae, *sd.text_encoders]
    assert all(not p.requires_grad for m in modules for p in m.parameters())
    assert all(not m.training for mod in modules for m in mod.modules())
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for m in modules for p in m.parameters())
    # every tensor equals the file's (nothing left random or on meta)
    state = make_state_dict(family)
    assert torch.equal(sd.unet.state_dict()["out.2.weight"], state["model.diffusion_model.out.2.weight"])
    assert torch.equal(sd.vae.state_dict()["decoder.conv_out.bias"], state["first_stage_model.decoder.conv_out.bias"])
    context, pooled = sd.encode_text(PROMPTS)
    assert context.shape == (2, 77, {"sd1": 32, "sd2": 32, "sdxl": 64}[family])
    assert (pooled is None) == (family != "sdxl") and sd.embedding_dims == ([32, 32] if family == "sdxl" else [32])
    out = unet_out(sd)
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    z = sd.encode_image(torch.rand(1, 3, 64, 64) * 2 - 1)
    assert z.shape == (1, 4, 8, 8)
    assert sd.decode_latents(z).shape == (1, 3, 64, 64)
    assert sd.vae_scale == (0.13025 if family == "sdxl" else 0.18215)


def test_ckpt_with_state_dict_wrapper_loads_the_same_weights_as_safetensors(files, tmp_path):
    a = load32(files["sd1"])
    b = load32(make_single_file(tmp_path, "sd1", fmt="ckpt"))
    assert b.describe()["format"] == "pickle"
    for ma, mb in [(a.unet, b.unet), (a.vae, b.vae), (a.text_encoders[0], b.text_encoders[0])]:
        sa, sb = ma.state_dict(), mb.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("file_dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files_load_into_any_dtype(tmp_path, file_dtype):
    path = make_single_file(tmp_path, "sd2", dtype=file_dtype)
    half = minti.load(path, dtype=file_dtype, device="cpu")
    assert half.describe()["dtype"] == str(file_dtype).removeprefix("torch.")
    assert all(p.dtype == file_dtype for p in half.unet.parameters())
    full = load32(path)
    want = make_state_dict("sd2")["model.diffusion_model.input_blocks.1.1.proj_in.weight"].to(file_dtype).float()
    assert torch.equal(full.unet.state_dict()["input_blocks.1.1.proj_in.weight"], want)


def test_ema_true_takes_the_unet_from_model_ema_and_ema_false_ignores_it(tmp_path):
    path = make_single_file(tmp_path, "sd1", ema=True)
    state = make_state_dict("sd1", ema=True)
    plain, ema = load32(path), load32(path, ema=True)
    key = "input_blocks.1.0.in_layers.2.weight"
    assert torch.equal(plain.unet.state_dict()[key], state["model.diffusion_model." + key])
    assert torch.equal(ema.unet.state_dict()[key], state["model_ema.diffusion_modelinput_blocks10in_layers2weight"])
    assert "model_ema.* (688 keys)" in plain.describe()["ignored"]
    assert torch.equal(plain.vae.state_dict()["encoder.conv_in.weight"], ema.vae.state_dict()["encoder.conv_in.weight"])


@pytest.mark.parametrize("position_ids", ["float", "flat", None])
def test_float_flat_or_missing_position_ids_become_0_to_76(tmp_path, position_ids):
    sd = load32(make_single_file(tmp_path, "sdxl", position_ids=position_ids))
    ids = sd.text_encoders[0].state_dict()["text_model.embeddings.position_ids"]
    assert ids.dtype == torch.int64 and torch.equal(ids, torch.arange(77)[None])


def test_old_clip_names_without_text_model_prefix_load(files, tmp_path):
    old = load32(make_single_file(tmp_path, "sd1", legacy_clip_names=True))
    new = load32(files["sd1"])
    assert torch.equal(old.encode_text(PROMPTS)[0], new.encode_text(PROMPTS)[0])


def test_components_skips_parts_and_reports_them_ignored(files):
    sd = load32(files["sd1"], components=("unet", "text"))
    assert sd.vae is None and sd.unet is not None
    assert any(k.startswith("first_stage_model.") for k in sd.ignored_keys)
    with pytest.raises(RuntimeError, match="VAE"):
        sd.encode_image(torch.zeros(1, 3, 64, 64))


def test_offload_and_restore_vae(files):
    sd = load32(files["sd1"])
    vae = sd.vae
    sd.offload_vae()
    assert sd.vae is None
    sd.restore_vae("cpu")
    assert sd.vae is vae


def test_prediction_override_and_sd2_name_guess(files, tmp_path):
    assert load32(files["sd2"]).prediction_guessed
    v = make_single_file(tmp_path, "sd2", name="v2-1_768-ema-pruned.safetensors")
    sd = minti.load(v, dtype=None, device="meta")
    assert (sd.prediction, sd.prediction_guessed) == ("v", True)
    sd = minti.load(v, dtype=None, device="meta", prediction="eps")
    assert (sd.prediction, sd.prediction_guessed) == ("eps", False)
    marked = make_single_file(tmp_path, "sdxl", extra={"v_pred": torch.tensor([])})
    sd = minti.load(marked, dtype=None, device="meta")
    assert (sd.prediction, sd.prediction_guessed) == ("v", False) and "v_pred" in sd.ignored_keys


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_placeholder_ids_start_at_vocab_size_and_only_extra_gets_gradients(files, family):
    sd = load32(files[family])
    sd.add_placeholder("<cat-toy>", 2)
    tokens = sd.tokenize(["a photo of <cat-toy>"])
    for t in tokens:
        assert t[0, 4:6].tolist() == [49408, 49409]
    extra = [torch.randn(2, d, requires_grad=True) for d in sd.embedding_dims]
    context, pooled = sd.encode_tokens(tokens, extra)
    (context.square().sum() + (pooled.sum() if pooled is not None else 0)).backward()
    assert all(e.grad is not None and e.grad.abs().sum() > 0 for e in extra)
    assert all(p.grad is None for m in sd.text_encoders for p in m.parameters())
    # changing the placeholder vectors changes the conditioning; the plain prompt does not move
    assert not torch.equal(context, sd.encode_tokens(tokens, [e * 2 for e in extra])[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_size_condition_is_sdxls_vector_for_sdxl_and_no_y_for_the_others(files, family):
    sd = minti.load(files[family], dtype=torch.float32, device="cpu", components=("text",))
    assert sd.family_facts is families.FAMILIES[family]
    _, pooled = sd.encode_text(PROMPTS)
    y = sd.size_condition(pooled, original_size=(96, 64), crop=(8, 0), target_size=(64, 64))
    if family != "sdxl":
        assert pooled is None and y is None
        with pytest.raises(ValueError, match="sdxl_vector is for SDXL"):
            sd.sdxl_vector(torch.zeros(2, 4), (64, 64))
        return
    assert y.shape == (2, pooled.shape[1] + 6 * 256)
    assert torch.equal(y, sd.sdxl_vector(pooled, (96, 64), (8, 0), (64, 64)))
    assert torch.equal(y[:, :pooled.shape[1]], pooled)
    assert not torch.equal(y, sd.size_condition(pooled, original_size=(64, 64), target_size=(64, 64)))


def test_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "payload": Exploit()}, path)
    with pytest.raises(CheckpointError, match=r"evil\.ckpt: refusing to load: this pickle would run code.*safetensors"):
        minti.load(path, device="cpu")
    assert not marker.exists()


# ---- diffusers folders: minti's pipeline against diffusers/transformers on the same weights ----------

@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_folder_matches_the_reference_models(tmp_path, family):
    folder = make_diffusers_folder(tmp_path, family, prediction_type="v_prediction" if family == "sd2" else "epsilon")
    ref = diffusers_models(family)  # same seeds -> same weights as saved
    sd = load32(folder)
    assert sd.family == family and sd.describe()["format"] == "diffusers"
    assert (sd.prediction, sd.prediction_guessed) == ("v" if family == "sd2" else "eps", False)
    assert sd.tokenizers[0].source == str(folder / "tokenizer")
    tokens = sd.tokenize(PROMPTS)
    context, pooled = sd.encode_tokens(tokens)
    with torch.no_grad():
        if family == "sdxl":  # both penultimate states without final LN; pooled = bigG's projection
            h1 = ref["text_encoder"](tokens[0], output_hidden_states=True).hidden_states[-2]
            out2 = ref["text_encoder_2"](tokens[1], output_hidden_states=True)
            want, want_pooled = torch.cat([h1, out2.hidden_states[-2]], dim=-1), out2.text_embeds
            torch.testing.assert_close(pooled, want_pooled, rtol=1e-4, atol=1e-4)
        else:  # SD 1.x / 2.x (23-block OpenCLIP-H in diffusers): the last hidden state
            want = ref["text_encoder"](tokens[0]).last_hidden_state
        torch.testing.assert_close(context, want, rtol=1e-4, atol=1e-4)

        x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
        kw = {}
        y = None
        if family == "sdxl":
            kw["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": torch.tensor([[64., 64, 0, 0, 64, 64]] * 2)}
            y = sd.sdxl_vector(pooled, (64, 64), (0, 0), (64, 64))
        torch.testing.assert_close(sd.unet(x, t, context, y), ref["unet"](x, t, context, **kw).sample,
                                   rtol=1e-4, atol=1e-4)
        px = torch.rand(1, 3, 64, 64) * 2 - 1
        z = sd.encode_image(px)
        torch.testing.assert_close(z, ref["vae"].encode(px).latent_dist.mean * sd.vae_scale, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(sd.decode_latents(z), ref["vae"].decode(z / sd.vae_scale).sample,
                                   rtol=1e-4, atol=1e-4)


def test_fp16_variant_folder_and_its_single_file_give_identical_outputs(tmp_path):
    folder = make_diffusers_folder(tmp_path, "sd1", dtype=torch.float16, variant="fp16", prediction_type=None)
    assert list((folder / "unet").glob("*.fp16.safetensors"))
    single = single_file_from_diffusers(folder, tmp_path / "sd1-from-diffusers.safetensors", dtype=torch.float16)
    a, b = load32(folder), load32(single)
    assert a.describe()["dtype"] == "float16" and (a.prediction, a.prediction_guessed) == ("eps", False)
    torch.testing.assert_close(unet_out(a), unet_out(b), rtol=0, atol=0)
    px = torch.rand(1, 3, 64, 64) * 2 - 1
    assert torch.equal(a.encode_image(px), b.encode_image(px))


# ---- memory ---------------------------------------------------------------------------------------

MEMORY_SCRIPT = textwrap.dedent("""
    import sys, threading, time, torch, minti, minti.loading.pipeline
    minti.loading.pipeline._tokenizers = lambda ckpt, cfgs: []  # measure the weights only
    def anon():  # resident anonymous memory (file pages of the mmap are page cache, not ours)
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    minti.load(sys.argv[1], device="meta")  # warm up: imports and code paths allocate too
    base, peak, done = anon(), [0], False
    def sample():
        while not done:
            peak[0] = max(peak[0], anon())
            time.sleep(0.0005)
    th = threading.Thread(target=sample); th.start()
    sd = minti.load(sys.argv[1], dtype=torch.float16, device="cpu")
    done = True; th.join()
    peak[0] = max(peak[0], anon())
    print(peak[0] - base)
""")


def test_loading_an_fp16_file_does_not_hold_a_second_copy_of_the_weights(tmp_path):
    # RssAnon sampled while loading: a loader that read the whole state dict first and then
    # copied it into the model would peak near 2x the file; ours stays near 1x.
    path = make_single_file(tmp_path, "sdxl", dtype=torch.float16)
    size = path.stat().st_size
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    growth = int(out.stdout.strip().splitlines()[-1])
    assert growth < 1.3 * size, f"peak anonymous memory grew {growth / 1e6:.1f} MB for a {size / 1e6:.1f} MB file"


def test_sdxl_vae_stays_float32_when_loading_in_fp16(files):
    # SDXL's VAE overflows in fp16; the UNet and text encoders still load in fp16
    sdxl = minti.load(files["sdxl"], dtype=torch.float16, device="cpu")
    assert sdxl.vae.encoder.conv_in.weight.dtype == torch.float32
    assert sdxl.unet.time_embed[0].weight.dtype == torch.float16
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    assert sdxl.encode_image(pixels).dtype == torch.float32
    sd1 = minti.load(files["sd1"], dtype=torch.float16, device="cpu")
    assert sd1.vae.encoder.conv_in.weight.dtype == torch.float16
