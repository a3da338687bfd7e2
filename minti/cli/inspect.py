"""`python -m minti inspect PATH [--json]`: what a checkpoint is, without reading its weights.

The models are built on the meta device from the file's header, so this is instant even for
SDXL, and it fails exactly where `minti.load` would (same detection, same key matching).
"""
from __future__ import annotations

import argparse
import json

from minti.loading.pipeline import load


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a .safetensors / .ckpt file or a diffusers folder")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--ema", action="store_true", help="describe the model_ema.* UNet instead")


def _millions(n: int) -> str:
    return f"{n / 1e6:,.2f}M"


def run(args: argparse.Namespace) -> int:
    # dtype=None: describe the file as it is; device="meta": shapes only, no weights read
    info = load(args.path, dtype=None, device="meta", ema=args.ema).describe()
    if args.json:
        print(json.dumps(info))
        return 0
    guessed = " (guessed: the weights cannot tell v from eps; override with prediction='eps'|'v')" if info["prediction_guessed"] else ""
    lines = [
        f"source      {info['source']} ({info['format']})",
        f"family      {info['family']}",
        f"prediction  {info['prediction']}{guessed}",
        f"dtype       {info['dtype']}",
        "params      " + ", ".join(f"{k} {_millions(v)}" for k, v in info["params"].items())
        + f" (total {_millions(info['params_total'])})",
        "tokenizers  " + "; ".join(info["tokenizers"]),
        "ignored     " + (", ".join(info["ignored"]) if info["ignored"] else "none"),
    ]
    print("\n".join(lines))
    return 0
