"""Several concepts in one run (minti.train_many, `train --concepts`), on the tiny model, CPU, fp32."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minti.cli import main
from minti.training.config import TrainConfig
from minti.training.embedding import load_embedding
from minti.training.trainer import Diverged, train, train_many

ROOT = Path(__file__).resolve().parents[2]
DEMO_IMAGES = ROOT / "weights" / "demo-concept"
TINY_MODEL = ROOT / "weights" / "minti-tiny.safetensors"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def squares(tmp_path_factory):
    """A second concept's pictures: a green square at three places."""
    folder = tmp_path_factory.mktemp("squares")
    for i in range(3):
        arr = np.full((64, 64, 3), 230, np.uint8)
        arr[8 + 6 * i:40 + 6 * i, 12:44] = (30, 160, 60)
        Image.fromarray(arr).save(folder / f"{i}.png")
    return folder


def cfg(token, images, output, **kw):
    # the two concepts differ in seed, init, vector count and lr, so that nothing lines up by chance
    base = dict(token=token, images=str(images), init="cat", steps=3, resolution=64, save_every=2, preview_every=0,
                lr=1e-2, output=str(output) if output is not None else None)
    base.update(kw)
    return TrainConfig(**base)


def heart(token, output, **kw):
    return cfg(token, DEMO_IMAGES, output, **kw)


def square(token, images, output, **kw):
    return cfg(token, images, output, seed=5, init="green square", vectors=2, lr=2e-2, **kw)


def losses(folder):
    return [json.loads(line)["loss"] for line in (folder / "loss.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def solo_and_joint(tiny_sd, squares, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    torch.set_num_threads(1)
    solo = [train(tiny_sd, heart("<h>", root / "solo-h")), train(tiny_sd, square("<q>", squares, root / "solo-q"))]
    joint = train_many(tiny_sd, [heart("<jh>", root / "joint" / "jh"), square("<jq>", squares, root / "joint" / "jq")])
    return root, solo, joint


def test_concepts_trained_together_match_each_trained_alone(tiny_sd, solo_and_joint):
    root, solo, joint = solo_and_joint
    for alone, together in zip(solo, joint):
        assert together.step == 3 and together.n_vectors == alone.n_vectors
        # not bit-equal: a convolution over a batch of 2 rounds differently from one over 1 on the
        # CPU (the text encoder and attention match exactly); 2.6e-7 is what 3 steps leave
        torch.testing.assert_close(together.vectors[0], alone.vectors[0], rtol=0, atol=1e-5)
    assert not torch.allclose(joint[0].vectors[0], joint[1].vectors[0][:1], atol=1e-3)  # really two concepts
    # each concept's folder holds exactly a solo run's files, its loss log the solo losses
    for alone, together in (("solo-h", "joint/jh"), ("solo-q", "joint/jq")):
        names = lambda folder: sorted(p.name.replace("j", "") for p in (root / folder).iterdir())  # noqa: E731
        assert names(together) == names(alone) and "state.pt" in names(alone)
        assert losses(root / together) == pytest.approx(losses(root / alone), abs=1e-5)
    torch.testing.assert_close(load_embedding(root / "joint" / "jq" / "jq-2.safetensors").vectors[0],
                               load_embedding(root / "solo-q" / "q-2.safetensors").vectors[0], rtol=0, atol=1e-5)


def test_a_stopped_joint_run_resumes_to_the_uninterrupted_vectors(tiny_sd, squares, solo_and_joint, tmp_path):
    _, _, joint = solo_and_joint
    h, q = tmp_path / "rh", tmp_path / "rq"
    stopped = train_many(tiny_sd, [heart("<rh>", h), square("<rq>", squares, q)], on_step=lambda info: info.step < 1)
    assert [e.step for e in stopped] == [1, 1]
    resumed = train_many(tiny_sd, [heart("<rh>", h, resume=str(h)), square("<rq>", squares, q, resume=str(q))])
    for again, straight in zip(resumed, joint):
        assert again.step == 3
        torch.testing.assert_close(again.vectors[0], straight.vectors[0], rtol=0, atol=1e-6)


def test_a_diverging_concept_stops_alone_and_the_others_train_on(tiny_sd, squares, tmp_path):
    # an absurd learning rate throws <nan>'s vectors to 1e30 after one step; its next loss is inf/nan
    with pytest.raises(Diverged, match="<dh>: the loss or its gradient became non-finite at step 2") as e:
        train_many(tiny_sd, [heart("<dh>", tmp_path / "dh", lr=1e30), square("<dq>", squares, tmp_path / "dq")])
    assert "\n" not in str(e.value) and str(tmp_path / "dh") in str(e.value)
    assert "kept the embedding of step 0" in str(e.value)
    kept, other = e.value.embeddings
    # the last step whose loss was finite: the vectors before the update that threw them to 1e30
    assert kept.step == 0 and load_embedding(tmp_path / "dh" / "dh.pt").step == 0
    assert torch.equal(kept.vectors[0], load_embedding(tmp_path / "dh" / "dh.pt").vectors[0])
    assert other.step == 3 and load_embedding(tmp_path / "dq" / "dq.pt").step == 3


BAD_FILES = [
    ("c.yaml", "", "use a .toml or .json file"),
    ("c.toml", "[[concept]\ntoken = 1", "is not valid TOML"),
    ("c.json", "{\"concept\": [", "is not valid JSON"),
    ("c.toml", "[[concepts]]\ntoken = '<a>'\nimages = 'x'", "unknown top-level key 'concepts'"),
    ("c.toml", "title = 'x'\n", "unknown top-level key 'title'"),
    ("c.json", "{\"concept\": []}", "has no [[concept]] tables"),
    ("c.toml", "[[concept]]\ntoken = '<a>'\n", "concept 1 (<a>) has no images"),
    ("c.toml", "[[concept]]\ntoken = '<a>'\nimages = 'x'\nlrr = 1\n", "unknown key 'lrr'"),
    ("c.toml", "[[concept]]\ntoken = '<a>'\nimages = 'x'\nvectors = '2'\n", "vectors must be a whole number"),
    ("c.toml", "[[concept]]\ntoken = '<a>'\nimages = 'x'\n[[concept]]\ntoken = '<a>'\nimages = 'y'\n",
     "concepts 1 and 2 both have token '<a>'"),
    ("c.toml", "[[concept]]\ntoken = '<a>'\nimages = 'x'\nname = '../up'\n", "must be a plain folder name"),
]


@pytest.mark.parametrize("file,text,message", BAD_FILES, ids=[m for _, _, m in BAD_FILES])
def test_concepts_file_mistakes_are_one_line_errors_naming_the_file(file, text, message, tmp_path, capsys):
    path = tmp_path / file
    path.write_text(text)
    assert main(["train", "--model", str(TINY_MODEL), "--concepts", str(path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minti train: error:") and message in err[0], err
    assert str(path) in err[0]


def test_concepts_file_trains_each_concept_into_its_folder_and_resumes_as_one_run(squares, tmp_path, capsys):
    (tmp_path / "pics").symlink_to(squares)
    concepts = tmp_path / "studio.toml"  # image folders relative to the file, whatever the working directory
    concepts.write_text('[[concept]]\ntoken = "<ch>"\nimages = "%s"\ninit = "heart"\n\n'
                        '[[concept]]\ntoken = "<cq>"\nimages = "pics"\nvectors = 2\nlr = 0.02\nname = "green"\n'
                        % DEMO_IMAGES)
    out = tmp_path / "runs"
    common = ["--resolution", "64", "--preview-every", "0", "--save-every", "0", "--device", "cpu"]
    assert main(["train", "--model", str(TINY_MODEL), "--concepts", str(concepts), "--output", str(out),
                 "--steps", "1", *common]) == 0
    assert "2 concepts trained together" in capsys.readouterr().out
    for folder, name in (("ch", "ch"), ("green", "cq")):
        assert {p.name for p in (out / folder).iterdir()} == {f"{name}.safetensors", f"{name}.pt", "config.json",
                                                              "learned_embeds.safetensors", "loss.jsonl", "state.pt",
                                                              "report.html"}
    assert load_embedding(out / "green" / "cq.pt").n_vectors == 2
    assert json.loads((out / "green" / "config.json").read_text())["config"]["lr"] == 0.02
    # --resume of the run's folder continues every concept, settings from their config.json
    assert main(["train", "--resume", str(out), "--steps", "2"]) == 0
    assert "<cq> trained for 2 steps" in capsys.readouterr().out
    assert [load_embedding(out / f / f"{n}.pt").step for f, n in (("ch", "ch"), ("green", "cq"))] == [2, 2]
