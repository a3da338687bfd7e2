"""Training on fp8 weights (--weights fp8): the demo still learns, the embedding is scored with the
full-precision model, a run resumes exactly, and --resume keeps the run's weight storage."""
import json
from pathlib import Path

import pytest
import torch

import minti
from checkpoints import make_single_file
from minti.cli import build_parser, main
from minti.cli.train import resolve
from minti.demo import demo
from minti.loading import pipeline
from minti.training.config import TrainConfig
from minti.training.run_folder import RunFolder
from minti.training.trainer import train
from test_demo import FAST, MARGIN, MIN_HELDOUT_DROP, SHIPPED_MODEL, demo_env, tiny  # noqa: F401 (fixtures)


def test_fp8_demo_is_scored_with_the_full_precision_model(demo_env, monkeypatch):
    loaded = []
    real_load = pipeline.load  # minti.load is this function, looked up on its module at each use
    monkeypatch.setattr(pipeline, "load", lambda *a, **kw: loaded.append(kw.get("weights")) or real_load(*a, **kw))
    assert main(["train", "--weights", "fp8", *FAST]) == 0
    summary = json.loads((demo_env / "runs" / "demo" / demo.SUMMARY_FILE).read_text())
    assert (summary["trained_weights"], summary["evaluated_weights"]) == ("fp8", "dtype")
    assert loaded == ["fp8", None]  # trained on fp8, then the same file in full precision for the grid


def test_resume_keeps_the_runs_weight_storage_unless_overridden(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"config": {"token": "<r>"}, "model": "m.safetensors",
                                                 "dtype": "float32", "weights": "fp8", "identity": {}}))
    for argv, want in ((["--resume", str(out)], "fp8"), (["--resume", str(out), "--weights", "dtype"], "dtype")):
        load, _ = resolve(build_parser().parse_args(["train", *argv]))
        assert load["weights"] == want
    assert RunFolder(out).read_config()["weights"] == "fp8"


@pytest.fixture(scope="module")
def narrow(tmp_path_factory):
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("fp8run")
    images = root / "images"
    images.mkdir()
    for i in range(3):
        arr = np.full((64, 64, 3), 230, np.uint8)
        arr[10 + 5 * i:40 + 5 * i, 12:44] = (200, 40 + 50 * i, 30)
        Image.fromarray(arr).save(images / f"{i}.png")
    return make_single_file(root, "sd1"), images


def run_fp8_steps(ckpt, images, out, steps, resume=False):
    sd = minti.load(ckpt, dtype=torch.float32, device="cpu", weights="fp8")  # as a fresh process would
    return train(sd, TrainConfig(images=str(images), token="<r>", init="cat", vectors=2, steps=steps, lr=2e-2,
                                 batch_size=2, resolution=64, save_every=0, preview_every=0, lr_schedule="constant",
                                 output=str(out), resume=str(out) if resume else None))


def test_fp8_run_resumes_exactly_where_an_uninterrupted_run_would_be(narrow, tmp_path, one_thread):
    straight = run_fp8_steps(*narrow, tmp_path / "a", 4)
    half = run_fp8_steps(*narrow, tmp_path / "b", 2)
    assert half.step == 2 and not torch.equal(half.vectors[0], straight.vectors[0])
    resumed = run_fp8_steps(*narrow, tmp_path / "b", 4, resume=True)
    assert resumed.step == 4
    torch.testing.assert_close(resumed.vectors[0], straight.vectors[0], rtol=0, atol=1e-6)
    full = minti.load(narrow[0], dtype=torch.float32, device="cpu")  # and fp8 did train something else
    assert not torch.equal(train(full, TrainConfig(images=str(narrow[1]), token="<r>", init="cat", vectors=2,
                                                   steps=4, lr=2e-2, batch_size=2, resolution=64, save_every=0,
                                                   preview_every=0, lr_schedule="constant")).vectors[0],
                           straight.vectors[0])


@pytest.mark.heavy
def test_demo_learns_on_fp8_weights_and_the_embedding_works_unquantised(tmp_path):
    """The full demo (its real settings, the shipped model) trained with --weights fp8, scored with
    the full-precision model: the same margins as tests/demo/test_demo.py's end-to-end test."""
    assert demo.DEMO_MODEL == SHIPPED_MODEL
    assert main(["train", "--weights", "fp8", "--output", str(tmp_path / "demo")]) == 0
    summary = json.loads((tmp_path / "demo" / demo.SUMMARY_FILE).read_text())
    assert summary["trained_weights"] == "fp8" and summary["evaluated_weights"] == "dtype"
    ok, why = demo.learned_beats_init(summary, MARGIN, MIN_HELDOUT_DROP)
    assert ok, why
