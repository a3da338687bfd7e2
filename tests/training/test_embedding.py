"""Embedding files: our three formats, A1111/diffusers/SDXL files from elsewhere, and diffusers'
own loader reading what we write."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from minti.training.embedding import Embedding, file_stem, load_embedding


def make(n=3, dims=(32,), token="<my-cat>", step=7):
    g = torch.Generator().manual_seed(0)
    return Embedding(token, [torch.randn(n, d, generator=g) for d in dims], step=step,
                     sd_checkpoint="0123456789", sd_checkpoint_name="model")


def test_saving_to_a_folder_writes_the_three_formats_with_exact_layouts(tmp_path):
    emb = make()
    files = emb.save(tmp_path)
    assert sorted(p.name for p in files) == ["learned_embeds.safetensors", "my-cat.pt", "my-cat.safetensors"]
    st = load_file(tmp_path / "my-cat.safetensors")
    assert list(st) == ["emb_params"] and st["emb_params"].dtype == torch.float32
    assert torch.equal(st["emb_params"], emb.vectors[0])
    pt = torch.load(tmp_path / "my-cat.pt", weights_only=True)
    assert set(pt) == {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}
    assert pt["string_to_token"] == {"*": 265}
    assert list(pt["string_to_param"]) == ["*"] and torch.equal(pt["string_to_param"]["*"], emb.vectors[0])
    assert (pt["name"], pt["step"], pt["sd_checkpoint"], pt["sd_checkpoint_name"]) == ("<my-cat>", 7, "0123456789", "model")
    de = load_file(tmp_path / "learned_embeds.safetensors")
    assert list(de) == ["<my-cat>"] and torch.equal(de["<my-cat>"], emb.vectors[0])


def test_sdxl_embedding_saves_clip_l_and_clip_g(tmp_path):
    emb = make(n=2, dims=(768, 1280), token="<thing>")
    files = emb.save(tmp_path)
    assert [p.name for p in files] == ["thing.safetensors"]
    st = load_file(files[0])
    assert set(st) == {"clip_l", "clip_g"} and st["clip_l"].shape == (2, 768) and st["clip_g"].shape == (2, 1280)
    back = load_embedding(files[0])
    assert back.token == "thing" and all(torch.equal(a, b) for a, b in zip(back.vectors, emb.vectors))


def test_every_format_round_trips_and_names_the_token_like_a1111_and_diffusers(tmp_path):
    emb = make()
    emb.save(tmp_path)
    a1111_st = load_embedding(tmp_path / "my-cat.safetensors")
    a1111_pt = load_embedding(tmp_path / "my-cat.pt")
    diffusers = load_embedding(tmp_path / "learned_embeds.safetensors")
    assert (a1111_st.token, a1111_pt.token, diffusers.token) == ("my-cat", "my-cat", "<my-cat>")
    assert a1111_pt.step == 7 and a1111_pt.sd_checkpoint == "0123456789"
    for e in (a1111_st, a1111_pt, diffusers, load_embedding(tmp_path)):
        assert torch.equal(e.vectors[0], emb.vectors[0])
    assert load_embedding(tmp_path / "my-cat.pt", token="<x>").token == "<x>"


def test_single_file_save_picks_the_format_from_the_suffix(tmp_path):
    emb = make(n=1)
    emb.save(tmp_path / "a.safetensors")
    emb.save(tmp_path / "b.pt")
    emb.save(tmp_path / "c.bin", formats=("diffusers",))
    assert list(load_file(tmp_path / "a.safetensors")) == ["emb_params"]
    assert "string_to_param" in torch.load(tmp_path / "b.pt", weights_only=True)
    assert list(torch.load(tmp_path / "c.bin", weights_only=True)) == ["<my-cat>"]
    with pytest.raises(ValueError, match="suffix"):
        emb.save(tmp_path / "d.safetensors", formats=("pt",))


def test_downloaded_formats_load(tmp_path):
    v = torch.randn(2, 32)
    # A1111 .pt as older versions wrote it: a Parameter, a 1-D single vector elsewhere
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(v)}, "name": "old",
                "step": 3000, "sd_checkpoint": None, "sd_checkpoint_name": None}, tmp_path / "old-style.pt")
    save_file({"emb_params": v[0]}, tmp_path / "one.safetensors")
    torch.save({"<tok>": v}, tmp_path / "learned_embeds.bin")
    e = load_embedding(tmp_path / "old-style.pt")
    assert e.token == "old-style" and e.step == 3000 and torch.equal(e.vectors[0], v)
    one = load_embedding(tmp_path / "one.safetensors")
    assert one.vectors[0].shape == (1, 32)
    assert load_embedding(tmp_path / "learned_embeds.bin").token == "<tok>"


def test_bad_embedding_files_are_clear_errors(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    save_file({"a": torch.zeros(2), "b": torch.zeros(2)}, tmp_path / "two.safetensors")
    save_file({"emb_params": torch.tensor([[float("nan")] * 4])}, tmp_path / "nan.safetensors")
    (tmp_path / "x.png").write_bytes(b"\x89PNG")
    cases = {
        tmp_path / "missing.pt": "does not exist",
        tmp_path / "junk.safetensors": "junk.safetensors",
        tmp_path / "two.safetensors": "unexpected keys",
        tmp_path / "nan.safetensors": "NaN",
        tmp_path / "x.png": "cannot read .*x.png as a PNG",  # a .png is read as an A1111 card
    }
    for path, message in cases.items():
        with pytest.raises(ValueError, match=message):
            load_embedding(path)


def test_a_pickle_that_runs_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"string_to_param": {"*": Evil()}}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="refusing"):
        load_embedding(tmp_path / "evil.pt")
    assert not marker.exists()


def test_token_file_names():
    assert file_stem("<my-cat>") == "my-cat"
    assert file_stem("style/of:me") == "style_of_me"
    assert file_stem("<>") == "embedding"


# ------------------------------------------------------------- diffusers reads our files


def clip_tokenizer_files(folder: Path) -> Path:
    """vocab.json + merges.txt for transformers' CLIPTokenizer, built offline from the BPE file
    that open-clip-torch ships (the same 49408-entry vocabulary as openai/clip-vit-large-patch14)."""
    from checkpoints import write_tokenizer

    return write_tokenizer(folder)


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    """The smallest object diffusers' TextualInversionLoaderMixin.load_textual_inversion runs on:
    a CLIPTokenizer and a tiny CLIPTextModel (a StableDiffusionPipeline needs a UNet, VAE and
    scheduler configs that are beside the point here). This is diffusers' real loading code:
    file parsing, A1111/diffusers format detection, token naming, multi-vector expansion."""
    from diffusers.loaders import TextualInversionLoaderMixin
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = clip_tokenizer_files(tmp_path_factory.mktemp("tok"))
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    config = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=77)

    class Pipe(TextualInversionLoaderMixin):
        hf_device_map = None

        def __init__(self):
            # fresh ones each time: loading adds tokens to both
            self.tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
            self.text_encoder = CLIPTextModel(config)

        @property
        def components(self):
            return {"tokenizer": self.tokenizer, "text_encoder": self.text_encoder}

    return Pipe


def loaded_rows(pipe, token: str, n: int) -> torch.Tensor:
    names = [token] + [f"{token}_{i}" for i in range(1, n)]
    ids = pipe.tokenizer.convert_tokens_to_ids(names)
    return pipe.text_encoder.get_input_embeddings().weight[ids].detach()


def test_diffusers_load_textual_inversion_reads_our_pt_and_learned_embeds(tmp_path, tiny_pipe):
    emb = make(n=3)
    emb.save(tmp_path)
    pipe = tiny_pipe()
    pipe.load_textual_inversion(str(tmp_path / "my-cat.pt"))  # no token=: taken from "name"
    torch.testing.assert_close(loaded_rows(pipe, "<my-cat>", 3), emb.vectors[0], rtol=0, atol=0)
    pipe = tiny_pipe()
    pipe.load_textual_inversion(str(tmp_path))  # a folder: diffusers looks for learned_embeds.safetensors
    torch.testing.assert_close(loaded_rows(pipe, "<my-cat>", 3), emb.vectors[0], rtol=0, atol=0)
    ids = pipe.maybe_convert_prompt("a photo of <my-cat>", pipe.tokenizer)
    assert ids == "a photo of <my-cat> <my-cat>_1 <my-cat>_2"


def test_diffusers_load_textual_inversion_reads_our_a1111_safetensors(tmp_path, tiny_pipe):
    emb = make(n=2)
    emb.save(tmp_path)
    pipe = tiny_pipe()
    # A1111 safetensors carry no token name, so diffusers needs token= (as its docs say).
    pipe.load_textual_inversion(str(tmp_path / "my-cat.safetensors"), token="my-cat")
    torch.testing.assert_close(loaded_rows(pipe, "my-cat", 2), emb.vectors[0], rtol=0, atol=0)


def test_a_failed_save_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    from minti import atomic

    target = tmp_path / "e.safetensors"
    make(n=1).save(target)
    old = target.read_bytes()

    def boom(*a, **k):
        raise KeyboardInterrupt  # as if Ctrl-C hit in the middle of writing

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        make(n=2).save(target)
    assert target.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["e.safetensors"]
    atomic.write_text(tmp_path / "t.txt", "new")
    assert (tmp_path / "t.txt").read_text() == "new"


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_saved_files_are_readable_by_other_users_like_a_plain_write(tmp_path):
    """Atomic saves go through a 0600 temporary; the file must still end up with the mode a
    plain open() gives (another user's A1111/ComfyUI has to read the embedding)."""
    from minti import atomic

    umask = os.umask(0o022)
    try:
        make(n=1).save(tmp_path / "e.safetensors")
        atomic.write_text(tmp_path / "t.txt", "x")
        (tmp_path / "plain.txt").write_text("x")
        want = (tmp_path / "plain.txt").stat().st_mode & 0o777
        assert want == 0o644
        for name in ("e.safetensors", "t.txt"):
            assert (tmp_path / name).stat().st_mode & 0o777 == want, name
        os.chmod(tmp_path / "t.txt", 0o640)  # replacing a file keeps its mode
        atomic.write_text(tmp_path / "t.txt", "y")
        assert (tmp_path / "t.txt").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(umask)
