"""`python -m minti`: the command line. Each subcommand lives in its own module, which provides
add_arguments(parser) and run(args) -> exit status; what they share (device, dtype choices, model
loading, logging, progress) is minti.cli.common, and no command imports another."""
from __future__ import annotations

import argparse
import importlib
import sys

from minti.errors import UserError
from minti.version import __version__

# name -> (help, module)
SUBCOMMANDS = {
    "train": ("train a textual-inversion embedding", "minti.cli.train"),
    "sample": ("generate images with an embedding", "minti.cli.sample"),
    "inspect": ("describe a checkpoint: family, prediction type, dtype, parameters", "minti.cli.inspect"),
    "doctor": ("check this machine: versions, GPU, which kernels run, a kernel self-test, memory plans",
               "minti.cli.doctor"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m minti",
        description="minti: minimal-memory textual inversion for Stable Diffusion (SD 1.x, 2.x, XL).",
    )
    parser.add_argument("--version", action="version", version=f"minti {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    # imported here, inside main()'s Ctrl-C handler, not at the top: they import torch (~2 s, where a
    # Ctrl-C at start lands), and the console script `minti` imports this module outside any handler
    for name, (help_text, module_name) in SUBCOMMANDS.items():
        importlib.import_module(module_name).add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; -> its exit status: 0, 2 for input refused (UserError, as argparse does),
    1 for a run that failed after it started (RunError), 130 for Ctrl-C."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except KeyboardInterrupt:  # while the subcommands' modules import
        print("minti: interrupted while starting; nothing was done", file=sys.stderr)
        return 130
    if args.command is None:
        parser.print_help()
        return 2
    _help, module_name = SUBCOMMANDS[args.command]
    try:
        return importlib.import_module(module_name).run(args)
    except UserError as e:
        print(f"minti {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:  # a subcommand that saves on Ctrl-C says so itself; this is the rest
        print(f"minti {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line(e: Exception) -> str:
    # a message built from a library's text (a path, an OSError) must not break the one-line promise
    return " ".join(str(e).split())
