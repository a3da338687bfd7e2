"""minti: minimal textual inversion for Stable Diffusion.

Public API (see README.md):
    sd = minti.load(path, dtype=torch.float16, device="cuda")
    embedding = minti.train(sd, config)
    embeddings = minti.train_many(sd, [config, ...])   # several concepts sharing each batch
    embedding = minti.load_embedding(path)
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from minti.version import __version__  # noqa: F401  (re-exported)


def _mount_source_kernels() -> None:
    """Make `minti.kernels` importable when running from a source checkout without an install.

    setup.py maps the top-level kernels/ folder to `minti.kernels`; an installed or editable
    minti finds it that way. A plain checkout on sys.path (or a vendored copy) does not, so
    we load kernels/ under that name ourselves. It is never importable as plain `kernels`.
    """
    if importlib.util.find_spec(__name__ + ".kernels") is not None:
        return
    init = Path(__file__).resolve().parent.parent / "kernels" / "__init__.py"
    if not init.exists():
        return
    spec = importlib.util.spec_from_file_location(
        __name__ + ".kernels", init, submodule_search_locations=[str(init.parent)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)


_mount_source_kernels()


def __getattr__(name: str):
    # Lazy so that `import minti` stays cheap and the CLI's --help is instant.
    if name in ("load", "StableDiffusion"):
        from minti.loading import pipeline

        return getattr(pipeline, name)
    if name in ("train", "train_many"):
        from minti.training import trainer

        return getattr(trainer, name)
    if name == "TrainConfig":
        from minti.training.config import TrainConfig

        return TrainConfig
    if name in ("load_embedding", "Embedding"):
        from minti.training import embedding

        return getattr(embedding, name)
    raise AttributeError(f"module 'minti' has no attribute {name!r}")
