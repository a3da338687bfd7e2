"""Prompt templates for training: each line names the concept with [name] (the placeholder token)
and may add the image's caption with [filewords].

Our own phrasings. Variety matters more than any single line: the token should carry the
concept, not one sentence structure, so the lines vary framing, light, distance and medium
while never describing the subject itself (that is what the token has to learn).
"""
from __future__ import annotations

from pathlib import Path

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


def fill(template: str, token: str, caption: str = "") -> str:
    """Put the token and caption into one template line; tidy the commas a missing caption leaves."""
    text = template.replace("[name]", token).replace("[filewords]", caption.strip())
    text = " ".join(text.split())
    while ", ," in text:
        text = text.replace(", ,", ",")
    return text.strip().strip(",").strip()
