"""weights/build_tiny.py as a module, for the tests that build (quick) tiny models."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "weights" / "build_tiny.py"


def build_tiny_module():
    if "build_tiny" not in sys.modules:  # registered first: its dataclasses look themselves up
        spec = importlib.util.spec_from_file_location("build_tiny", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["build_tiny"] = module
        spec.loader.exec_module(module)
    return sys.modules["build_tiny"]
