""".ckpt pickles: pytorch_lightning's objects load as inert placeholders (as A1111, ComfyUI and Forge
load the original SD 1.x releases); anything else a pickle would import is still refused. Built with
fake pytorch_lightning modules that exist only while the file is written: loading must never need,
import or call them."""
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import minti
from minti.loading.checkpoint import LightningPlaceholder, torch_load
from minti.loading.detect import CheckpointError

TINY = Path(__file__).resolve().parents[2] / "weights" / "minti-tiny.safetensors"
CALLBACK = "pytorch_lightning.callbacks.model_checkpoint"


def write_lightning_ckpt(path: Path, monkeypatch, marker: Path, also: dict | None = None) -> dict:
    """A Lightning-style SD 1.x checkpoint of the tiny model whose pickle references
    pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint as a dict key (how Lightning 1.x
    stores callback states) and as an instance, plus a Lightning function it would call on load
    (touching `marker`). -> the state dict."""
    state = load_file(str(TINY))
    calls = []
    with monkeypatch.context() as m:
        modules = {}
        for name in ("pytorch_lightning", "pytorch_lightning.callbacks", CALLBACK, "pytorch_lightning.utilities"):
            modules[name] = types.ModuleType(name)
            m.setitem(sys.modules, name, modules[name])

        class ModelCheckpoint:
            def __init__(self):
                self.dirpath, self.best_model_score = "logs/checkpoints", torch.tensor(0.25)

            def __setstate__(self, state):
                calls.append("setstate")

        def touch(path):  # what the real library could do instead: anything
            calls.append("touch")
            Path(path).touch()

        class Hook:
            def __reduce__(self):
                return touch, (str(marker),)

        ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = CALLBACK, "ModelCheckpoint"
        touch.__module__, touch.__qualname__ = "pytorch_lightning.utilities", "touch"
        modules[CALLBACK].ModelCheckpoint = ModelCheckpoint
        modules["pytorch_lightning.utilities"].touch = touch
        torch.save({"epoch": 6, "global_step": 470000, "pytorch-lightning_version": "1.4.2", "state_dict": state,
                    "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.25), "dirpath": "logs"}},
                    "checkpoint_callback": ModelCheckpoint(), "on_load": Hook(), **(also or {})}, path)
    assert "pytorch_lightning" not in sys.modules and not calls and not marker.exists()
    return state


def test_lightning_callbacks_load_as_inert_placeholders_never_imported_nor_called(tmp_path, monkeypatch):
    marker = tmp_path / "touched"
    path = tmp_path / "sd-v1-tiny.ckpt"
    state = write_lightning_ckpt(path, monkeypatch, marker)
    with pytest.raises(Exception, match="pytorch_lightning"):  # what weights_only alone says
        torch.load(path, weights_only=True)

    tensors = torch_load(path)
    assert set(tensors) == set(state) and torch.equal(tensors["model.diffusion_model.out.2.weight"],
                                                      state["model.diffusion_model.out.2.weight"])
    sd = minti.load(path, dtype=None, device="meta")
    assert sd.family == "sd1" and sd.format == "pickle"
    assert not marker.exists() and "pytorch_lightning" not in sys.modules
    assert not any(isinstance(v, LightningPlaceholder) for v in tensors.values())


def test_a_lightning_checkpoint_that_also_runs_code_is_still_refused(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            import os

            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.ckpt"
    write_lightning_ckpt(path, monkeypatch, tmp_path / "touched", also={"payload": Payload()})
    with pytest.raises(CheckpointError, match=r"would run code when unpickled \(it references (posix|nt)\.system\)"):
        torch_load(path)
    assert not marker.exists()
