"""The data pipeline: reading every kind of image users have, crops/flips, captions, templates,
the latent cache and deterministic batches (no model needed: a fake VAE encoder)."""
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from minti.training import templates as tpl
from minti.training.data import TrainingData, augment_caption, find_images, generator, load_images, read_image


class FakeSD:
    """Just what TrainingData.encode uses: an 8x-downsampling 'VAE' that keeps the pixels visible."""
    device, dtype = torch.device("cpu"), torch.float32

    def __init__(self):
        self.calls = 0

    def encode_image(self, pixels, sample=False, generator=None):
        self.calls += 1
        z = F.avg_pool2d(pixels, 8)
        z = torch.cat([z, z[:, :1]], dim=1)
        if sample:
            z = z + 0.1 * torch.randn(z.shape, generator=generator)
        return z


def save(folder, name, array, mode=None, **kw):
    img = Image.fromarray(array) if mode is None else Image.fromarray(array, mode=mode)
    img.save(folder / name, **kw)
    return folder / name


def test_missing_empty_and_file_folders_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        find_images(tmp_path / "nope")
    (tmp_path / "a.txt").write_text("caption only")
    with pytest.raises(ValueError, match="has no images"):
        find_images(tmp_path)
    with pytest.raises(ValueError, match="is a file"):
        find_images(tmp_path / "a.txt")


def test_corrupt_and_unsupported_files_are_skipped_with_a_warning_naming_them(tmp_path, caplog):
    save(tmp_path, "good.png", np.full((16, 16, 3), 200, np.uint8))
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (tmp_path / "notes.pdf").write_bytes(b"%PDF")
    (tmp_path / ".DS_Store").write_bytes(b"junk")
    with caplog.at_level(logging.WARNING, logger="minti"):
        images = load_images(tmp_path)
    assert [im.path.name for im in images] == ["good.png"]
    assert "broken.jpg" in caplog.text and "notes.pdf" in caplog.text and ".DS_Store" not in caplog.text


def test_a_folder_of_only_broken_images_is_fatal(tmp_path):
    (tmp_path / "a.png").write_bytes(b"garbage")
    (tmp_path / "b.webp").write_bytes(b"")
    with pytest.raises(ValueError, match="no readable image"):
        load_images(tmp_path)


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(arr).save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    rgb, alpha = read_image(tmp_path / "phone.jpg")
    assert rgb.shape == (3, 40, 20) and alpha is None
    assert rgb[:, :15].mean() > 0.9 and rgb[:, 25:].mean() < 0.1  # white half now on top


def test_grayscale_16bit_cmyk_palette_and_bmp_webp_are_converted(tmp_path):
    save(tmp_path, "gray.png", np.full((8, 8), 128, np.uint8))
    save(tmp_path, "deep.png", np.full((8, 8), 65535 // 4, np.uint16))
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "print.jpg")  # CMYK red
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.save(tmp_path / "pal.png")
    save(tmp_path, "x.bmp", np.full((8, 8, 3), 10, np.uint8))
    save(tmp_path, "x.webp", np.full((8, 8, 3), 250, np.uint8), lossless=True)
    for name in ("gray.png", "deep.png", "print.jpg", "pal.png", "x.bmp", "x.webp"):
        rgb, alpha = read_image(tmp_path / name)
        assert rgb.shape == (3, 8, 8) and rgb.dtype == torch.float32 and alpha is None, name
    assert read_image(tmp_path / "gray.png")[0].mean() == pytest.approx(128 / 255, abs=1e-6)
    assert read_image(tmp_path / "deep.png")[0].mean() == pytest.approx(0.25, abs=1e-3)  # not clipped to white
    red = read_image(tmp_path / "print.jpg")[0].mean(dim=(1, 2))
    assert red[0] > 0.9 and red[1] < 0.1 and red[2] < 0.1
    assert read_image(tmp_path / "pal.png")[0][1].mean() == pytest.approx(1.0)


def test_transparency_is_composited_on_white_and_kept_as_a_loss_mask(tmp_path):
    arr = np.zeros((64, 64, 4), np.uint8)
    arr[:, :32] = (255, 0, 0, 255)  # opaque red left half, transparent black right half
    save(tmp_path, "cut.png", arr)
    pal = Image.new("P", (64, 64), 0)
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pal.png", transparency=0)
    images = load_images(tmp_path)
    cut = next(im for im in images if im.path.name == "cut.png")
    assert cut.alpha is not None and cut.rgb[:, :, 40:].min() == 1.0  # white, not black
    assert next(im for im in images if im.path.name == "pal.png").alpha is not None
    data = TrainingData([cut], 64, ["[name]"], "<t>", alpha_mask=True)
    data.encode(FakeSD())
    w = data.weights[0][0]
    assert w.shape == (8, 8) and w[:, :4].min() == 1.0 and w[:, 4:].max() == 0.0


def test_filewords_come_from_the_sidecar_else_from_the_file_name_as_a1111_does(tmp_path):
    save(tmp_path, "00003-a.png", np.zeros((64, 64, 3), np.uint8))
    (tmp_path / "00003-a.txt").write_text("  on a   red sofa \n")  # the sidecar wins over the name
    save(tmp_path, "00012-on_the-beach.at night.png", np.zeros((64, 64, 3), np.uint8))
    save(tmp_path, "7.png", np.zeros((64, 64, 3), np.uint8))  # only a number: no words
    save(tmp_path, "quiet_room.png", np.zeros((64, 64, 3), np.uint8))
    (tmp_path / "quiet_room.txt").write_text("")  # an empty sidecar is an empty caption, as in A1111
    images = load_images(tmp_path)
    assert [(im.caption, im.caption_from) for im in images] == [
        ("on a red sofa", "txt"), ("on the beach.at night", "name"), ("", ""), ("", "txt")]
    data = TrainingData(images, 64, ["a photo of [name], [filewords]"], "<cat>")
    data.encode(FakeSD())
    prompts = {data.sample(i)[1] for i in range(16)}
    assert prompts == {"a photo of <cat>, on a red sofa", "a photo of <cat>, on the beach.at night", "a photo of <cat>"}


def test_resize_short_side_then_center_crop_keeps_the_middle(tmp_path):
    arr = np.zeros((64, 192, 3), np.uint8)
    arr[:, 64:128] = 255  # only the middle third is white
    save(tmp_path, "wide.png", arr)
    data = TrainingData(load_images(tmp_path), 64, ["[name]"], "<t>")
    data.encode(FakeSD())
    assert len(data.latents) == 1 and data.latents[0].shape == (4, 8, 8)
    assert data.latents[0].min() > 0.95  # the white middle, in [-1,1]


def test_flip_and_random_crops_cache_one_latent_per_variant(tmp_path):
    arr = np.zeros((64, 128, 3), np.uint8)
    arr[:, :32] = 255
    save(tmp_path, "x.png", arr)
    fake = FakeSD()
    data = TrainingData(load_images(tmp_path), 64, ["[name]"], "<t>", crop="random", random_crops=3, flip=True)
    data.encode(fake, batch_size=2)
    assert len(data.variants) == 6 and len(data.latents) == 6 and fake.calls == 3
    flipped = [v for v in data.variants if v.flip]
    assert len(flipped) == 3
    a = data.variants.index(flipped[0])
    plain = next(i for i, v in enumerate(data.variants) if not v.flip and (v.top, v.left) == (flipped[0].top, flipped[0].left))
    torch.testing.assert_close(data.latents[a], data.latents[plain].flip(-1))


def test_small_images_are_upscaled_with_a_warning(tmp_path, caplog):
    save(tmp_path, "tiny.png", np.full((20, 30, 3), 90, np.uint8))
    with caplog.at_level(logging.WARNING, logger="minti"):
        data = TrainingData(load_images(tmp_path), 64, ["[name]"], "<t>")
    assert "tiny.png" in caplog.text and "upscaled" in caplog.text
    data.encode(FakeSD())
    assert [z.shape for z in data.latents] == [(4, 8, 8)]


def test_batches_depend_only_on_seed_and_index_and_cover_each_epoch(tmp_path):
    for i in range(3):
        save(tmp_path, f"{i}.png", np.full((64, 64, 3), 40 * i, np.uint8))
    images = load_images(tmp_path)
    make = lambda seed: TrainingData(images, 64, tpl.OBJECT, "<t>", seed=seed, repeats=2)
    a, b, c = make(0), make(0), make(1)
    for d in (a, b, c):
        d.encode(FakeSD())
    order_a = [a.sample(i) for i in range(12)]
    assert order_a == [b.sample(i) for i in range(12)]
    assert order_a != [c.sample(i) for i in range(12)]
    first_epoch = sorted(a.variants[v].image for v, _ in order_a[:6])
    assert first_epoch == [0, 0, 1, 1, 2, 2]
    lat, prompts, weights, variants = a.batch(3, 2)
    assert lat.shape == (2, 4, 8, 8) and weights is None and all("<t>" in p for p in prompts)
    assert torch.equal(lat[0], a.latents[order_a[3][0]])


def test_latent_sampling_sample_is_seeded(tmp_path):
    save(tmp_path, "x.png", np.full((64, 64, 3), 99, np.uint8))
    images = load_images(tmp_path)
    runs = []
    for _ in range(2):
        d = TrainingData(images, 64, ["[name]"], "<t>", seed=5)
        d.encode(FakeSD(), latent_sampling="sample")
        runs.append(torch.stack(d.latents))
    mean = TrainingData(images, 64, ["[name]"], "<t>", seed=5)
    mean.encode(FakeSD())
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], torch.stack(mean.latents))


def test_template_files_need_name_and_builtins_are_our_own(tmp_path):
    good = tmp_path / "t.txt"
    good.write_text("# comment\n\na drawing of [name], [filewords]\n[name] at night\n")
    assert tpl.load_templates(str(good)) == ["a drawing of [name], [filewords]", "[name] at night"]
    bad = tmp_path / "bad.txt"
    bad.write_text("a drawing of something\n")
    with pytest.raises(ValueError, match="no \\[name\\]"):
        tpl.load_templates(str(bad))
    with pytest.raises(ValueError, match="neither a built-in"):
        tpl.load_templates("objects")
    assert all("[name]" in t for t in tpl.OBJECT + tpl.STYLE)
    # not the textual-inversion paper's list that A1111 and the diffusers example ship
    assert "a photo of a [name]" not in tpl.OBJECT and "a painting in the style of [name]" not in tpl.STYLE
    assert tpl.fill("a photo of [name], [filewords]", "<t>") == "a photo of <t>"


def test_each_variant_records_sdxls_original_size_and_crop_as_kohya_measures_it(tmp_path):
    save(tmp_path, "wide.png", np.zeros((96, 192, 3), np.uint8))  # resized to 64x128 for 64 px training
    data = TrainingData(load_images(tmp_path), 64, ["[name]"], "<t>", crop="random", random_crops=3, flip=True)
    data.encode(FakeSD())
    assert {v.original_size for v in data.variants} == {(96, 192)}  # before resizing
    for v in data.variants:
        assert v.top == 0 and 0 <= v.left <= 64
        # a mirrored crop's left edge is the plain crop's distance from the right edge
        assert v.crop_top_left == ((0, 128 - 64 - v.left) if v.flip else (0, v.left))
    assert any(v.flip and v.left != 32 for v in data.variants)  # the mirroring is exercised


def test_keep_tokens_stay_in_front_while_the_rest_is_shuffled_and_dropped():
    caption = "sks dog, red collar, on grass, sunny, close-up, smiling"
    tags = tpl.split_tags(caption)
    seen_orders, lengths = set(), []
    for i in range(200):
        out = tpl.split_tags(augment_caption(caption, True, 0.3, 2, generator(0, "caption", i)))
        assert out[:2] == ["sks dog", "red collar"]  # kohya's keep_tokens: never moved, never dropped
        assert set(out[2:]) <= set(tags[2:]) and len(set(out)) == len(out)
        seen_orders.add(tuple(out[2:]))
        lengths.append(len(out) - 2)
    assert len(seen_orders) > 20  # shuffled
    kept = sum(lengths) / (200 * 4)
    assert 0.6 < kept < 0.8  # each of the 4 free tags survives with probability 0.7


def test_caption_draws_depend_only_on_the_generator_so_a_resumed_run_draws_the_same():
    caption = "a, b, c, d, e, f"
    first = [augment_caption(caption, True, 0.2, 0, generator(3, "caption", i)) for i in range(30)]
    again = [augment_caption(caption, True, 0.2, 0, generator(3, "caption", i)) for i in reversed(range(30))]
    assert first == list(reversed(again))
    assert first != [augment_caption(caption, True, 0.2, 0, generator(4, "caption", i)) for i in range(30)]
    # off: the caption is left exactly as written
    assert augment_caption("x,  y", False, 0.0, 0, generator(0)) == "x,  y"
