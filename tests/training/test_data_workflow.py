"""The training-data workflow end to end on narrow random-weight models (CPU, fp32): buckets in
training and previews, SDXL's size conditioning per bucket, norm control after every step,
report.html and the PNG card, templates refused at start, and resume with all of it on."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import minti
from checkpoints import make_single_file
from minti.errors import UserError
from minti.training.config import TrainConfig
from minti.training.data import TrainingData
from minti.training.embedding import load_embedding
from minti.training.norm import median_norm
from minti.training.placeholder import initial_vectors, token_table
from minti.training.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")

RES = 128  # the smallest resolution with more than one bucket (64x192, 128x128, 192x64, ...)


@pytest.fixture(scope="module")
def sd1_file(tmp_path_factory):
    return make_single_file(tmp_path_factory.mktemp("sd1"), "sd1")


@pytest.fixture(scope="module")
def sd1(sd1_file):
    return minti.load(sd1_file, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two square-ish images, one tall (1:2) and one wide (2:1), with tag captions."""
    folder = tmp_path_factory.mktemp("images")
    for i, (name, (h, w)) in enumerate({"a": (140, 130), "b": (128, 128), "tall": (260, 130), "wide": (128, 256)}.items()):
        arr = np.full((h, w, 3), 225, np.uint8)
        arr[h // 4:h // 2, w // 4:w // 2] = (200, 40 + 50 * i, 30)
        Image.fromarray(arr).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"orange, box {i}, white background, studio light")
    return folder


def cfg(images, output=None, **kw):
    base = dict(images=str(images), init="cat", steps=2, resolution=RES, batch_size=2, save_every=0,
                preview_every=0, buckets=True, output=str(output) if output is not None else None)
    base.update(kw)
    return TrainConfig(**base)


def test_bucketed_run_batches_one_bucket_previews_the_main_one_and_writes_report_and_card(sd1, images, tmp_path,
                                                                                            monkeypatch):
    seen = []
    real_batch = TrainingData.batch

    def spy(self, first, size):
        out = real_batch(self, first, size)
        seen.append((tuple(out[0].shape), {v.target_size for v in out[3]}))
        return out

    monkeypatch.setattr(TrainingData, "batch", spy)
    out = tmp_path / "run"
    emb = train(sd1, cfg(images, out, token="<bk>", steps=3, preview_every=2, preview_steps=1, png_card=True,
                         shuffle_tags=True, tag_dropout=0.3, keep_tokens=1))
    assert len(seen) == 3
    for shape, targets in seen:
        (h, w), = targets  # one bucket per batch
        assert shape == (2, 4, h // 8, w // 8)
    assert {t for _, ts in seen for t in ts} <= {(128, 128), (192, 64), (64, 192)}
    # previews at the bucket most images are in (the square here), before step 1, at 2 and at the end
    previews = sorted((out / "previews").glob("*.png"))
    assert [p.name for p in previews] == ["bk-00000.png", "bk-00002.png", "bk-00003.png"]
    assert all(Image.open(p).size == (128, 128) for p in previews)
    page = (out / "report.html").read_text()
    assert page.count("data-step=") == 3 and len(page.split("id='loss-raw' points='")[1].split("'")[0].split()) == 3
    card = load_embedding(out / "bk.png")
    assert card.token == "bk" and card.step == 3 and torch.equal(card.vectors[0], emb.vectors[0])
    # --init accepts the card like any embedding file
    assert torch.equal(initial_vectors(sd1, str(out / "bk.png"), None)[0], emb.vectors[0])
    assert json.loads((out / "config.json").read_text())["config"]["buckets"] is True


def test_preserve_keeps_every_vector_at_the_median_norm_and_max_norm_bounds_it(sd1, images):
    median = median_norm(token_table(sd1.text_encoders[0]))
    free = train(sd1, cfg(images, token="<nf>", vectors=2, lr=0.5))
    kept = train(sd1, cfg(images, token="<np>", vectors=2, lr=0.5, norm="preserve"))
    bound = train(sd1, cfg(images, token="<nm>", vectors=2, lr=0.5, max_norm=0.5 * median))
    assert (free.vectors[0].norm(dim=1) > 2 * median).all()  # lr 0.5: without control the norms run away
    torch.testing.assert_close(kept.vectors[0].norm(dim=1), torch.full((2,), median))
    assert (bound.vectors[0].norm(dim=1) <= 0.5 * median * (1 + 1e-5)).all()


def test_sdxl_size_conditioning_gets_each_samples_bucket_and_original_size(tmp_path_factory, images,
                                                                           sdxl_conditioning_seen):
    sd = minti.load(make_single_file(tmp_path_factory.mktemp("xl"), "sdxl"), dtype=torch.float32, device="cpu")
    calls, variants = sdxl_conditioning_seen(sd)
    train(sd, cfg(images, token="<xb>", steps=4, buckets=None))  # None: on, because SDXL
    sizes = {(140, 130): (128, 128), (128, 128): (128, 128), (260, 130): (192, 64), (128, 256): (64, 192)}
    assert len(calls) == len(variants) == 8
    for (original, crop, target), v in zip(calls, variants):
        assert original == v.original_size and target == sizes[original] == v.target_size and crop == v.crop_top_left
    assert {c[2] for c in calls} != {(RES, RES)}  # not the square for everyone


def test_templates_that_never_show_the_token_stop_the_run_before_it_starts(sd1, images, tmp_path):
    glued = tmp_path / "glued.txt"
    glued.write_text("a photo of [name]\n[name]s on a table\n")
    with pytest.raises(UserError, match=r"template file .*glued\.txt: in the line '\[name\]s on a table'"):
        train(sd1, cfg(images, tmp_path / "g", token="<tg>", template=str(glued)))
    late = tmp_path / "late.txt"
    late.write_text(" ".join(["word"] * 80) + " [name]\n")
    with pytest.raises(UserError, match=r"late\.txt: the line .* after the first 75 tokens"):
        train(sd1, cfg(images, tmp_path / "l", token="<tl>", template=str(late)))
    assert not (tmp_path / "g").exists() and not (tmp_path / "l").exists()


def test_a_resumed_bucketed_run_with_tag_options_ends_where_the_uninterrupted_one_does(sd1_file, images, tmp_path):
    def run(out, steps, resume=None):
        sd = minti.load(sd1_file, dtype=torch.float32, device="cpu")
        return train(sd, cfg(images, out, token="<rs>", steps=steps, save_every=1, resume=resume, shuffle_tags=True,
                             tag_dropout=0.5, norm="preserve"))

    whole = run(tmp_path / "whole", 4)
    run(tmp_path / "part", 2)
    resumed = run(tmp_path / "part", 4, resume=tmp_path / "part")
    assert resumed.step == 4 and torch.equal(resumed.vectors[0], whole.vectors[0])
