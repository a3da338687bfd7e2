"""A1111's PNG embedding card: written with the embedding in its sd-ti-embedding text chunk, read
back wherever minti reads an embedding."""
import base64
import json

import pytest
import torch
from PIL import Image, PngImagePlugin

from minti.training.embedding import PNG_CARD_KEY, Embedding, load_embedding, read_png_card, save_png_card


def picture(tmp_path, size=(64, 48)):
    path = tmp_path / "preview.png"
    Image.new("RGB", size, (200, 120, 40)).save(path)
    return path


def test_a_card_round_trips_every_bit_and_keeps_the_picture(tmp_path):
    emb = Embedding("<my-cat>", [torch.randn(3, 32, generator=torch.Generator().manual_seed(1))], step=120,
                    sd_checkpoint="0123456789", sd_checkpoint_name="v1-5")
    card = save_png_card(emb, picture(tmp_path), tmp_path / "my-cat.png")
    with Image.open(card) as img:
        assert img.format == "PNG" and img.width == 64 and img.height > 48  # the picture plus a label strip
        assert img.convert("RGB").getpixel((10, 10)) == (200, 120, 40)
        assert PNG_CARD_KEY in img.text
    back = load_embedding(card)
    assert back.token == "my-cat" and back.step == 120 and back.sd_checkpoint_name == "v1-5"
    assert torch.equal(back.vectors[0], emb.vectors[0])  # bit for bit through JSON


def test_an_sdxl_card_holds_clip_l_and_clip_g(tmp_path):
    emb = Embedding("<xl>", [torch.randn(2, 32), torch.randn(2, 48)], step=5)
    back = load_embedding(save_png_card(emb, picture(tmp_path), tmp_path / "card.png"))
    assert back.is_sdxl and back.token == "xl" and all(torch.equal(a, b) for a, b in zip(back.vectors, emb.vectors))


def test_a_card_written_the_way_a1111_writes_it_loads_by_the_name_inside(tmp_path):
    # A1111: json.dumps of its .pt dict with tensors as {"TORCHTENSOR": lists}, base64 in a tEXt chunk
    rows = [[0.25, -1.5, 3.0], [1e-3, 2.0, -0.125]]
    data = {"string_to_token": {"*": 265}, "string_to_param": {"*": {"TORCHTENSOR": rows}}, "name": "ghibli",
            "step": 3000, "sd_checkpoint": "cc6cb27103", "sd_checkpoint_name": "v1-5-pruned"}
    info = PngImagePlugin.PngInfo()
    info.add_text("sd-ti-embedding", base64.b64encode(json.dumps(data).encode()))
    Image.new("RGB", (32, 32)).save(tmp_path / "ghibli-3000.png", pnginfo=info)
    emb = load_embedding(tmp_path / "ghibli-3000.png")
    assert emb.token == "ghibli" and emb.step == 3000  # the trigger is the name, not the file's "ghibli-3000"
    assert torch.equal(emb.vectors[0], torch.tensor(rows))
    assert load_embedding(tmp_path / "ghibli-3000.png", token="<g>").token == "<g>"


def test_a_png_without_the_chunk_or_with_a_damaged_one_is_one_clear_error(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.png")
    with pytest.raises(ValueError, match=r"photo\.png is a PNG without the 'sd-ti-embedding' text chunk.*pixels"):
        load_embedding(tmp_path / "photo.png")
    info = PngImagePlugin.PngInfo()
    info.add_text("sd-ti-embedding", "bm90IGpzb24=")  # base64 of "not json"
    Image.new("RGB", (8, 8)).save(tmp_path / "torn.png", pnginfo=info)
    with pytest.raises(ValueError, match=r"torn\.png: its 'sd-ti-embedding' text chunk is damaged"):
        read_png_card(tmp_path / "torn.png")
