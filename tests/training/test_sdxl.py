"""SDXL training on the narrow SDXL-layout model (tests/checkpoints.py), CPU: each text encoder's own
vectors, the size/crop conditioning of each image, previews, resume, dtypes, layouts and the file
that diffusers' SDXL pipeline loads."""
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import minti
from checkpoints import diffusers_models, make_diffusers_folder, make_single_file, write_tokenizer
from minti import sampling
from minti.errors import UserError
from minti.training.config import TrainConfig
from minti.training.embedding import Embedding
from minti.training.placeholder import initial_vectors, token_table
from minti.training.setup import training_resolution
from minti.training.trainer import train

RES = 64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def xl_file(tmp_path_factory):
    return make_single_file(tmp_path_factory.mktemp("xl"), "sdxl")


@pytest.fixture(scope="module")
def xl(xl_file):
    """One shared model for tests that only read it."""
    return minti.load(xl_file, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def xl_folder(tmp_path_factory):
    return make_diffusers_folder(tmp_path_factory.mktemp("xl-diffusers"), "sdxl")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two images of different sizes and shapes: a tall one and a wide one, both larger than RES."""
    folder = tmp_path_factory.mktemp("images")
    for i, (h, w) in enumerate([(96, 80), (72, 144)]):
        arr = np.full((h, w, 3), 230, np.uint8)
        arr[8:48, 10 + 20 * i:50 + 20 * i] = (190, 40 + 60 * i, 30)
        Image.fromarray(arr).save(folder / f"{i}.png")
    return folder


def cfg(images, output=None, **kw):
    base = dict(images=str(images), init="cat", steps=2, resolution=RES, save_every=0, preview_every=0,
                output=str(output) if output is not None else None)
    base.update(kw)
    return TrainConfig(**base)


def load(path, dtype=torch.float32):
    return minti.load(path, dtype=dtype, device="cpu")


def test_sdxl_trains_at_1024_by_default(xl):
    assert training_resolution(xl, TrainConfig(images="x")) == 1024


def test_each_text_encoder_starts_from_the_init_words_in_its_own_token_table(xl):
    sd = xl
    vectors = initial_vectors(sd, "cat dog", 2)
    for tokenizer, encoder, v in zip(sd.tokenizers, sd.text_encoders, vectors):
        ids = tokenizer.tokenize_words("cat dog")
        assert len(ids) == 2 and v.dtype == torch.float32
        torch.testing.assert_close(v, token_table(encoder)[ids].float(), rtol=0, atol=0)
    assert [tuple(v.shape) for v in vectors] == [(2, 32), (2, 32)]
    assert not torch.equal(vectors[0], vectors[1])  # CLIP-L's rows are not bigG's


def test_time_ids_come_from_each_images_original_size_and_crop(xl_file, images, sdxl_conditioning_seen):
    sd = load(xl_file)
    calls, batches = sdxl_conditioning_seen(sd)
    train(sd, cfg(images, token="<ids>", steps=3, batch_size=2, crop="random", random_crops=2, flip=True))
    assert len(calls) == len(batches) == 6
    # what the images are: (96, 80) resized to 76x64 (tall: top varies), (72, 144) to 64x128 (wide)
    sizes = {0: (96, 80), 1: (72, 144)}
    resized_w = {0: 64, 1: 128}
    for (original, crop, target), v in zip(calls, batches):
        assert original == sizes[v.image] and target == (RES, RES)
        left = resized_w[v.image] - RES - v.left if v.flip else v.left
        assert crop == (v.top, left)
    assert len({c[:2] for c in calls}) > 2  # not one constant


def test_an_sdxl_embedding_file_continues_and_the_other_family_is_one_clear_error(xl, tmp_path):
    sd = xl
    start = Embedding("<prev>", [torch.randn(3, 32), torch.randn(3, 32)])
    start.save(tmp_path / "prev.safetensors")
    vectors = initial_vectors(sd, str(tmp_path / "prev.safetensors"), None)
    assert all(torch.equal(a, b) for a, b in zip(vectors, start.vectors))
    Embedding("<sd1>", [torch.randn(2, 768)]).save(tmp_path / "sd1.safetensors")
    with pytest.raises(UserError) as e:
        initial_vectors(sd, str(tmp_path / "sd1.safetensors"), None)
    message = str(e.value)
    assert "\n" not in message and "sd1.safetensors" in message
    assert "holds [768]-wide (SD 1.x) vectors but this SDXL model" in message
    sd1 = load(make_single_file(tmp_path, "sd1"))
    Embedding("<xl>", [torch.randn(2, 768), torch.randn(2, 1280)]).save(tmp_path / "xl.safetensors")
    with pytest.raises(UserError, match=r"\(SDXL: clip_l \[N, 768\] \+ clip_g \[N, 1280\]\) vectors but this SD 1.x"):
        initial_vectors(sd1, str(tmp_path / "xl.safetensors"), None)


def test_previews_decode_with_the_unet_and_text_encoders_off_the_device(xl_file, images, tmp_path, monkeypatch):
    sd = load(xl_file)
    events = []

    def record(name, module):
        real_to = module.to
        monkeypatch.setattr(module, "to", lambda *a, **k: (events.append((name, str(a[0]))), real_to(*a, **k))[1])

    for name, module in [("unet", sd.unet), ("text", sd.text_encoders[0]), ("text_2", sd.text_encoders[1])]:
        record(name, module)
    real_decode = sd.decode_latents
    monkeypatch.setattr(sd, "decode_latents", lambda z: (events.append(("decode", sd.vae is not None)),
                                                          real_decode(z))[1])
    monkeypatch.setattr(sampling, "HOST", torch.device("cpu"))
    train(sd, cfg(images, tmp_path, token="<pv>", steps=1, preview_every=1, preview_steps=2))
    previews = sorted((tmp_path / "previews").glob("*.png"))
    assert [p.name for p in previews] == ["pv-00000.png", "pv-00001.png"]
    assert all(Image.open(p).size == (RES, RES) for p in previews)
    one_preview = [("unet", "cpu"), ("text", "cpu"), ("text_2", "cpu"), ("decode", True),
                   ("unet", "cpu"), ("text", "cpu"), ("text_2", "cpu")]  # back to sd.device (the CPU here)
    assert events == one_preview * 2
    assert sd.vae is not None  # loaded before training, so it is back after


def run_steps(path, images, out, steps, resume=False):
    sd = load(path)  # a fresh process would load afresh
    return train(sd, cfg(images, out, token="<r>", vectors=2, steps=steps, lr=2e-2, grad_accum=2,
                         flip=True, crop="random", random_crops=2, resume=str(out) if resume else None))


def test_sdxl_resumed_run_ends_with_the_uninterrupted_runs_vectors(xl_file, images, tmp_path):
    straight = run_steps(xl_file, images, tmp_path / "a", 4)
    half = run_steps(xl_file, images, tmp_path / "b", 2)
    assert half.step == 2 and not torch.equal(half.vectors[1], straight.vectors[1])
    resumed = run_steps(xl_file, images, tmp_path / "b", 4, resume=True)
    for a, b in zip(resumed.vectors, straight.vectors):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.slow  # bf16 convolutions on the CPU: about a minute each on a shared core
@pytest.mark.parametrize("layout", ["single", "diffusers"])
def test_sdxl_loads_in_fp16_and_trains_in_bf16_from_a_file_or_a_folder(layout, xl_file, xl_folder, images, tmp_path):
    source = xl_file if layout == "single" else xl_folder
    half = load(source, torch.float16)  # fp16 matmuls on the CPU are slow: loading is what differs
    assert half.unet.input_blocks[0][0].weight.dtype == torch.float16
    assert next(half.vae.parameters()).dtype == torch.float32  # SDXL's VAE overflows in fp16
    context, pooled = half.encode_text(["a photo of a cat"])
    assert context.shape == (1, 77, 64) and pooled.shape == (1, 32) and torch.isfinite(context).all()
    del half
    sd = load(source, torch.bfloat16)
    assert sd.unet.input_blocks[0][0].weight.dtype == torch.bfloat16
    before = {k: v.clone() for k, v in sd.unet.state_dict().items()}
    emb = train(sd, cfg(images, tmp_path, token="<half>", steps=1))
    assert all(torch.equal(v, sd.unet.state_dict()[k]) for k, v in before.items())
    st = load_file(tmp_path / "half.safetensors")
    assert sorted(st) == ["clip_g", "clip_l"]
    for key, v in zip(("clip_l", "clip_g"), emb.vectors):
        assert st[key].dtype == torch.float32 and torch.isfinite(st[key]).all() and torch.equal(st[key], v)


def test_the_saved_file_loads_into_diffusers_sdxl_pipeline_with_the_same_rows(xl_folder, images, tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    emb = train(load(xl_folder), cfg(images, tmp_path / "run", token="<my-cat>", vectors=3, steps=1))
    tokenizers = [CLIPTokenizer(str(f / "vocab.json"), str(f / "merges.txt"))
                  for f in (write_tokenizer(tmp_path / "tok"), write_tokenizer(tmp_path / "tok2"))]
    m = diffusers_models("sdxl")
    pipe = StableDiffusionXLPipeline(vae=m["vae"], text_encoder=m["text_encoder"], text_encoder_2=m["text_encoder_2"],
                                     tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=m["unet"],
                                     scheduler=DDIMScheduler())
    # the README's snippet
    state = load_file(tmp_path / "run" / "my-cat.safetensors")
    pipe.load_textual_inversion(state["clip_l"], token="<my-cat>", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token="<my-cat>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    names = ["<my-cat>", "<my-cat>_1", "<my-cat>_2"]
    for tokenizer, encoder, vectors in [(pipe.tokenizer, pipe.text_encoder, emb.vectors[0]),
                                        (pipe.tokenizer_2, pipe.text_encoder_2, emb.vectors[1])]:
        rows = encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(names)].detach()
        torch.testing.assert_close(rows, vectors, rtol=0, atol=0)
