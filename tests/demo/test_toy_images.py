import numpy as np
import pytest

from minti.demo import toy_images


def test_same_seed_gives_the_same_image_mask_and_caption():
    a, b = toy_images.generate(123), toy_images.generate(123)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert np.array_equal(a.mask, b.mask)
    assert a.caption == b.caption and a.attributes == b.attributes
    c = toy_images.generate(124)
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))


def test_dataset_is_a_prefix_of_a_larger_dataset():
    small, attrs_small = toy_images.dataset(4, seed=3)
    large, attrs_large = toy_images.dataset(6, seed=3)
    assert np.array_equal(small, large[:4]) and attrs_small == attrs_large[:4]
    assert small.shape == (4, 64, 64, 3) and small.dtype == np.uint8


@pytest.mark.parametrize("seed", range(12))
def test_caption_names_every_attribute(seed):
    s = toy_images.generate(seed)
    a = s.attributes
    words = s.caption.split()
    for w in (a.size, a.colour, a.shape, a.bg_colour):
        assert w in words
    assert (a.pattern in words) == (a.pattern != "plain")
    assert toy_images.POSITION_PHRASES[a.position] in s.caption
    assert s.caption.endswith("background")
    if a.background != "plain":
        assert f"{a.background} {a.bg_colour} background" in s.caption


def test_caption_words_are_single_clip_tokens():
    from minti.loading.tokenizer import Tokenizer

    tok = Tokenizer.from_openclip_vocab(pad_token_id=49407)
    vocab = set(toy_images.SHAPES) | set(toy_images.COLOURS) | set(toy_images.PATTERNS) | set(toy_images.BACKGROUNDS) \
        | set(toy_images.SIZES) | {toy_images.CONCEPT_CAPTION_INIT, "background"} \
        | {w for p in toy_images.POSITION_PHRASES.values() for w in p.split()}
    split = [w for w in sorted(vocab) if len(tok.tokenize_words(w)) != 1]
    assert not split, f"words the CLIP tokenizer splits: {split}"


def test_shortened_captions_keep_the_shape_or_the_generic_word():
    rng = np.random.default_rng(0)
    a = toy_images.generate(5).attributes
    caps = [toy_images.caption(a, rng, drop=0.5, generic=0.3, prefix=0.5) for _ in range(200)]
    assert all(a.shape in c.split() or toy_images.CONCEPT_CAPTION_INIT in c.split() for c in caps)
    assert any(toy_images.CONCEPT_CAPTION_INIT in c.split() for c in caps)
    assert len(set(caps)) > 20  # the variants actually vary
    assert toy_images.caption(a) == toy_images.generate(5).caption  # no rng: the full caption


@pytest.mark.parametrize("seed", range(16))
def test_mask_covers_exactly_the_pixels_drawn_in_the_shape_tones(seed):
    s = toy_images.generate(seed)
    fg, fg2, bg, bg2 = toy_images._tones(s.attributes)
    img = np.asarray(s.image, np.float64)

    def near(pixels, tones):
        # distance to the segment between the two tones (patterns are mixes of exactly these)
        a, b = tones
        t = np.clip((pixels - a) @ (b - a) / max((b - a) @ (b - a), 1e-9), 0, 1)
        return np.linalg.norm(pixels - (a + t[:, None] * (b - a)), axis=1) < 3

    # away from the antialiased outline, every pixel is in its region's tones
    m = s.mask
    inner = m & np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1)
    outer = ~m & ~np.roll(m, 1, 0) & ~np.roll(m, -1, 0) & ~np.roll(m, 1, 1) & ~np.roll(m, -1, 1)
    assert inner.sum() > 20
    assert near(img[inner], (fg, fg2)).mean() > 0.97
    if s.attributes.background != "gradient":  # a gradient is a blend, checked below
        assert near(img[outer], (bg, bg2)).mean() > 0.97
    assert not near(img[outer], (fg, fg2)).any()


def test_mask_follows_size_and_position():
    base = toy_images.Attributes("square", "red", "plain", "small", "center", "plain", "blue")
    small = toy_images.render(base).mask
    large = toy_images.render(toy_images.perturb(base, size="large")).mask
    assert 3.0 < large.sum() / small.sum() < 4.5  # area ~ (0.5 / 0.26)^2
    for pos, axis, sign in (("left", 1, -1), ("right", 1, 1), ("top", 0, -1), ("bottom", 0, 1)):
        m = toy_images.render(toy_images.perturb(base, position=pos)).mask
        centre = np.nonzero(m)[axis].mean() + 0.5
        assert sign * (centre - 32) > 10, pos


def test_every_sampled_shape_contrasts_with_its_background():
    rng = np.random.default_rng(1)
    for _ in range(300):
        a = toy_images.sample_attributes(rng)
        assert a.colour != a.bg_colour and toy_images.contrast_ok(a.colour, a.bg_colour)


def test_training_set_never_contains_the_concept_combination():
    _, attrs = toy_images.dataset(1500, seed=0, resolution=8)
    assert not any(toy_images.is_concept_combination(a) for a in attrs)
    # ...though each part of it is common, so the model can draw it
    assert sum(a.shape == "heart" and a.colour == "orange" for a in attrs) > 3
    assert sum(a.shape == "heart" and a.pattern == "striped" for a in attrs) > 3


def test_concept_samples_are_reproducible_jittered_draws_of_the_concept():
    a, b = toy_images.concept_samples(5, seed=0), toy_images.concept_samples(5, seed=0)
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    assert all(toy_images.is_concept_combination(s.attributes) for s in a)
    assert len({s.attributes for s in a}) == 5
    assert a[0].caption == "a large orange striped heart in the center on a dotted blue background"
