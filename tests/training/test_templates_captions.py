"""Captions as A1111 and kohya users write them: [filewords] from file names, tag shuffling,
dropout and kept tags (seeded per sample), and templates that would never show the token."""
import logging

import pytest

from minti.training import templates as tpl


def test_filename_words_drop_the_extension_and_leading_counter_and_read_underscores_and_dashes_as_spaces():
    assert tpl.filename_words("photos/00012-my_red-car.jpg") == "my red car"
    assert tpl.filename_words("12-3 a dog.png") == "a dog"
    assert tpl.filename_words("cat_on  sofa.webp") == "cat on sofa"
    assert tpl.filename_words("00042.png") == ""
    assert tpl.filename_words("IMG_2041.JPG") == "IMG 2041"  # only a leading number is a counter


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
