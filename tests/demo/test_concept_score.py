import numpy as np
import pytest
import torch

from minti.demo import concept_score as cs
from minti.demo import toy_images


@pytest.fixture(scope="module")
def concept():
    return [s.image for s in toy_images.concept_samples(5, seed=0)]


def test_identical_sets_score_zero(concept):
    s = cs.concept_score(concept, concept)
    assert s.total == pytest.approx(0.0, abs=1e-9)
    assert set(s.components) == set(cs.WEIGHTS)


def test_new_images_of_the_concept_score_closer_than_other_shapes_and_colours(concept):
    same = cs.concept_score([s.image for s in toy_images.concept_samples(6, seed=1)], concept).total
    rng = np.random.default_rng(2)
    others = [toy_images.render(toy_images.sample_attributes(rng)).image for _ in range(6)]
    random = cs.concept_score(others, concept).total
    # one attribute changed at a time: each is seen
    c = toy_images.concept_attributes(np.random.default_rng(3))
    changed = {k: [toy_images.render(toy_images.perturb(c, **{k: v})).image] * 3 for k, v in
               dict(shape="star", colour="green", pattern="dotted", position="left", bg_colour="yellow",
                    size="small", background="checked").items()}
    # seeded values: same 0.24, random 8.5, one attribute changed 1.1 (background style, the
    # subtlest: same colours, other layout) to 5.6 (position)
    assert same < 0.5 and random > 4.0
    for k, images in changed.items():
        assert cs.concept_score(images, concept).total > same + 0.6, k


def test_score_grows_monotonically_as_the_shape_colour_shifts(concept):
    base = [s for s in toy_images.concept_samples(4, seed=5)]
    scores = []
    for t in (0, 15, 30, 45, 60, 90):
        imgs = []
        for s in base:
            a = np.asarray(s.image, np.float64).copy()
            a[s.mask] += np.array([-t, t, t * 0.5])  # orange drifts towards green
            imgs.append(np.clip(a, 0, 255))
        scores.append(cs.concept_score(imgs, concept))
    totals = [s.total for s in scores]
    assert all(b > a for a, b in zip(totals, totals[1:])), totals
    fg = [s.components["fg_colour"] for s in scores]
    assert all(b > a for a, b in zip(fg, fg[1:])), fg


def test_score_grows_as_the_shape_moves_away(concept):
    c = toy_images.concept_attributes(np.random.default_rng(4))
    totals = [cs.concept_score([toy_images.render(toy_images.perturb(c, dx=d)).image] * 3, concept).components["position"]
              for d in (0.0, 0.05, 0.1, 0.15)]
    assert all(b > a for a, b in zip(totals, totals[1:])), totals


def test_segmentation_recovers_the_generator_mask():
    ious = []
    for i in range(30):
        s = toy_images.generate(500 + i)
        m = cs.segment(np.asarray(s.image, np.float64))
        ious.append((m & s.mask).sum() / (m | s.mask).sum())
    assert np.mean(ious) > 0.85 and min(ious) > 0.6


def test_sampler_tensors_and_folders_score_like_pil_images(concept, tmp_path):
    arr = np.stack([np.asarray(im) for im in concept]).astype(np.float32)
    tensor = torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1
    for i, im in enumerate(concept):
        im.save(tmp_path / f"c{i}.png")
    gen = [toy_images.generate(i).image for i in range(3)]
    ref = cs.concept_score(gen, concept).total
    assert cs.concept_score(gen, tensor).total == pytest.approx(ref, abs=1e-6)
    assert cs.concept_score(gen, tmp_path).total == pytest.approx(ref, abs=1e-6)


def test_a_blank_image_scores_far_from_the_concept(concept):
    blank = [np.full((64, 64, 3), 128.0)] * 3
    s = cs.concept_score(blank, concept)
    assert np.isfinite(s.total) and s.total > 3.0
