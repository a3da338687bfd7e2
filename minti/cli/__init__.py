"""`python -m minti`: the command line. Each subcommand lives in its own module."""
from __future__ import annotations

import argparse
import sys

from minti.errors import UserError

# name -> (help, module that provides add_arguments(parser) and run(args) -> int, or the
# issue that will bring it). A subcommand whose module has not landed says so and exits 2.
SUBCOMMANDS = {
    "train": ("train a textual-inversion embedding", "minti.cli.train", 5),
    "sample": ("generate images with an embedding", "minti.cli.sample", 5),
    "inspect": ("describe a checkpoint: family, prediction type, dtype, parameters", "minti.cli.inspect", 3),
}


def _load_module(name: str):
    import importlib

    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == name:
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m minti",
        description="minti: minimal-memory textual inversion for Stable Diffusion (SD 1.x, 2.x, XL).",
    )
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, (help_text, module_name, _issue) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        module = _load_module(module_name)
        if module is not None:
            module.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _help, module_name, issue = SUBCOMMANDS[args.command]
    module = _load_module(module_name)
    if module is None:
        print(f"minti {args.command}: not implemented yet (tracked in issue {issue}).", file=sys.stderr)
        return 2
    try:
        return module.run(args)
    except UserError as e:
        print(f"minti {args.command}: error: {e}", file=sys.stderr)
        return 1
