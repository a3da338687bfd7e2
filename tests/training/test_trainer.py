"""Training on narrow random-weight checkpoints in the real layouts (tests/checkpoints.py), CPU, fp32."""
import hashlib
import json
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import minti
from checkpoints import make_diffusers_folder, make_single_file
from minti import diffusion
from minti.errors import UserError
from minti.training import memory
from minti.training.config import TrainConfig
from minti.training.data import TrainingData, load_images
from minti.training.embedding import Embedding, load_embedding
from minti.training.placeholder import token_table as table_of
from minti.training.trainer import train

RES = 64  # the narrow UNet has 3 downsamplings: 64 px -> 8x8 latents -> 1x1 at the bottom


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {
        "sd1": make_single_file(root, "sd1"),
        # the v_pred marker key is how v-prediction files announce themselves
        "sd2-v": make_single_file(root, "sd2", extra={"v_pred": torch.tensor([])}),
    }


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(3):
        arr = np.full((80, 72, 3), 235, np.uint8)
        y, x = rng.integers(0, 30, 2)
        arr[y:y + 40, x:x + 40] = (200, 30 + 40 * i, 40)
        Image.fromarray(arr).save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def sd1(ckpts):
    """One shared model for tests that only need *a* model (each uses its own token)."""
    return minti.load(ckpts["sd1"], dtype=torch.float32, device="cpu")


def cfg(images, output=None, **kw):
    base = dict(images=str(images), init="cat", steps=3, resolution=RES, save_every=0, preview_every=0,
                output=str(output) if output is not None else None)
    base.update(kw)
    return TrainConfig(**base)


def frozen(sd):
    parts = {"unet": sd.unet, "vae": sd.vae, **{f"text{i}": e for i, e in enumerate(sd.text_encoders)}}
    return {f"{p}.{k}": v.detach().clone() for p, m in parts.items() for k, v in m.state_dict().items()}


def token_table(sd):
    return table_of(sd.text_encoders[0])


@pytest.mark.parametrize("layout", ["sd1", "sd2-v", "sd1-diffusers"])
def test_a_few_steps_train_only_the_vectors_and_write_the_exact_files(layout, ckpts, images, tmp_path):
    if layout == "sd1-diffusers":
        source = make_diffusers_folder(tmp_path, "sd1")
    else:
        source = ckpts[layout]
    sd = minti.load(source, dtype=torch.float32, device="cpu")
    assert sd.prediction == ("v" if layout == "sd2-v" else "eps")
    before = frozen(sd)
    out = tmp_path / "run"
    emb = train(sd, cfg(images, out, token="<my-cat>", vectors=2, steps=4, save_every=2, preview_every=4,
                        preview_steps=2))

    # only the vectors changed; every frozen tensor is bit-identical and got no gradient
    after = frozen(sd)
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []
    assert all(not p.requires_grad and p.grad is None for m in [sd.unet, sd.vae, *sd.text_encoders]
               for p in m.parameters())
    ids = sd.tokenizers[0].tokenize_words("cat")
    init = token_table(sd)[ids[0]].float()
    assert emb.step == 4 and emb.vectors[0].shape == (2, sd.embedding_dims[0])
    assert not torch.equal(emb.vectors[0][0], init) and torch.isfinite(emb.vectors[0]).all()

    losses = [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in losses)

    # the exact layouts
    st = load_file(out / "my-cat.safetensors")
    assert list(st) == ["emb_params"] and st["emb_params"].dtype == torch.float32
    assert torch.equal(st["emb_params"], emb.vectors[0])
    pt = torch.load(out / "my-cat.pt", weights_only=True)
    assert pt["string_to_token"] == {"*": 265} and list(pt["string_to_param"]) == ["*"]
    assert torch.equal(pt["string_to_param"]["*"], emb.vectors[0]) and pt["name"] == "<my-cat>" and pt["step"] == 4
    if layout == "sd1-diffusers":
        assert pt["sd_checkpoint"] is None and pt["sd_checkpoint_name"] == source.name
    else:
        assert pt["sd_checkpoint"] == hashlib.sha256(source.read_bytes()).hexdigest()[:10]
        assert pt["sd_checkpoint_name"] == source.stem
    assert list(load_file(out / "learned_embeds.safetensors")) == ["<my-cat>"]
    assert list(load_file(out / "my-cat-2.safetensors")) == ["emb_params"]
    assert not (out / "my-cat-4.safetensors").exists()  # the final save is my-cat.safetensors itself
    assert sorted(p.name for p in (out / "previews").iterdir()) == ["my-cat-00000.png", "my-cat-00004.png"]
    record = json.loads((out / "config.json").read_text())
    assert record["config"]["token"] == "<my-cat>" and record["config"]["vectors"] == 2
    assert record["identity"]["prediction"] == sd.prediction
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["step"] == 4
    # AdamW state exists for the N x dim vectors only, never for the 49408-row table
    shapes = [tuple(s["exp_avg"].shape) for s in state["optimizer"]["state"].values()]
    assert shapes == [(2, sd.embedding_dims[0])]


def test_diffusers_load_textual_inversion_reads_trained_files(sd1, images, tmp_path):
    from diffusers.loaders import TextualInversionLoaderMixin
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from test_embedding import clip_tokenizer_files, loaded_rows

    emb = train(sd1, cfg(images, tmp_path, token="<my-dl>", vectors=3, steps=1))
    folder = clip_tokenizer_files(tmp_path)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=sd1.embedding_dims[0], intermediate_size=64,
                            num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77)

    class Pipe(TextualInversionLoaderMixin):  # see test_embedding.tiny_pipe for why not a full pipeline
        hf_device_map = None
        components = {}

        def __init__(self):
            self.tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
            self.text_encoder = CLIPTextModel(config)

    for file, token in [("my-dl.pt", None), ("learned_embeds.safetensors", None), ("my-dl.safetensors", "my-dl")]:
        pipe = Pipe()
        pipe.load_textual_inversion(str(tmp_path / file), token=token)
        assert torch.equal(loaded_rows(pipe, token or "<my-dl>", 3), emb.vectors[0]), file


def run_steps(ckpt, images, out, steps, resume=None):
    sd = minti.load(ckpt, dtype=torch.float32, device="cpu")  # a fresh process would load afresh
    return train(sd, cfg(images, out, token="<r>", vectors=2, steps=steps, lr=2e-2, batch_size=2, grad_accum=2,
                         lr_schedule="cosine", warmup_steps=1, flip=True, crop="random", random_crops=2,
                         resume=str(out) if resume else None))


def test_resume_continues_exactly_where_an_uninterrupted_run_would_be(ckpts, images, tmp_path):
    straight = run_steps(ckpts["sd1"], images, tmp_path / "a", 4)
    half = run_steps(ckpts["sd1"], images, tmp_path / "b", 2)
    assert half.step == 2 and not torch.equal(half.vectors[0], straight.vectors[0])
    resumed = run_steps(ckpts["sd1"], images, tmp_path / "b", 4, resume=True)
    assert resumed.step == 4
    torch.testing.assert_close(resumed.vectors[0], straight.vectors[0], rtol=0, atol=1e-6)
    log_a = [json.loads(x)["loss"] for x in (tmp_path / "a" / "loss.jsonl").read_text().splitlines()]
    log_b = [json.loads(x)["loss"] for x in (tmp_path / "b" / "loss.jsonl").read_text().splitlines()]
    assert log_b == pytest.approx(log_a, abs=1e-6)


def test_same_seed_is_bit_reproducible_and_another_seed_is_not(sd1, images):
    a = train(sd1, cfg(images, token="<s1>", seed=3, lr=1e-2))
    b = train(sd1, cfg(images, token="<s2>", seed=3, lr=1e-2))
    c = train(sd1, cfg(images, token="<s3>", seed=4, lr=1e-2))
    assert torch.equal(a.vectors[0], b.vectors[0]) and not torch.equal(a.vectors[0], c.vectors[0])


def test_sigint_saves_the_current_state_and_returns_a_loadable_embedding(sd1, images, tmp_path):
    def interrupt(info):
        if info.step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # the real handler, as from Ctrl-C

    old = signal.getsignal(signal.SIGINT)
    emb = train(sd1, cfg(images, tmp_path, token="<int>", steps=50), on_step=interrupt)
    assert signal.getsignal(signal.SIGINT) is old  # the handler is put back
    assert emb.step == 2
    saved = load_embedding(tmp_path / "int.safetensors")
    assert torch.equal(saved.vectors[0], emb.vectors[0])
    assert torch.load(tmp_path / "state.pt", weights_only=True)["step"] == 2
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary left behind


def test_on_step_returning_false_stops_early(sd1, images):
    emb = train(sd1, cfg(images, token="<stop>", steps=10), on_step=lambda info: info.step < 2)
    assert emb.step == 2


def test_nan_loss_stops_with_the_last_good_embedding_kept(sd1, images, tmp_path):
    # an absurd learning rate throws the vectors to 1e30 after one step; the next loss is inf/nan
    with pytest.raises(UserError, match="diverged") as e:
        train(sd1, cfg(images, tmp_path, token="<nan>", steps=5, lr=1e30))
    assert str(tmp_path) in str(e.value) and "kept the embedding of step 0" in str(e.value)
    load_embedding(tmp_path / "nan.safetensors")  # loads, so it is finite and sane: the vectors before the bad update
    assert torch.load(tmp_path / "nan.pt", weights_only=True)["step"] == 0
    assert torch.load(tmp_path / "state.pt", weights_only=True)["step"] == 0


def test_overflowing_scaled_gradients_skip_the_step_and_halve_the_scale(sd1, images, tmp_path):
    # fp16-style loss scaling on a fp32 model, started so high (2^130 > fp32 max) that the scaled
    # loss and its gradients are inf: every step must be skipped, untouched vectors, scale halving
    emb = train(sd1, cfg(images, tmp_path, token="<ovf>", steps=3, loss_scale=2.0 ** 130))
    log = [json.loads(x) for x in (tmp_path / "loss.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in log] == [True, True, True]
    assert [r["loss_scale"] for r in log] == [2.0 ** 129, 2.0 ** 128, 2.0 ** 127]
    assert all(np.isfinite(r["loss"]) for r in log)  # the unscaled loss itself was fine
    init = token_table(sd1)[sd1.tokenizers[0].tokenize_words("cat")[0]].float()
    assert torch.equal(emb.vectors[0][0], init)
    # and from a sane scale the same run trains normally
    ok = train(sd1, cfg(images, token="<ovf2>", steps=2, loss_scale=2.0 ** 10))
    assert not torch.equal(ok.vectors[0][0], init)


def test_every_option_runs_together(sd1, images, tmp_path):
    rgba = tmp_path / "rgba"
    rgba.mkdir()
    arr = np.zeros((64, 64, 4), np.uint8)
    arr[16:48, 16:48] = (30, 90, 200, 255)
    Image.fromarray(arr).save(rgba / "cut.png")
    (rgba / "cut.txt").write_text("on a table")
    tpl = tmp_path / "t.txt"
    tpl.write_text("[name] painted, [filewords]\n")
    emb = train(sd1, cfg(rgba, tmp_path / "out", token="<all>", steps=3, batch_size=2, grad_accum=2,
                         max_grad_norm=0.01, lr="0.01:1, 0.001", alpha_mask=True, latent_sampling="sample",
                         crop="random", flip=True, template=str(tpl), weight_decay=0.01))
    log = [json.loads(x) for x in (tmp_path / "out" / "loss.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in log] == [0.01, 0.001, 0.001]
    assert emb.step == 3 and all(np.isfinite(r["loss"]) for r in log)


def test_bad_inputs_are_clear_errors(sd1, images, tmp_path):
    cases = [
        (dict(token="<v0>", vectors=0), "outside 1-75"),
        (dict(token="<v76>", vectors=76), "outside 1-75"),
        (dict(token="<i0>", init="   "), "tokenizes to nothing"),
        (dict(token="cat"), "vocabulary word"),
        (dict(token="<res>", resolution=100), "multiple of 64"),
    ]
    for kw, message in cases:
        with pytest.raises(UserError, match=message):
            train(sd1, cfg(images, **kw))
    with pytest.raises(UserError, match="missing does not exist"):
        train(sd1, cfg(tmp_path / "missing", token="<img>"))
    wrong = tmp_path / "wide.safetensors"
    Embedding("<w>", [torch.zeros(2, 16)]).save(wrong)
    with pytest.raises(UserError, match="wide.safetensors holds \\[16\\]-wide"):
        train(sd1, cfg(images, token="<w>", init=str(wrong)))


def test_init_from_an_embedding_file_and_from_several_words(sd1, images, tmp_path):
    src = Embedding("<src>", [torch.arange(3 * 32, dtype=torch.float32).reshape(3, 32)])
    src.save(tmp_path / "src.pt")
    emb = train(sd1, cfg(images, token="<from-file>", init=str(tmp_path / "src.pt"), steps=0))
    assert torch.equal(emb.vectors[0], src.vectors[0])  # steps=0: the init itself
    words = sd1.tokenizers[0].tokenize_words("fluffy orange cat")
    emb = train(sd1, cfg(images, token="<spread>", init="fluffy orange cat", vectors=5, steps=0))
    table = token_table(sd1)
    # A1111's rule: vector i takes init row i*len//n
    assert all(torch.equal(emb.vectors[0][i], table[words[i * len(words) // 5]]) for i in range(5))


def test_resume_refuses_another_token_or_model_and_a_fresh_run_does_not_overwrite(sd1, images, tmp_path):
    train(sd1, cfg(images, tmp_path, token="<mine>", steps=1))
    with pytest.raises(UserError, match="already holds a training run"):
        train(sd1, cfg(images, tmp_path, token="<mine>", steps=1))
    with pytest.raises(UserError, match="trained token '<mine>'"):
        train(sd1, cfg(images, tmp_path, token="<other>", steps=2, resume=str(tmp_path)))
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    state["model"]["hash"] = "0000000000"  # as if it had been trained on another file
    torch.save(state, tmp_path / "state.pt")
    with pytest.raises(UserError, match="another model"):
        train(sd1, cfg(images, tmp_path, token="<mine>", steps=2, resume=str(tmp_path)))


def test_resuming_a_run_already_at_its_steps_says_so_and_rewrites_nothing(sd1, images, tmp_path):
    train(sd1, cfg(images, tmp_path, token="<done>", steps=2))
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.iterdir()}
    for steps in (2, 1):
        with pytest.raises(UserError, match=f"already at step 2 and --steps {steps} asks for no more: pass --steps "
                                            "larger than 2"):
            train(sd1, cfg(images, tmp_path, token="<done>", steps=steps, resume=str(tmp_path)))
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.iterdir()} == before


def heldout_loss(sd, latent, vectors, offset, prompt, n=8, seed=99):
    """The denoising loss of one image on fixed (timestep, noise) pairs never used in training."""
    g = torch.Generator().manual_seed(seed)
    x0 = latent.unsqueeze(0).repeat(n, 1, 1, 1)
    noise, t = torch.randn(x0.shape, generator=g), torch.randint(0, 1000, (n,), generator=g)
    acp = diffusion.alphas_cumprod().float()
    extra = [torch.cat([v.new_zeros(offset, v.shape[1]), v]) for v in vectors]
    with torch.no_grad():
        context, _ = sd.encode_tokens(sd.tokenize([prompt] * n), extra)
        pred = sd.unet(diffusion.add_noise(x0, noise, t, acp), t, context)
    return float(((pred - noise) ** 2).mean())


def test_training_on_one_image_lowers_its_heldout_denoising_loss(sd1, tmp_path):
    folder = tmp_path / "one"
    folder.mkdir()
    arr = np.full((64, 64, 3), 240, np.uint8)
    arr[16:48, 16:48] = (220, 40, 40)
    Image.fromarray(arr).save(folder / "a.png")
    (tmp_path / "t.txt").write_text("a photo of [name]\n")
    data = TrainingData(load_images(folder), 64, ["[name]"], "<learn>")
    data.encode(sd1)
    latent = data.latents[0]
    config = cfg(folder, token="<learn>", steps=30, lr=5e-2, template=str(tmp_path / "t.txt"))
    emb = train(sd1, config)
    offset = sd1.tokenizers[0].placeholders["<learn>"][0] - sd1.tokenizers[0].vocab_size
    init = train(sd1, cfg(folder, token="<learn>", steps=0, template=str(tmp_path / "t.txt")))
    before = heldout_loss(sd1, latent, init.vectors, offset, "a photo of <learn>")
    after = heldout_loss(sd1, latent, emb.vectors, offset, "a photo of <learn>")
    # a random step of the same length, to show the drop comes from the gradient, not from moving
    delta = emb.vectors[0] - init.vectors[0]
    rnd = torch.randn(delta.shape, generator=torch.Generator().manual_seed(7))
    moved = heldout_loss(sd1, latent, [init.vectors[0] + rnd / rnd.norm() * delta.norm()], offset,
                         "a photo of <learn>")
    # measured on this narrow random model: seeds 0-2 give after/before 0.974-0.981, a random
    # move 0.995; lr=0 gives exactly 1.0
    assert after < 0.99 * before and after < moved


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_train_fp32_vectors_and_stay_frozen(ckpts, images, tmp_path, dtype):
    sd = minti.load(ckpts["sd1"], dtype=dtype, device="cpu")
    before = frozen(sd)
    emb = train(sd, cfg(images, tmp_path, token="<half>", steps=2))
    after = frozen(sd)
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert emb.vectors[0].dtype == torch.float32 and torch.isfinite(emb.vectors[0]).all()
    log = [json.loads(x) for x in (tmp_path / "loss.jsonl").read_text().splitlines()]
    # fp16 turns dynamic loss scaling on by default; bf16 has fp32's range and needs none
    assert [r["loss_scale"] for r in log] == ([2.0 ** 16] * 2 if dtype == torch.float16 else [None, None])


def test_sdxl_trains_both_encoders_and_saves_clip_l_clip_g(images, tmp_path):
    sd = minti.load(make_single_file(tmp_path, "sdxl"), dtype=torch.float32, device="cpu")
    emb = train(sd, cfg(images, tmp_path / "run", token="<xl>", vectors=2, steps=2))
    assert [tuple(v.shape) for v in emb.vectors] == [(2, d) for d in sd.embedding_dims]
    st = load_file(tmp_path / "run" / "xl.safetensors")
    assert sorted(st) == ["clip_g", "clip_l"] and torch.equal(st["clip_g"], emb.vectors[1])
    assert not (tmp_path / "run" / "xl.pt").exists()


def test_minti_train_is_the_training_function_in_any_import_order(sd1, images):
    import minti.training.trainer  # noqa: F401  (the module is `trainer`, so nothing shadows minti.train)

    emb = minti.train(sd1, cfg(images, token="<callable>", steps=0))
    assert isinstance(emb, minti.Embedding) and emb.step == 0


def test_every_memory_mode_trains_to_the_same_vectors(ckpts, images):
    # on the CPU, auto without a budget is fast: a --vram halfway between what low and fast need
    # makes it recompute some blocks, so that fast (none), low (all) and auto (some) differ
    sd = minti.load(ckpts["sd1"], dtype=torch.float32, device="cpu")
    costs = memory.attributed_costs(sd, RES, 1)
    every = frozenset(range(costs.n_blocks))
    low = memory.need_bytes(memory.traced_peak(sd, RES, 1, every), costs.weights)
    fast = memory.need_bytes(costs.peak(frozenset()), costs.weights)
    results, recomputed = {}, {}
    for mode, vram in (("fast", None), ("low", None), ("auto", (low + fast) / 2 / memory.GiB)):
        sd = minti.load(ckpts["sd1"], dtype=torch.float32, device="cpu")
        emb = train(sd, cfg(images, token="<mem>", memory=mode, vram=vram, steps=3))
        results[mode], recomputed[mode] = emb.vectors[0], sd.unet.recompute
    assert recomputed["fast"] == frozenset() and recomputed["low"] == every
    assert frozenset() < recomputed["auto"] < every, sorted(recomputed["auto"])
    ref = results["fast"]
    for mode in ("low", "auto"):
        assert (results[mode] - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_unknown_memory_mode_is_a_user_error(sd1, images):
    with pytest.raises(UserError, match="memory mode"):
        train(sd1, cfg(images, token="<memx>", memory="tiny"))


def test_loss_scaling_does_not_skip_a_diverged_run_forever(sd1, images, tmp_path):
    # lr 1e30 throws the vectors to 1e30 after step 1; from there every loss is inf/nan. Under
    # loss scaling (fp16's, here on fp32 from 8) steps 2-4 are skipped halving the scale to 1,
    # and the next non-finite step is divergence: the run ends with step 0's vectors kept.
    with pytest.raises(UserError, match="non-finite at step 5") as e:
        train(sd1, cfg(images, tmp_path, token="<sc>", steps=50, lr=1e30, loss_scale=8.0))
    assert "kept the embedding of step 0" in str(e.value)
    log = [json.loads(x) for x in (tmp_path / "loss.jsonl").read_text().splitlines()]
    assert [(r["skipped"], r["loss_scale"]) for r in log] == [(False, 8.0), (True, 4.0), (True, 2.0), (True, 1.0)]
    assert torch.load(tmp_path / "sc.pt", weights_only=True)["step"] == 0
