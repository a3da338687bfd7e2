"""minti: minimal textual inversion for Stable Diffusion."""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "minti" / "version.py").read_text()).group(1)
# kernels/ is a top-level folder in the source tree but is always imported as minti.kernels: a PyPI
# package named `kernels` exists and must never be shadowed.
PACKAGE_DIRS = {"minti": "minti", "minti.kernels": "kernels",
                **{f"minti.{name}": f"minti/{name.replace('.', '/')}" for name in find_packages("minti")}}
CODE = {".py", ".pyc"}


def package_data(folder: str) -> list[str]:
    """Every file of a package's folder that is not code, its non-package subfolders included, so a
    new data file ships without a list to keep (a subpackage's files belong to that subpackage)."""
    root = HERE / folder
    files = []
    for path in sorted(root.rglob("*")):
        inside = path.relative_to(root).parts
        in_subpackage = any((root.joinpath(*inside[:i + 1]) / "__init__.py").exists() for i in range(len(inside) - 1))
        if path.is_file() and path.suffix not in CODE and "__pycache__" not in inside and not in_subpackage:
            files.append(path.relative_to(root).as_posix())
    return files


setup(
    name="minti",
    version=VERSION,
    description="Minimal-memory textual inversion for Stable Diffusion (SD 1.x, 2.x, XL), PyTorch + Triton",
    python_requires=">=3.10",
    packages=sorted(PACKAGE_DIRS),
    package_dir=PACKAGE_DIRS,
    package_data={name: files for name, folder in PACKAGE_DIRS.items() if (files := package_data(folder))},
    install_requires=[
        "torch>=2.4",
        # Triton wheels exist for Linux and Windows only; macOS/CPU installs use the torch path.
        "triton; sys_platform == 'linux' or sys_platform == 'win32'",
        "safetensors",
        "tokenizers",
        "open-clip-torch",  # only for its bundled CLIP BPE vocabulary file
        "pillow",
        "numpy",
    ],
    extras_require={"test": ["pytest", "diffusers", "transformers"]},
    entry_points={"console_scripts": ["minti=minti.cli:main"]},
)
