"""`python -m minti train` / `sample` on SDXL: the real single-file layout at full width, and the
narrow model for the CLI's SDXL behaviour."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from checkpoints import make_full_width_file, make_single_file
from minti.cli import main
from minti.loading.families import FAMILIES


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for i, (h, w) in enumerate([(96, 80), (72, 128)]):
        arr = np.full((h, w, 3), 225, np.uint8)
        arr[10:50, 8 + 12 * i:48 + 12 * i] = (40, 90, 200)
        Image.fromarray(arr).save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def narrow(tmp_path_factory):
    return make_single_file(tmp_path_factory.mktemp("xl"), "sdxl")


def train_argv(model, images, out, *extra):
    return ["train", "--model", str(model), "--images", str(images), "--token", "<xl-cat>", "--init", "cat",
            "--resolution", "64", "--steps", "2", "--preview-every", "0", "--save-every", "0", "--device", "cpu",
            "--output", str(out), *extra]


def check_sdxl_file(path, n_vectors, dims):
    with safe_open(str(path), "pt") as f:
        assert sorted(f.keys()) == ["clip_g", "clip_l"]
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert [tuple(tensors[k].shape) for k in ("clip_l", "clip_g")] == [(n_vectors, d) for d in dims]
    for t in tensors.values():
        assert t.dtype == torch.float32 and t.is_contiguous() and torch.isfinite(t).all()
    return tensors


@pytest.mark.heavy
def test_full_width_sdxl_single_file_trains_two_steps_through_the_cli(tmp_path, images, capsys):
    # Every key and shape of the real SDXL base file (2.6 B UNet parameters; bf16: 6.9 GB on disk,
    # memory-mapped while loading), random weights; 64 px keeps the step cheap, the widths are real.
    model = make_full_width_file(tmp_path / "sdxl_base.safetensors", "sdxl", torch.bfloat16)
    out = tmp_path / "run"
    assert main(train_argv(model, images, out, "--dtype", "bfloat16", "--vectors", "2")) == 0
    captured = capsys.readouterr()
    assert "experimental" not in captured.err
    assert not (out / "xl-cat.pt").exists() and not (out / "learned_embeds.safetensors").exists()
    check_sdxl_file(out / "xl-cat.safetensors", 2, (768, 1280))
    record = json.loads((out / "config.json").read_text())
    assert record["config"]["resolution"] == 64 and record["identity"]["family"] == "sdxl"
    model.unlink()  # 6.9 GB: do not wait for pytest's tmp cleanup


def test_sdxl_train_writes_clip_l_clip_g_without_warning_then_sample_draws_with_it(narrow, images, tmp_path,
                                                                                    capsys):
    out = tmp_path / "run"
    assert main(train_argv(narrow, images, out)) == 0
    err = capsys.readouterr().err
    assert "experimental" not in err and "warning" not in err.lower(), err
    emb = check_sdxl_file(out / "xl-cat.safetensors", 1, (32, 32))
    samples = tmp_path / "samples"
    assert main(["sample", "--model", str(narrow), "--embedding", str(out / "xl-cat.safetensors"), "--prompt",
                 "a photo of <xl-cat>", "--steps", "2", "--n", "1", "--width", "64", "--height", "64",
                 "--device", "cpu", "--out", str(samples)]) == 0
    drawn = sorted(samples.glob("*.png"))
    assert len(drawn) == 1 and Image.open(drawn[0]).size == (64, 64)
    assert emb["clip_l"].shape[0] == 1


def test_sdxl_sample_defaults_to_1024_and_train_help_names_sdxl(capsys):
    assert FAMILIES["sdxl"].default_size("eps") == 1024
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    helps = " ".join(capsys.readouterr().out.split())
    assert "SD 1.x, 2.x, SDXL" in helps and "1024 for SDXL" in helps
