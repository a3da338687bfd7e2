"""The --concepts file: several concepts trained in one run (minti.training.trainer.train_many).

    [[concept]]
    token = "<my-cat>"
    images = "photos/cat"     # a folder; relative paths are relative to this file's folder
    init = "cat"              # optional, as --init (words, or an embedding file)
    vectors = 2               # optional, as --vectors
    template = "object"       # optional, as --template (object, style or a prompt file)
    lr = 5e-3                 # optional, as --lr (a number or A1111's schedule string)
    name = "cat"              # optional: its folder under --output (default: the token without <>)

    [[concept]]
    token = "<my-dog>"
    images = "photos/dog"

The same in JSON: {"concept": [{"token": "<my-cat>", "images": "photos/cat"}, ...]}. Everything
else (steps, resolution, seed, batch size per concept, ...) comes from the command line and is
the same for every concept; init, vectors, template and lr given there are the defaults for
concepts that do not set them. TOML needs Python 3.11's tomllib or the tomli package.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: the tomli package, if installed (an optional dependency)
    try:
        import tomli as tomllib
    except ImportError:
        tomllib = None

from minti.errors import UserError
from minti.training import templates as tpl
from minti.training.embedding import file_stem
from minti.training.placeholder import looks_like_a_path

# key -> (the types it takes, how the error names them)
KEYS = {"token": ((str,), "a string"), "images": ((str,), "a string (a folder)"), "init": ((str,), "a string"),
        "vectors": ((int,), "a whole number"), "template": ((str,), "a string"),
        "lr": ((int, float, str), "a number or an A1111 schedule string"), "name": ((str,), "a string")}
REQUIRED = ("token", "images")
# the keys that are TrainConfig fields (name is the folder under --output)
SETTINGS = ("token", "images", "init", "vectors", "template", "lr")


@dataclass
class Concept:
    """One [[concept]] table: `settings` holds the TrainConfig fields it sets (paths resolved)."""
    name: str
    settings: dict


def _parse(path: Path) -> object:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except ValueError as e:
            raise UserError(f"--concepts {path} is not valid JSON ({e})") from None
    if tomllib is None:
        raise UserError(f"--concepts {path}: reading TOML needs Python 3.11+ or the tomli package "
                        "(pip install tomli); or write the same tables as JSON")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"--concepts {path} is not valid TOML ({e})") from None


def _resolve_path(value: str, base: Path) -> str:
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else base / path)


def read_concepts(path: str | Path) -> list[Concept]:
    """The concepts of a .toml or .json file, checked; UserError naming the file, the concept
    and the fix for anything wrong."""
    path = Path(path)
    if path.suffix.lower() not in (".toml", ".json"):
        raise UserError(f"--concepts {path}: use a .toml or .json file of [[concept]] tables")
    if not path.is_file():
        raise UserError(f"--concepts {path} does not exist: write a .toml file with one [[concept]] table "
                        "(token, images) per concept")
    try:
        data = _parse(path)
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read --concepts {path} ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected tables at the top, e.g. [[concept]] (TOML) or {{\"concept\": [...]}} (JSON)")
    unknown = [k for k in data if k != "concept"]
    if unknown:
        raise UserError(f"{path}: unknown top-level key {unknown[0]!r}: write one [[concept]] table per concept")
    tables = data.get("concept")
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise UserError(f"{path} has no [[concept]] tables: add one per concept, each with token and images")
    base = path.resolve().parent
    concepts, seen = [], {}
    for number, table in enumerate(tables, 1):
        label = f"{path}: concept {number}" + (f" ({table['token']})" if isinstance(table.get("token"), str) else "")
        for key, value in table.items():
            if key not in KEYS:
                raise UserError(f"{label} has unknown key {key!r}: use {', '.join(KEYS)}")
            types, what = KEYS[key]
            if not isinstance(value, types) or isinstance(value, bool):
                raise UserError(f"{label}: {key} must be {what}, got {value!r}")
        for key in REQUIRED:
            if key not in table:
                raise UserError(f"{label} has no {key}: every [[concept]] needs token and images")
        settings = {k: table[k] for k in SETTINGS if k in table}
        settings["images"] = _resolve_path(table["images"], base)
        if "template" in settings and settings["template"] not in tpl.BUILTIN:
            settings["template"] = _resolve_path(settings["template"], base)
        if "init" in settings and looks_like_a_path(settings["init"]):
            settings["init"] = _resolve_path(settings["init"], base)
        name = table.get("name", file_stem(table["token"]))
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            raise UserError(f"{label}: name {name!r} must be a plain folder name")
        for key, value in (("token", table["token"]), ("name", name)):
            if (key, value) in seen:
                raise UserError(f"{path}: concepts {seen[key, value]} and {number} both have {key} {value!r}: "
                                f"give each concept its own {key}")
            seen[key, value] = number
        concepts.append(Concept(name, settings))
    return concepts


def joint_run_folders(path: str | Path | None) -> list[Path]:
    """The concept folders of a run of several concepts in `path` (each holds its own config.json;
    the run's folder holds none), or [] when `path` is not such a run."""
    if path is None:
        return []
    path = Path(path)
    if not path.is_dir() or (path / "config.json").exists():
        return []
    return sorted(p for p in path.iterdir() if p.is_dir() and (p / "config.json").is_file())
