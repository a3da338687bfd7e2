"""minti: minimal textual inversion for Stable Diffusion."""
import re
from pathlib import Path

from setuptools import setup

VERSION = re.search(r'__version__ = "([^"]+)"', (Path(__file__).parent / "minti" / "version.py").read_text()).group(1)

setup(
    name="minti",
    version=VERSION,
    description="Minimal-memory textual inversion for Stable Diffusion (SD 1.x, 2.x, XL), PyTorch + Triton",
    python_requires=">=3.10",
    # kernels/ is a top-level folder in the source tree but is always imported as
    # minti.kernels: a PyPI package named `kernels` exists and must never be shadowed.
    packages=["minti", "minti.models", "minti.loading", "minti.training", "minti.cli", "minti.demo", "minti.kernels"],
    package_dir={"minti": "minti", "minti.kernels": "kernels"},
    package_data={"minti.kernels": ["register_budget.json"]},  # the measured register budget the kernels read
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
