"""Aspect-ratio buckets and caption options in the data pipeline (no model: the fake VAE of test_data)."""
import logging
import math

import numpy as np
import pytest
import torch

from minti.loading.families import FAMILIES
from minti.training.data import TrainingData, buckets_on, load_images, make_buckets, nearest_bucket
from test_data import FakeSD, save


def test_buckets_have_sides_in_multiples_of_64_and_never_more_pixels_than_the_square():
    for resolution in (128, 512, 768, 1024):
        buckets = make_buckets(resolution)
        assert (resolution, resolution) in buckets
        for h, w in buckets:
            assert h % 64 == 0 and w % 64 == 0
            assert h * w <= resolution ** 2  # the memory plan made for the square holds for every bucket
            assert h * w >= 0.7 * resolution ** 2 and max(h / w, w / h) <= 4
            assert (w, h) in buckets
    assert {(832, 1216), (1216, 832), (896, 1152), (768, 1344)} <= set(make_buckets(1024))  # SDXL's usual ones
    assert make_buckets(64) == [(64, 64)]


def test_each_image_goes_to_the_bucket_of_nearest_aspect_ratio():
    buckets = make_buckets(512)
    assert nearest_bucket(600, 600, buckets) == (512, 512)
    assert nearest_bucket(4000, 3000, buckets) == (576, 448)  # 4:3 portrait
    assert nearest_bucket(1080, 1920, buckets) == (384, 640)  # 16:9
    assert nearest_bucket(100, 5000, buckets) == (256, 1024)  # beyond 4:1: the widest


def test_buckets_default_on_for_sdxl_only():
    assert buckets_on(None, FAMILIES["sdxl"]) and not buckets_on(None, FAMILIES["sd1"])
    assert not buckets_on(None, FAMILIES["sd2"])
    assert buckets_on(True, FAMILIES["sd1"]) and not buckets_on(False, FAMILIES["sdxl"])


@pytest.fixture
def mixed(tmp_path):
    """Two square, two tall (1:2) and one wide (2:1) image, at 128 px buckets."""
    for name, (h, w) in {"sq1": (150, 150), "sq2": (130, 140), "tall1": (300, 150), "tall2": (260, 128),
                         "wide": (128, 256)}.items():
        save(tmp_path, f"{name}.png", np.full((h, w, 3), 100, np.uint8))
    return load_images(tmp_path)


def test_latents_are_cached_per_image_at_its_bucket_and_the_buckets_are_logged(mixed, caplog):
    with caplog.at_level(logging.INFO, logger="minti"):
        data = TrainingData(mixed, 128, ["[name]"], "<t>", buckets=True, crop="random", random_crops=2, flip=True)
    assert "aspect-ratio buckets (width x height: images): 64x192: 2, 128x128: 2, 192x64: 1" in caplog.text
    data.encode(FakeSD())
    by_name = {im.path.stem: i for i, im in enumerate(mixed)}
    for z, v in zip(data.latents, data.variants):
        assert v.target_size == data.targets[v.image] and z.shape[-2:] == (v.target_size[0] // 8, v.target_size[1] // 8)
    assert data.targets[by_name["tall1"]] == (192, 64) and data.targets[by_name["wide"]] == (64, 192)
    # tall1 300x150 -> 192 tall covers 64 wide: resized to 192x96 (h x w), a random crop slides along the width
    tall = [v for v in data.variants if v.image == by_name["tall1"]]
    assert all(v.top == 0 and 0 <= v.left <= 96 - 64 and v.original_size == (300, 150) for v in tall)
    assert all(v.crop_top_left == (0, 96 - 64 - v.left if v.flip else v.left) for v in tall)
    assert data.preview_size() == (128, 128) and data.preview_latent_shape() == (4, 16, 16)


def test_each_batch_holds_one_bucket_covers_every_image_each_epoch_and_depends_only_on_seed_and_step(mixed):
    make = lambda seed: TrainingData(mixed, 128, ["[name]"], "<t>", seed=seed, buckets=True, repeats=2)
    a, b, c = make(0), make(0), make(1)
    for d in (a, b, c):
        d.encode(FakeSD())
    # 2 square x 2 repeats -> 2 batches of 2; 2 tall x 2 -> 2; 1 wide x 2 -> 1: 5 batches an epoch
    batches = [a.batch(k * 2, 2) for k in range(10)]
    epoch_images = []
    for latents, prompts, weights, variants in batches:
        assert len({v.target_size for v in variants}) == 1 and latents.shape[0] == 2
        epoch_images.append(sorted(v.image for v in variants))
    for epoch in (epoch_images[:5], epoch_images[5:]):
        assert sorted(i for batch in epoch for i in batch) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    # no hidden state: a fresh copy drawing the batches in another order gets the same ones
    for k in reversed(range(10)):
        latents, prompts, _, variants = b.batch(k * 2, 2)
        assert torch.equal(latents, batches[k][0]) and prompts == batches[k][1] and variants == batches[k][3]
    assert [sorted(v.image for v in c.batch(k * 2, 2)[3]) for k in range(10)] != epoch_images
    with pytest.raises(ValueError, match="multiples of the batch size"):
        a.batch(1, 2)


def test_a_bucket_with_fewer_images_than_the_batch_repeats_them_to_fill_it(mixed):
    data = TrainingData(mixed, 128, ["[name]"], "<t>", buckets=True)
    data.encode(FakeSD())
    sizes = [tuple(v.target_size for v in data.batch(k * 4, 4)[3]) for k in range(3)]
    assert sorted(s[0] for s in sizes) == [(64, 192), (128, 128), (192, 64)]
    assert all(len(set(s)) == 1 and len(s) == 4 for s in sizes)


def test_tag_options_reach_the_prompts_and_repeat_exactly_for_the_same_seed(tmp_path, caplog):
    save(tmp_path, "a.png", np.zeros((64, 64, 3), np.uint8))
    (tmp_path / "a.txt").write_text("tag1, tag2, tag3, tag4, tag5")
    images = load_images(tmp_path)
    make = lambda: TrainingData(images, 64, ["[name], [filewords]"], "<t>", shuffle_tags=True, tag_dropout=0.25,
                                keep_tokens=1)
    a, b = make(), make()
    for d in (a, b):
        d.encode(FakeSD())
    prompts = [a.sample(i)[1] for i in range(40)]
    assert prompts == [b.sample(i)[1] for i in range(40)]
    assert all(p.startswith("<t>, tag1") for p in prompts) and len(set(prompts)) > 10
    with pytest.raises(ValueError, match="--tag-dropout 1.5"):
        TrainingData(images, 64, ["[name]"], "<t>", tag_dropout=1.5)
    with caplog.at_level(logging.WARNING, logger="minti"):
        TrainingData(images, 64, ["[name]"], "<t>", shuffle_tags=True, keep_tokens=5)
    assert "nothing is shuffled or dropped" in caplog.text
