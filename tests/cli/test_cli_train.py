"""`python -m minti train` / `sample`: argument handling, bad input as one line, Ctrl-C, resume."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from checkpoints import make_single_file
from minti.cli import main
from minti.training.embedding import Embedding, load_embedding

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_single_file(tmp_path_factory.mktemp("ckpt"), "sd1")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for i in range(2):
        arr = np.full((64, 64, 3), 230, np.uint8)
        arr[10 + 10 * i:40 + 10 * i, 12:44] = (30, 160, 60)
        Image.fromarray(arr).save(folder / f"{i}.jpg")
    return folder


def train_args(ckpt, images, out, *extra):
    return ["train", "--model", str(ckpt), "--images", str(images), "--token", "<leaf>", "--init", "leaf",
            "--resolution", "64", "--preview-every", "0", "--save-every", "0", "--device", "cpu",
            "--output", str(out), *extra]


def one_line_error(capsys, argv, needle):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith(f"minti {argv[0]}: error:") and needle in err[0], err
    return err[0]


def test_bad_train_input_is_one_line_naming_the_problem(ckpt, images, tmp_path, capsys, monkeypatch):
    from minti.demo import demo

    # without --model the demo model is used: while it is missing, the error says how to get one
    monkeypatch.setattr(demo, "DEMO_MODEL", tmp_path / "minti-tiny.safetensors")
    one_line_error(capsys, ["train", "--images", str(images), "--token", "<a>"], "pass --model")
    one_line_error(capsys, ["train", "--model", str(tmp_path / "nope.safetensors"), "--images", str(images),
                            "--token", "<a>"], "nope.safetensors does not exist")
    out = tmp_path / "o"
    one_line_error(capsys, train_args(ckpt, tmp_path / "pics", out), "pics does not exist")
    (tmp_path / "empty").mkdir()
    one_line_error(capsys, train_args(ckpt, tmp_path / "empty", out), "has no images")
    one_line_error(capsys, train_args(ckpt, images, out, "--vectors", "80"), "outside 1-75")
    one_line_error(capsys, train_args(ckpt, images, out, "--init", "", "--token", "<b>"), "tokenizes to nothing")
    one_line_error(capsys, ["train", "--model", str(ckpt), "--images", str(images), "--token", "cat",
                            "--device", "cpu", "--output", str(out)], "vocabulary word")
    one_line_error(capsys, train_args(ckpt, images, out, "--lr", "fast"), "cannot read learning rate")
    one_line_error(capsys, ["train", "--resume", str(tmp_path)], "no config.json")
    Embedding("<w>", [torch.zeros(1, 1024)]).save(tmp_path / "sd2-emb.pt")
    one_line_error(capsys, train_args(ckpt, images, out, "--init", str(tmp_path / "sd2-emb.pt")), "[1024]-wide")


def test_train_then_resume_from_the_folder_alone_then_sample(ckpt, images, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(ckpt, images, out, "--steps", "2", "--vectors", "2")) == 0
    summary = capsys.readouterr().out
    assert "trained for 2 steps" in summary and str(out / "leaf.safetensors") in summary
    # --resume alone: model, images, token and settings come from the run's config.json
    assert main(["train", "--resume", str(out), "--steps", "3"]) == 0
    assert "trained for 3 steps" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["config"]["vectors"] == 2
    emb = load_embedding(out / "leaf.pt")
    assert emb.step == 3

    samples = tmp_path / "samples"
    argv = ["sample", "--model", str(ckpt), "--embedding", str(out / "leaf.pt"), "--prompt", "a photo of <leaf>",
            "--n", "2", "--steps", "2", "--width", "64", "--height", "64", "--device", "cpu", "--out", str(samples)]
    assert main(argv) == 0
    assert main(argv[:-2] + ["--out", str(samples), "--seed", "0", "--n", "1"]) == 0
    files = sorted(samples.glob("*.png"))
    assert [f.name for f in files] == ["00000-seed0.png", "00001-seed1.png", "00002-seed0.png"]  # never overwritten
    a, b, c = (np.asarray(Image.open(f)) for f in files)
    assert a.shape == (64, 64, 3) and np.array_equal(a, c) and not np.array_equal(a, b)  # seeded


def test_sample_bad_input_is_one_line(ckpt, tmp_path, capsys, monkeypatch):
    from minti.demo import demo

    base = ["sample", "--model", str(ckpt), "--device", "cpu", "--out", str(tmp_path / "s")]
    monkeypatch.setattr(demo, "DEMO_MODEL", tmp_path / "minti-tiny.safetensors")  # the demo model, missing
    one_line_error(capsys, ["sample", "--prompt", "x"], "pass --model")
    one_line_error(capsys, base, "no prompt")
    one_line_error(capsys, base + ["--prompt", "x", "--embedding", str(tmp_path / "no.pt")], "no.pt does not exist")
    Embedding("<w>", [torch.zeros(1, 1024)]).save(tmp_path / "wide.safetensors")
    one_line_error(capsys, base + ["--prompt", "x <wide>", "--embedding", str(tmp_path / "wide.safetensors")],
                   "[1024]-wide")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    one_line_error(capsys, base + ["--prompt", "x", "--embedding", str(tmp_path / "junk.pt")], "junk.pt")


def test_ctrl_c_saves_exits_0_with_a_resume_hint(ckpt, images, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "minti", *train_args(ckpt, images, out, "--steps", "100000")],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "loss.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and log.read_text().count("\n") >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and f"--resume {out}" in stderr
    step = torch.load(out / "state.pt", weights_only=True)["step"]
    assert step >= 2
    assert load_embedding(out / "leaf.pt").step == step
    assert load_embedding(out / "leaf.safetensors").vectors[0].shape == (1, 32)


# TrainConfig fields that have no command-line flag on purpose: optimizer internals, the fp16
# loss scale and the preview's sampler settings (the demo sets its own guidance in Python).
API_ONLY = {"adam_betas", "adam_eps", "loss_scale", "preview_guidance", "preview_sampler"}


def train_parser():
    import argparse

    from minti.cli.train import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser


def test_every_train_config_field_is_a_flag_whose_help_ends_with_its_default():
    from dataclasses import MISSING, fields

    from minti.training.config import TrainConfig

    listed = subprocess.run([sys.executable, "-m", "minti", "train", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT))).stdout
    parser = train_parser()
    actions = {opt: a for a in parser._actions for opt in a.option_strings}
    flagged = set()
    for field in fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.name in API_ONLY:
            assert flag not in actions, f"{field.name} is listed as API-only but has {flag}"
            continue
        flagged.add(field.name)
        assert flag in listed and flag in actions, f"TrainConfig.{field.name} has no {flag} in train --help"
        assert field.default is not MISSING
        default = field.metadata["default_help"]
        if default is None:
            default = (("on" if field.default else "off") if isinstance(field.default, bool)
                       else f"{field.default:g}" if isinstance(field.default, float) else str(field.default))
        help_text = actions[flag].help.replace("%%", "%")
        assert help_text.endswith(f"(default {default})"), (flag, help_text)
    assert flagged | API_ONLY == {f.name for f in fields(TrainConfig)}
    # the defaults as users read them, including the per-family ones
    helps = {opt: a.help for opt, a in actions.items()}
    assert helps["--steps"].endswith("(default 3000)") and helps["--lr"].endswith("(default 0.005)")
    assert helps["--flip"].endswith("(default off)") and helps["--crop"].endswith("(default center)")
    assert helps["--resolution"].endswith("(default 512; 768 for SD 2.x v models; 1024 for SDXL)")
    assert helps["--output"].endswith("(default runs/<token without <>>)")
    # every flag parses to None when not given: resolve() fills from the demo or the resumed run
    assert all(v is None for v in vars(parser.parse_args([])).values())
    assert actions["--crop"].choices == ("center", "random") and actions["--memory"].choices == ("auto", "low", "fast")
    switches = parser.parse_args(["--no-flip", "--alpha-mask", "--overwrite"])
    assert (switches.flip, switches.alpha_mask, switches.overwrite) == (False, True, True)


def test_resume_reads_a_config_json_written_before_preview_cfg_was_renamed(ckpt, images, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(ckpt, images, out, "--steps", "1")) == 0
    record = json.loads((out / "config.json").read_text())
    del record["config"]["preview_guidance"]
    record["config"]["preview_cfg"] = 3.0  # what minti wrote before the rename
    (out / "config.json").write_text(json.dumps(record))
    assert main(["train", "--resume", str(out), "--steps", "2"]) == 0
    assert "trained for 2 steps" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["config"]["preview_guidance"] == 3.0
    assert load_embedding(out / "leaf.pt").step == 2
