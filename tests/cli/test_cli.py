import subprocess
import sys

import minti
from minti.cli import SUBCOMMANDS


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minti", *args], capture_output=True, text=True, timeout=120)


def test_package_and_kernels_import_without_cuda():
    import minti.kernels  # noqa: F401  (mapped from kernels/ by setup.py)

    assert minti.__version__


def test_help_lists_every_subcommand():
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    for name in ("train", "sample", "inspect"):
        assert name in result.stdout
    assert set(SUBCOMMANDS) >= {"train", "sample", "inspect"}


def test_unknown_subcommand_exits_nonzero_with_usage():
    result = run_cli("frobnicate")
    assert result.returncode != 0
    assert "usage:" in result.stderr


def test_kernels_are_not_importable_as_top_level_package():
    import importlib.util

    spec = importlib.util.find_spec("kernels")
    assert spec is None or "minti" not in str(spec.origin)


def test_version_prints_minti_and_its_version(capsys):
    import pytest

    from minti.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"minti {minti.__version__}"
