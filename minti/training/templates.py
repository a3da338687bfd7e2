"""Prompt templates for training: each line names the concept with [name] (the placeholder token)
and may add the image's caption with [filewords].

Our own phrasings. Variety matters more than any single line: the token should carry the
concept, not one sentence structure, so the lines vary framing, light, distance and medium
while never describing the subject itself (that is what the token has to learn).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Callable

log = logging.getLogger("minti")

OBJECT = [
    "a snapshot of [name]",
    "a picture showing [name]",
    "[name], photographed up close",
    "[name] seen from a few steps away",
    "an image of [name] in soft daylight",
    "[name] under warm indoor light",
    "a sharp, detailed photograph of [name]",
    "a slightly blurry phone picture of [name]",
    "[name] in the middle of the frame",
    "a candid shot of [name]",
    "a studio shot of [name] on a plain backdrop",
    "[name], high quality photograph",
    "a dim, moody picture of [name]",
    "a brightly lit image of [name]",
    "a wide shot that includes [name]",
    "a macro shot of [name]",
    "an old film photograph of [name]",
    "a digital render of [name]",
    "[name], centered composition",
    "one more picture of [name]",
]

STYLE = [
    "artwork made in the manner of [name]",
    "an illustration drawn the way [name] does it",
    "a landscape rendered as [name] would",
    "a portrait done in [name] style",
    "a still life, [name] style",
    "[name] style artwork",
    "a detailed piece in the style of [name]",
    "a quick sketch with the look of [name]",
    "a city street painted like [name]",
    "a poster designed in the manner of [name]",
    "an interior scene with the feel of [name]",
    "a small study in the [name] style",
    "a large canvas, [name] style",
    "a character drawn in [name] fashion",
    "an animal pictured in the style of [name]",
    "a seascape with the colours of [name]",
]

BUILTIN = {"object": OBJECT, "style": STYLE}


def with_filewords(lines: list[str]) -> list[str]:
    """The built-in lines with the image caption appended (used when images have .txt captions)."""
    return [f"{line}, [filewords]" for line in lines]


def load_templates(spec: str) -> list[str]:
    """`spec` is "object", "style", or a text file with one template per line.

    A file's lines must each contain [name]; blank lines and lines starting with # are skipped.
    Raises ValueError naming the file and the fix.
    """
    if spec in BUILTIN:
        return list(BUILTIN[spec])
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"template {spec!r} is neither a built-in ({', '.join(BUILTIN)}) nor a file: "
                         "pass --template object, --template style, or the path of a text file with [name] lines")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read template file {path}: {e}; save it as UTF-8 text") from None
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise ValueError(f"template file {path} has no lines: write one prompt per line, each with [name]")
    missing = [line for line in lines if "[name]" not in line]
    if missing:
        raise ValueError(f"template file {path}: line {missing[0]!r} has no [name]; every line must contain "
                         "[name] where the learned token goes")
    return lines


def describe_source(spec: str) -> str:
    """How messages name a --template value: the built-in list or the file."""
    return f"built-in {spec!r}" if spec in BUILTIN else f"file {spec}"


def fill(template: str, token: str, caption: str = "") -> str:
    """Put the token and caption into one template line; tidy the commas a missing caption leaves."""
    text = template.replace("[name]", token).replace("[filewords]", caption.strip())
    text = " ".join(text.split())
    while ", ," in text:
        text = text.replace(", ,", ",")
    return text.strip().strip(",").strip()


# ------------------------------------------------------------------------------- captions

# A1111 drops a leading run of digits and dashes: the counter its own tools put before file names.
_LEADING_NUMBER = re.compile(r"^[\d-]+\s*")


def filename_words(path: str | Path) -> str:
    """[filewords] of an image without a .txt caption, as A1111 takes them from the file name:
    extension and a leading number (`00012-`) dropped, `_` and `-` read as spaces."""
    words = _LEADING_NUMBER.sub("", Path(path).stem)
    return " ".join(words.replace("_", " ").replace("-", " ").split())


def split_tags(caption: str) -> list[str]:
    """A caption's comma-separated tags, stripped, empty ones dropped."""
    return [t for t in (part.strip() for part in caption.split(",")) if t]


def check_token_shown(templates: list[str], captions: list[str], token: str, tokenize: Callable[[str], list[int]],
                      token_ids: list[int], source: str, window: int = 75) -> None:
    """Every template line must show all of the token's vectors to the text encoder, inside the
    `window` ids it reads, for at least one caption. A line that never does would train nothing
    (no gradient reaches the vectors): ValueError naming `source` (the template file or built-in)
    and the line. A line that loses the token only with some (long) captions gets a warning.

    tokenize(text) -> ids with the registered token expanded to `token_ids`; a token glued to
    other characters ("[name]s") is not matched by the tokenizer and shows up here as missing.
    """
    captions = sorted(set(captions)) or [""]
    cut = 0
    for line in templates:
        shown = 0
        for caption in captions:
            ids = tokenize(fill(line, token, caption))
            at = [i for i, x in enumerate(ids) if x == token_ids[-1]]
            if at and at[0] < window:
                shown += 1
            elif not at:
                raise ValueError(f"template {source}: in the line {line!r} the tokenizer never sees {token} "
                                 "(is [name] glued to other characters?); put [name] between spaces or commas")
        if shown == 0:
            raise ValueError(f"template {source}: the line {line!r} puts {token} after the first {window} tokens the "
                             "text encoder reads, for every caption, so it would train nothing; move [name] "
                             "before [filewords] or shorten the captions")
        cut += len(captions) - shown
    if cut:
        log.warning("%d of the %d training prompts (template line x caption) put %s past the %d tokens the text "
                    "encoder reads: those samples teach nothing; move [name] to the front or shorten the captions",
                    cut, len(templates) * len(captions), token, window)
