"""Captions as A1111 and kohya users write them: [filewords] from file names, tag shuffling,
dropout and kept tags (seeded per sample), and templates that would never show the token."""
import logging

import pytest
import torch

from minti.training import templates as tpl
from minti.training.data import generator


def test_filename_words_drop_the_extension_and_leading_counter_and_read_underscores_and_dashes_as_spaces():
    assert tpl.filename_words("photos/00012-my_red-car.jpg") == "my red car"
    assert tpl.filename_words("12-3 a dog.png") == "a dog"
    assert tpl.filename_words("cat_on  sofa.webp") == "cat on sofa"
    assert tpl.filename_words("00042.png") == ""
    assert tpl.filename_words("IMG_2041.JPG") == "IMG 2041"  # only a leading number is a counter


def test_keep_tokens_stay_in_front_while_the_rest_is_shuffled_and_dropped():
    caption = "sks dog, red collar, on grass, sunny, close-up, smiling"
    tags = tpl.split_tags(caption)
    seen_orders, lengths = set(), []
    for i in range(200):
        out = tpl.split_tags(tpl.augment_caption(caption, True, 0.3, 2, generator(0, "caption", i)))
        assert out[:2] == ["sks dog", "red collar"]  # kohya's keep_tokens: never moved, never dropped
        assert set(out[2:]) <= set(tags[2:]) and len(set(out)) == len(out)
        seen_orders.add(tuple(out[2:]))
        lengths.append(len(out) - 2)
    assert len(seen_orders) > 20  # shuffled
    kept = sum(lengths) / (200 * 4)
    assert 0.6 < kept < 0.8  # each of the 4 free tags survives with probability 0.7


def test_caption_draws_depend_only_on_the_generator_so_a_resumed_run_draws_the_same():
    caption = "a, b, c, d, e, f"
    first = [tpl.augment_caption(caption, True, 0.2, 0, generator(3, "caption", i)) for i in range(30)]
    again = [tpl.augment_caption(caption, True, 0.2, 0, generator(3, "caption", i)) for i in reversed(range(30))]
    assert first == list(reversed(again))
    assert first != [tpl.augment_caption(caption, True, 0.2, 0, generator(4, "caption", i)) for i in range(30)]
    # off: the caption is left exactly as written
    assert tpl.augment_caption("x,  y", False, 0.0, 0, generator(0)) == "x,  y"


class Words:
    """A stand-in tokenizer: one id per word, the placeholder <t> expands to two ids."""

    def __call__(self, text):
        ids = []
        for word in text.replace(",", " ").split():
            ids += [900, 901] if word == "<t>" else [len(word)]
        return ids


def test_a_template_line_whose_token_the_tokenizer_never_sees_is_an_error_naming_the_file():
    with pytest.raises(ValueError, match=r"template file t\.txt: in the line '\[name\]s on a table'"):
        tpl.check_token_shown(["a photo of [name]", "[name]s on a table"], [""], "<t>", Words(), [900, 901],
                              "file t.txt")


def test_a_line_that_puts_the_token_past_the_window_for_every_caption_is_an_error():
    long = " ".join(["word"] * 80)
    with pytest.raises(ValueError, match=r"after the first 75 tokens.*move \[name\] before \[filewords\]"):
        tpl.check_token_shown(["[filewords], [name]"], [long], "<t>", Words(), [900, 901], "file t.txt")
    # the last vector just inside the window is fine; one id further it is not
    tpl.check_token_shown(["[filewords] [name]"], [" ".join(["w"] * 73)], "<t>", Words(), [900, 901], "f")
    with pytest.raises(ValueError):
        tpl.check_token_shown(["[filewords] [name]"], [" ".join(["w"] * 74)], "<t>", Words(), [900, 901], "f")


def test_a_token_lost_only_with_some_captions_is_a_warning(caplog):
    captions = ["short", " ".join(["word"] * 80)]
    with caplog.at_level(logging.WARNING, logger="minti"):
        tpl.check_token_shown(["[filewords], [name]", "[name], [filewords]"], captions, "<t>", Words(), [900, 901],
                              "built-in 'object'")
    assert "1 of the 4 training prompts" in caplog.text
