"""minti.loading.tokenizer against the two reference CLIP tokenizers (open_clip and transformers)."""
from __future__ import annotations

import json

import open_clip
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer
from transformers import CLIPTokenizer

from minti.loading.tokenizer import Tokenizer

CORPUS = [
    "a photo of a cat",
    "A PHOTO OF A CAT, Trending On ArtStation",
    "",
    "   ",
    "  leading and trailing spaces   ",
    "tabs\tand\nnewlines\r\n  and   runs   of spaces",
    "café, naïve façade, crème brûlée, São Paulo, Zürich, Ångström",
    "Cafe\u0301 with a combining accent (NFC makes it é)",
    "emoji 🐱🐶🔥 and flags 🇯🇵 and a family 👨‍👩‍👧",
    "日本語のテキスト, 中文, 한국어, русский текст, ελληνικά, עברית, العربية",
    "punctuation!!! ??? ... -- (brackets) [square] {curly} <angle> @#$%^&*_+=|\\/~`",
    "numbers 1234567890 3.14159 1e-5 2,000,000 #1 v2.1 512x512",
    "don't won't it's we're they've I'm you'll he'd DON'T IT'S",
    "masterpiece, best quality, (highly detailed:1.2), [[blurry]], ((sharp focus))",
    "snake_case and kebab-case and CamelCase and mixedUPPERlower",
    "tricky BPE: antidisestablishmentarianism pneumonoultramicroscopic supercalifragilistic",
    " ".join(["a very long prompt"] * 40),
    "x" * 300,
    "word " * 74 + "last",
    "word " * 75 + "cut",
    # where open_clip's ftfy.fix_text / html.unescape differ from transformers (see DIVERGENT)
    "fish &amp; chips &lt;3 &quot;quoted&quot; &#39;single&#39;",
    "curly quotes: don\u2019t \u201cquote\u201d",
    "full-width ＡＢＣ１２３ and the ligature \ufb01sh",
    "mojibake: cafÃ© and donâ€™t",
    # transformers reads these as the special ids; open_clip's specials are spelled <end_of_text>
    "<|endoftext|> typed into a prompt",
    "a <|startoftext|> in the middle",
]
# Strings on which open_clip.tokenize runs ftfy.fix_text + html.unescape and transformers does
# not, or which spell transformers' special tokens: minti follows transformers (what diffusers
# and ComfyUI use), so these are checked against transformers only, and against open_clip only
# to prove that they really differ.
DIVERGENT = set(CORPUS[-6:])


@pytest.fixture(scope="module")
def vocab_folder(tmp_path_factory):
    """vocab.json + merges.txt written from open_clip's own reading of its BPE file."""
    ref = SimpleTokenizer()
    vocab = {k.replace("<start_of_text>", "<|startoftext|>").replace("<end_of_text>", "<|endoftext|>"): v
             for k, v in ref.encoder.items()}
    merges = sorted(ref.bpe_ranks, key=ref.bpe_ranks.get)
    folder = tmp_path_factory.mktemp("tokenizer")
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def hf_tokenizer(vocab_folder):
    return CLIPTokenizer.from_pretrained(str(vocab_folder))  # local folder, as diffusers loads it


def _transformers_ids(hf, texts, pad_id):
    out = hf(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    # transformers pads with EOS: put the wanted pad id where its attention mask says padding
    return out.input_ids.masked_fill(out.attention_mask == 0, pad_id)


def _open_clip_ids(texts, pad_id):
    ids = open_clip.tokenize(texts)  # pads with 0 after the only EOS
    after_eos = (ids == 49407).long().cumsum(1) - (ids == 49407).long() > 0
    return ids.masked_fill(after_eos, pad_id)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_openclip_vocab(pad_token_id=0)


def test_vocabulary_from_openclip_gz_equals_open_clips_own():
    mine = Tokenizer.from_openclip_vocab(pad_token_id=0)
    ref = SimpleTokenizer()
    assert mine.vocab_size == len(ref.encoder) == 49408
    assert mine.token_to_id("<|startoftext|>") == 49406 and mine.token_to_id("<|endoftext|>") == 49407
    for word in ["cat</w>", "a</w>", "!", "ing</w>", "photograph</w>"]:
        assert mine.token_to_id(word) == ref.encoder[word]
    assert "bpe_simple_vocab_16e6" in mine.source


@pytest.mark.parametrize("pad_id", [0, 49407])
def test_encode_matches_open_clip_tokenize_on_corpus(tok, pad_id):
    texts = [t for t in CORPUS if t not in DIVERGENT]
    ref = _open_clip_ids(texts, pad_id)
    mine = Tokenizer.from_openclip_vocab(pad_token_id=pad_id).encode(texts) if pad_id else tok.encode(texts)
    for text, a, b in zip(texts, mine, ref):
        assert a.tolist() == b.tolist(), text


def test_divergent_strings_really_differ_under_open_clips_ftfy(tok):
    texts = sorted(DIVERGENT)
    ref = open_clip.tokenize(texts)
    for text, a, b in zip(texts, tok.encode(texts), ref):
        assert a.tolist() != b.tolist(), f"{text!r} is not divergent: move it out of DIVERGENT"


@pytest.mark.parametrize("pad_id", [49407, 0])
def test_encode_matches_transformers_clip_tokenizer_on_whole_corpus(hf_tokenizer, tok, pad_id):
    mine = Tokenizer.from_openclip_vocab(pad_token_id=pad_id) if pad_id else tok
    ref = _transformers_ids(hf_tokenizer, CORPUS, pad_id)
    for text, a, b in zip(CORPUS, mine.encode(CORPUS), ref):
        assert a.tolist() == b.tolist(), text


def test_from_folder_reads_vocab_json_and_merges_like_the_gz(vocab_folder, tok):
    folder_tok = Tokenizer.from_folder(vocab_folder, pad_token_id=0)
    assert folder_tok.vocab_size == 49408
    assert folder_tok.source == str(vocab_folder)
    assert torch.equal(folder_tok.encode(CORPUS), tok.encode(CORPUS))


def test_layout_is_bos_content_eos_then_padding():
    t = Tokenizer.from_openclip_vocab(pad_token_id=49407)
    ids = t.encode(["a photo of a cat", ""])
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ids[0, 7:] == 49407).all()
    assert ids[1, :2].tolist() == [49406, 49407]
    t0 = Tokenizer.from_openclip_vocab(pad_token_id=0)
    assert (t0.encode([""])[0, 2:] == 0).all()


def test_long_prompt_truncates_to_75_tokens_with_eos_last(tok):
    ids = tok.encode([" ".join(["photo"] * 200)])[0]
    assert ids[0] == 49406 and ids[76] == 49407
    assert (ids[1:76] == tok.token_to_id("photo</w>")).all()


def test_tokenize_words_has_no_bos_eos_or_padding(tok):
    assert tok.tokenize_words("a photo of a cat") == [320, 1125, 539, 320, 2368]
    assert tok.tokenize_words("") == []


def test_placeholder_expands_to_n_consecutive_ids_wherever_it_is_a_whole_word():
    t = Tokenizer.from_openclip_vocab(pad_token_id=49407)
    assert t.add_placeholder("<cat-toy>", 3, first_id=49408) == [49408, 49409, 49410]
    assert t.tokenize_words("<cat-toy>") == [49408, 49409, 49410]
    ids = t.encode(["a photo of <cat-toy>, next to <cat-toy>"])[0].tolist()
    plain = Tokenizer.from_openclip_vocab(pad_token_id=49407)
    next_to = plain.tokenize_words("next to")
    assert ids[:10] == [49406, 320, 1125, 539, 49408, 49409, 49410, 267] + next_to
    assert ids[10:14] == [49408, 49409, 49410, 49407]
    # inside a longer word, or in another case, it is ordinary text
    for text in ["x<cat-toy>", "<cat-toy>s", "<CAT-TOY>"]:
        assert not any(i >= 49408 for i in t.encode([text])[0].tolist()), text
    # the text around it tokenizes exactly as without the placeholder
    assert t.tokenize_words("a photo of <cat-toy> on a beach")[:3] == plain.tokenize_words("a photo of")
    assert t.tokenize_words("a photo of <cat-toy> on a beach")[6:] == plain.tokenize_words("on a beach")


def test_two_placeholders_get_their_own_ids():
    t = Tokenizer.from_openclip_vocab(pad_token_id=0)
    t.add_placeholder("<a-style>", 2, first_id=49408)
    t.add_placeholder("<b-thing>", 1, first_id=49410)
    assert t.tokenize_words("<b-thing> in <a-style>") == [49410, 530, 49408, 49409]
    with pytest.raises(ValueError, match="overlap"):
        t.add_placeholder("<c-thing>", 2, first_id=49409)
    with pytest.raises(ValueError, match="already registered"):
        t.add_placeholder("<a-style>", 2, first_id=49420)


def test_placeholder_expansion_is_truncated_to_77_with_eos_last():
    t = Tokenizer.from_openclip_vocab(pad_token_id=0)
    t.add_placeholder("<big>", 8, first_id=49408)
    ids = t.encode([" ".join(["photo"] * 70) + " <big>"])[0]
    assert ids[71:76].tolist() == [49408, 49409, 49410, 49411, 49412]
    assert ids[76] == 49407


@pytest.mark.parametrize("word", ["cat", "Cat", "photo", "!"])
def test_placeholder_that_is_already_one_vocabulary_word_is_rejected(word):
    t = Tokenizer.from_openclip_vocab(pad_token_id=0)
    with pytest.raises(ValueError, match="already the vocabulary word"):
        t.add_placeholder(word, 1, first_id=49408)


def test_placeholder_arguments_are_checked():
    t = Tokenizer.from_openclip_vocab(pad_token_id=0)
    with pytest.raises(ValueError, match="one word"):
        t.add_placeholder("two words", 1, first_id=49408)
    with pytest.raises(ValueError, match="at least one"):
        t.add_placeholder("<x-y>", 0, first_id=49408)
    with pytest.raises(ValueError, match=">= vocab_size"):
        t.add_placeholder("<x-y>", 1, first_id=100)
