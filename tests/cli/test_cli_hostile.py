"""Mistaken or unlucky input to `python -m minti train/sample/inspect` (issue 17): nothing lost,
nothing silently wrong, no tracebacks. One test per class of input; each parameter is one way a
user gets there. Runs the CLI in-process on the tiny model at 64 px, 2 steps on the CPU; the model
is loaded once per module (cached_model), and most cases are refused before it is needed at all."""
import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import minti.cli.common as cli_common
import minti.cli.sample as cli_sample
import minti.cli.train as cli_train
from minti import atomic
from minti.cli import main
from minti.training.embedding import Embedding, load_embedding

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "weights" / "minti-tiny.safetensors"
TEXT = "cond_stage_model.transformer.text_model."

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A copy of the tiny model: not at the demo model's path, so a resumed run draws no demo grid."""
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    path.write_bytes(TINY.read_bytes())
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    arr = np.full((64, 64, 3), 230, np.uint8)
    arr[12:44, 16:48] = (220, 120, 30)
    Image.fromarray(arr).save(folder / "0.png")
    return folder


@pytest.fixture(scope="module")
def model_cache():
    return {}


@pytest.fixture(autouse=True)
def cached_model(monkeypatch, model_cache):
    """Load each model once per module: the runs here test what happens around the model."""
    real = cli_common.load_model

    def load_model(model, device, dtype, prediction, weights=None):
        key = (str(Path(model).resolve()) if Path(model).exists() else model, device, dtype, prediction, weights)
        if key not in model_cache:
            model_cache[key] = real(model, device, dtype, prediction, weights)
        return model_cache[key]

    for command in (cli_train, cli_sample):
        monkeypatch.setattr(command, "load_model", load_model)


def train_args(model, images, out, *extra) -> list[str]:
    return ["train", "--model", str(model), "--images", str(images), "--token", "<x>", "--init", "shape",
            "--resolution", "64", "--steps", "2", "--batch-size", "1", "--device", "cpu", "--preview-every", "0",
            "--save-every", "0", "--output", str(out), *extra]


def python_snippet(code: str, argument: Path) -> subprocess.CompletedProcess:
    """`code` run by a Python process of its own (with this checkout importable), `argument` its sys.argv[1]."""
    return subprocess.run([sys.executable, "-c", code, str(argument)], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))


def cli(capsys, argv) -> tuple[int, list[str], str]:
    """-> (exit status, stderr lines that are not progress or INFO lines, stdout)."""
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, captured.err
    lines = [line for line in captured.err.splitlines() if not line.startswith(("step ", "minti: INFO:"))]
    return rc, lines, captured.out


def one_line(capsys, argv, rc: int, *needles: str) -> str:
    """Exit status `rc`, exactly one error line, naming every needle."""
    status, lines, _ = cli(capsys, argv)
    assert status == rc and len(lines) == 1, (status, lines)
    assert lines[0].startswith(f"minti {argv[0]}: error: "), lines
    assert all(str(n) in lines[0] for n in needles), (needles, lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ work lost or silently wrong


@pytest.mark.parametrize("name", ["my-cat.pt", "my-cat.safetensors"])
def test_an_output_folder_named_like_a_file_holds_every_save(tiny, images, tmp_path, capsys, name):
    out = tmp_path / name
    rc, _, stdout = cli(capsys, train_args(tiny, images, out, "--save-every", "1", "--preview-every", "1",
                                           "--preview-steps", "1"))
    assert rc == 0 and "trained for 2 steps" in stdout
    assert out.is_dir() and {"x.safetensors", "x.pt", "learned_embeds.safetensors", "x-1.safetensors", "state.pt",
                             "previews/x-00000.png", "previews/x-00002.png"} <= set(snapshot(out))
    assert load_embedding(out / "x.pt").step == 2 and load_embedding(out / "x-1.safetensors").vectors[0].shape == (1, 64)


def a1111_folder(folder: Path) -> None:
    for name in ("x.pt", "x.safetensors", "learned_embeds.safetensors", "unrelated.pt"):
        (folder / name).write_bytes(b"someone else's " + name.encode())


def foreign_config(folder: Path) -> None:
    (folder / "config.json").write_text('{"model_type": "clip"}')  # another tool's, same name
    (folder / "loss.jsonl").write_text("mine\n")


def earlier_run(folder: Path) -> None:
    (folder / "config.json").write_text(json.dumps({"config": {"token": "<old>"}, "minti": "0.1.0"}))
    (folder / "state.pt").write_bytes(b"an earlier run's state")
    (folder / "old.pt").write_bytes(b"an earlier run's embedding")


@pytest.mark.parametrize("fill, needles", [
    (a1111_folder, ["learned_embeds.safetensors, x.pt, x.safetensors", "--overwrite"]),
    (foreign_config, ["config.json, loss.jsonl", "--overwrite"]),
    (earlier_run, ["already holds a training run", "--resume"]),
])
def test_files_a_run_did_not_write_are_never_replaced_without_overwrite(tiny, images, tmp_path, capsys, fill,
                                                                        needles):
    out = tmp_path / "embeddings"
    out.mkdir()
    fill(out)
    before = snapshot(out)
    one_line(capsys, train_args(tiny, images, out), 2, out, *needles)
    assert snapshot(out) == before


@pytest.mark.parametrize("resumed", [False, True])
def test_a_diverging_run_keeps_the_last_finite_embedding_and_says_its_step(tiny, images, tmp_path, capsys, resumed):
    # An absurd rate throws the vectors to 1e30 in one update and the next loss is NaN: the vectors
    # worth keeping are those before that update (the starting ones, or the resumed step-1 save).
    out = tmp_path / "run"
    if resumed:
        assert cli(capsys, train_args(tiny, images, out, "--steps", "1"))[0] == 0
        before = load_embedding(out / "x.pt")
        argv = ["train", "--resume", out, "--steps", "3", "--lr", "1e30"]
    else:
        argv = train_args(tiny, images, out, "--steps", "3", "--lr", "1e30")
    good = 1 if resumed else 0
    line = one_line(capsys, argv, 1, f"non-finite at step {good + 2}", f"kept the embedding of step {good}", out,
                    "Lower --lr")
    kept = load_embedding(out / "x.pt")  # which refuses non-finite or absurd vectors
    assert kept.step == good and torch.load(out / "state.pt", weights_only=True)["step"] == good
    assert load_embedding(out / "x.safetensors").vectors[0].abs().max() < 1
    if resumed:
        assert torch.equal(kept.vectors[0], before.vectors[0])


@pytest.fixture(scope="module")
def nan_model(tiny, tmp_path_factory) -> Path:
    """The tiny model with NaN in its UNet's last layer: a broken merge or conversion."""
    state = load_file(str(tiny))
    state["model.diffusion_model.out.2.weight"] = torch.full_like(state["model.diffusion_model.out.2.weight"],
                                                                  float("nan"))
    path = tmp_path_factory.mktemp("nan") / "nan.safetensors"
    save_file(state, str(path))
    return path


@pytest.mark.parametrize("broken", [float("nan"), float("inf"), 1e30, "nan weights"])
def test_sample_never_writes_black_images_from_broken_vectors_or_weights(tiny, nan_model, tmp_path, capsys, broken):
    out = tmp_path / "samples"
    if broken == "nan weights":  # what a diverged embedding did before: NaN images, saved as black, exit 0
        argv = ["sample", "--model", nan_model, "--prompt", "a star", "--n", "1", "--steps", "1"]
        rc, needles = 1, ["came out NaN/inf", "0 images written"]
    else:
        emb = tmp_path / "broken.safetensors"
        save_file({"emb_params": torch.full((1, 64), broken)}, str(emb))
        argv = ["sample", "--model", tiny, "--embedding", emb, "--prompt", "a <broken>"]
        rc, needles = 2, [emb, "use an earlier save"]
    one_line(capsys, argv + ["--device", "cpu", "--out", out], rc, *needles)
    assert not list(out.glob("*.png"))


def fail_previews(monkeypatch):
    def full(image, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "save_png", full)


def fail_state(monkeypatch):
    """torch.save's C++ writer in the words it uses when the file cannot grow (measured with ulimit -f)."""
    real = torch.save

    def save(obj, path, *a, **k):
        if isinstance(obj, dict) and obj.get("format", "").startswith("minti-train-state"):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        return real(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize("fail, rc, needle", [
    (fail_previews, 0, "could not write the preview"),
    (fail_state, 1, "could not save step 2"),
])
def test_the_final_save_comes_first_and_a_full_disk_is_one_line(tiny, images, tmp_path, capsys, monkeypatch,
                                                                 fail, rc, needle):
    out = tmp_path / "run"
    fail(monkeypatch)
    status, lines, _ = cli(capsys, train_args(tiny, images, out, "--preview-every", "1", "--preview-steps", "1"))
    assert status == rc and any(needle in line for line in lines), lines
    # the step-2 embedding reached the disk whatever failed after it
    assert load_embedding(out / "x.pt").step == 2
    if rc:
        assert len(lines) == 1 and str(out) in lines[0] and "unexpected pos" in lines[0], lines
        assert "x.safetensors, x.pt, learned_embeds.safetensors of step 2 written, no state.pt" in lines[0]


def test_a_real_file_size_limit_under_torch_save_becomes_a_write_error(tmp_path):
    # what fail_state imitates, for real: torch.save under `ulimit -f` (a process of its own)
    code = ("import resource, sys, torch\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))\n"
            "from minti import atomic\n"
            "try:\n"
            "    atomic.torch_save({'x': torch.zeros(100_000)}, sys.argv[1])\n"
            "except atomic.WriteError as e:\n"
            "    print(e)\n")
    result = python_snippet(code, tmp_path / "state.pt")
    assert result.stdout.strip() == f"cannot write {tmp_path / 'state.pt'}: the file-size limit was reached " \
                                    "(File too large; see ulimit -f)", result.stderr
    assert list(tmp_path.iterdir()) == []  # no temporary left behind


def missing(tmp_path):
    return tmp_path / "my-cat.pt", "does not exist"


def a_folder(tmp_path):
    (tmp_path / "some-folder").mkdir()
    return tmp_path / "some-folder", "folder without learned_embeds"


def a_model(tmp_path):
    return TINY, "not a textual-inversion embedding"


def a_typo(tmp_path):
    return "my-cat.safetensor", "does not exist"


def a_text_file(tmp_path):
    (tmp_path / "notes.pt").write_text("my notes")
    return tmp_path / "notes.pt", "is a text file"


@pytest.mark.parametrize("init", [missing, a_folder, a_model, a_typo, a_text_file])
def test_an_init_that_looks_like_a_path_is_an_embedding_or_an_error(tiny, images, tmp_path, capsys, init):
    value, needle = init(tmp_path)
    out = tmp_path / "run"
    one_line(capsys, train_args(tiny, images, out, "--init", value), 2, f"--init {value}", needle)
    assert not out.exists()


@pytest.mark.parametrize("flag, value, needle", [
    ("--resolution", "0", "--resolution 0 is outside 1-4096"),
    ("--steps", "0", "--steps must be >= 1, got 0"),
])
def test_a_zero_size_or_step_count_is_refused_not_replaced(tiny, images, tmp_path, capsys, flag, value, needle):
    one_line(capsys, train_args(tiny, images, tmp_path / "run", flag, value), 2, needle)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ tracebacks where a sentence belongs


def cut_vocabulary(state):
    state[TEXT + "embeddings.token_embedding.weight"] = state[TEXT + "embeddings.token_embedding.weight"][:1000]
    return "token_embedding.weight has 1000 rows", "49408"


def cut_positions(state):
    state[TEXT + "embeddings.position_embedding.weight"] = state[TEXT + "embeddings.position_embedding.weight"][:50]
    return "position_embedding.weight has 50 positions", "77"


def drop_a_key(state):
    del state[TEXT + "embeddings.position_embedding.weight"]
    return "has no cond_stage_model.transformer.text_model.embeddings.position_embedding.weight", "incomplete"


@pytest.mark.parametrize("damage", [cut_vocabulary, cut_positions, drop_a_key])
def test_a_model_whose_parts_do_not_fit_is_refused_by_inspect_and_train(images, tmp_path, capsys, damage):
    state = load_file(str(TINY))
    needles = damage(state)
    path = tmp_path / f"{damage.__name__}.safetensors"
    save_file(state, str(path))
    one_line(capsys, ["inspect", path], 2, path, *needles)
    one_line(capsys, train_args(path, images, tmp_path / "run"), 2, path, *needles)


def html_page(path):
    path.write_text("<!DOCTYPE html>\n<html><head><title>Sign in</title></head></html>")
    return "is an HTML page"


def lfs_pointer(path):
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:4c2e\nsize 4265380512\n")
    return "git lfs pull"


def json_text(path):
    path.write_text('{"error": "Repository not found"}')
    return "holds JSON text"


def random_bytes(path):
    path.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)))
    return "is not a checkpoint"


def empty(path):
    path.write_bytes(b"")
    return "is empty"


def a_pickle_that_runs_code(path):
    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {path.parent / 'pwned'}",)

    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Payload()}, path)
    return "would run code"


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
@pytest.mark.parametrize("write", [html_page, lfs_pointer, json_text, random_bytes, empty, a_pickle_that_runs_code])
def test_bytes_that_are_no_checkpoint_are_named_for_what_they_are(tmp_path, capsys, write, suffix):
    path = tmp_path / f"model{suffix}"
    needle = write(path)
    one_line(capsys, ["inspect", path], 2, path, needle)
    assert not (tmp_path / "pwned").exists()


def unwritable(tmp_path, monkeypatch):
    """A read-only mount (as root, permissions alone cannot make a folder unwritable here)."""
    import tempfile

    real = tempfile.TemporaryFile
    locked = tmp_path / "ro"
    locked.mkdir()

    def temporary_file(*a, dir=None, **k):
        if dir is not None and Path(dir) == locked:
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*a, dir=dir, **k)

    monkeypatch.setattr(tempfile, "TemporaryFile", temporary_file)
    return locked / "run"


def broken_index(tmp_path):
    folder = tmp_path / "diffusers"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", ')
    return folder


def hand_edited_config(tmp_path, tiny, images):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"config": {"token": "<x>", "images": str(images), "steps": "lots"},
                                                     "model": str(tiny), "minti": "0.1.0"}))
    return folder


BAD_ARGUMENTS = {  # case -> (argv from (tiny, images, tmp_path, monkeypatch), what the line names)
    "device gpu": (lambda t, i, p, m: train_args(t, i, p / "o", "--device", "gpu"), ["--device gpu", "cuda"]),
    "device banana": (lambda t, i, p, m: train_args(t, i, p / "o", "--device", "banana"), ["--device banana"]),
    "device mps": (lambda t, i, p, m: train_args(t, i, p / "o", "--device", "mps"), ["--device mps", "cpu"]),
    "device cuda:7": (lambda t, i, p, m: train_args(t, i, p / "o", "--device", "cuda:7"), ["--device cuda:7"]),
    "output is a file": (lambda t, i, p, m: train_args(t, i, t), ["--output", "is a file"]),
    "output read-only": (lambda t, i, p, m: train_args(t, i, unwritable(p, m)), ["Read-only file system"]),
    "sample out is a file": (lambda t, i, p, m: ["sample", "--model", t, "--prompt", "x", "--out", t, "--device",
                                                 "cpu"], ["--out", "is a file"]),
    "broken model_index": (lambda t, i, p, m: ["inspect", broken_index(p)], ["model_index.json: is not valid JSON"]),
    "config.json types": (lambda t, i, p, m: ["train", "--resume", hand_edited_config(p, t, i)],
                          ['"steps" is "lots", not a whole number']),
    "resolution 100000": (lambda t, i, p, m: train_args(t, i, p / "o", "--resolution", "100000"),
                          ["--resolution 100000"]),
    "sample steps 1000": (lambda t, i, p, m: ["sample", "--model", t, "--prompt", "x", "--steps", "1000"],
                          ["--steps 1000", "999"]),
    "sample steps 1001": (lambda t, i, p, m: ["sample", "--model", t, "--prompt", "x", "--steps", "1001"],
                          ["--steps 1001"]),
    "preview steps 1000": (lambda t, i, p, m: train_args(t, i, p / "o", "--preview-steps", "1000"),
                           ["--preview-steps 1000", "999"]),
    "vram -1": (lambda t, i, p, m: train_args(t, i, p / "o", "--vram", "-1"), ["--vram", "-1"]),
    "sample cfg nan": (lambda t, i, p, m: ["sample", "--model", t, "--prompt", "x", "--cfg", "nan"], ["--cfg nan"]),
}


@pytest.mark.parametrize("case", [
    pytest.param(case, marks=pytest.mark.skipif(
        (case == "device mps" and torch.backends.mps.is_available()) or
        (case == "device cuda:7" and torch.cuda.device_count() > 7), reason="this machine has that device"))
    for case in BAD_ARGUMENTS])
def test_bad_arguments_are_one_line_naming_the_value_with_exit_2(tiny, images, tmp_path, capsys, monkeypatch, case):
    argv, needles = BAD_ARGUMENTS[case]
    one_line(capsys, argv(tiny, images, tmp_path, monkeypatch), 2, *needles)


def test_ctrl_c_while_starting_is_one_line_not_a_traceback(tmp_path):
    # SIGINT arrives while torch is being imported, as a Ctrl-C in the first seconds does
    code = ("import builtins, os, runpy, signal, sys\n"
            "real = builtins.__import__\n"
            "def interrupt(name, *a, **k):\n"
            "    if name.split('.')[0] == 'torch' and 'torch' not in sys.modules:\n"
            "        os.kill(os.getpid(), signal.SIGINT)\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = interrupt\n"
            "sys.argv = ['minti', 'inspect', sys.argv[1]]\n"
            "runpy.run_module('minti', run_name='__main__')\n")
    result = python_snippet(code, tmp_path / "model.safetensors")
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "interrupted" in lines[0], lines


def test_the_first_ctrl_c_in_training_says_it_was_received(tiny, images, tmp_path, capsys, monkeypatch):
    class InterruptAfterStep1(cli_train.Progress):
        def __call__(self, info):
            super().__call__(info)
            if info.step == 1:
                os.kill(os.getpid(), signal.SIGINT)  # the real handler, as from Ctrl-C

    monkeypatch.setattr(cli_train, "Progress", InterruptAfterStep1)
    out = tmp_path / "run"
    rc, lines, _ = cli(capsys, train_args(tiny, images, out, "--steps", "50"))
    assert rc == 0
    assert any("Ctrl-C received: stopping after this step and saving" in line for line in lines), lines
    assert any(f"stopped at step 1/50" in line and f"--resume {out}" in line for line in lines), lines
    assert load_embedding(out / "x.pt").step == 1


# ------------------------------------------------------------------ unclear messages


def damaged_config(env):
    run = env.tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"config": {"token": "<x>",')
    return ["train", "--resume", run], ["config.json is not valid JSON", "fix it by hand"]


def text_as_embedding(env):
    (env.tmp_path / "emb.pt").write_text("not yet\n")
    return (["sample", "--model", env.tiny, "--embedding", env.tmp_path / "emb.pt", "--prompt", "a <emb>", "--device",
             "cpu"], ["emb.pt is a text file (8 bytes: starts 'not yet')"])


def nan_weights(env):
    return train_args(env.nan_model, env.images, env.tmp_path / "run"), ["not the learning rate", "NaN"]


def embedding_as_model(env):
    Embedding("<e>", [torch.zeros(1, 64)]).save(env.tmp_path / "e.pt")
    return ["inspect", env.tmp_path / "e.pt"], ["is a textual-inversion embedding, not a model", "--embedding"]


def images_in_subfolders(env):
    (env.tmp_path / "photos" / "cat").mkdir(parents=True)
    Image.open(env.images / "0.png").save(env.tmp_path / "photos" / "cat" / "0.png")
    return train_args(env.tiny, env.tmp_path / "photos", env.tmp_path / "run"), ["subfolder cat/ holds 1", "photos"]


def symlink_loop(env):
    os.symlink(env.tmp_path / "b", env.tmp_path / "a")
    os.symlink(env.tmp_path / "a", env.tmp_path / "b")
    return train_args(env.tiny, env.tmp_path / "a", env.tmp_path / "run"), ["--images", "symbolic link loop"]


def empty_token(env):
    return (train_args(env.tiny, env.images, env.tmp_path / "run", "--token", "<>"),
            ["--token '<>' has no letters or digits"])


UNCLEAR = [damaged_config, text_as_embedding, nan_weights, embedding_as_model, images_in_subfolders, symlink_loop,
           empty_token]


@pytest.mark.parametrize("case", UNCLEAR)
def test_an_unclear_failure_gets_a_line_that_names_its_cause(tiny, nan_model, images, tmp_path, capsys, case):
    from types import SimpleNamespace

    argv, needles = case(SimpleNamespace(tiny=tiny, nan_model=nan_model, images=images, tmp_path=tmp_path))
    rc = 1 if case is nan_weights else 2  # the run started: a failure, not refused input
    one_line(capsys, argv, rc, *needles)
    assert not (tmp_path / "run" / "x.pt").exists()


def test_settings_that_cannot_be_meant_are_warned_about(tiny, images, tmp_path, capsys):
    rc, lines, _ = cli(capsys, train_args(tiny, images, tmp_path / "run", "--lr", "0", "--init",
                                          "a large striped heart", "--token", "<w>"))
    assert rc == 0
    assert any("--lr 0: the vectors will not change" in line for line in lines), lines
    assert any("'a large striped heart' is 4 tokens but the embedding has 1 vector" in line and "--vectors 4" in line
               for line in lines), lines


def test_overwrite_clears_the_earlier_runs_files_and_nothing_else(tiny, images, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "previews").mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({"config": {"token": "<old>"}, "minti": "0.1.0"}))
    for name in ("state.pt", "loss.jsonl", "old.pt", "old.safetensors", "old-500.safetensors", "previews/old-00500.png"):
        (out / name).write_bytes(b"the earlier run's")
    (out / "notes.txt").write_text("mine")
    (out / "old-final.safetensors").write_bytes(b"not named like a minti save")
    rc, _, _ = cli(capsys, train_args(tiny, images, out, "--overwrite"))
    assert rc == 0
    assert set(snapshot(out)) == {"config.json", "state.pt", "loss.jsonl", "x.pt", "x.safetensors",
                                  "learned_embeds.safetensors", "report.html", "notes.txt", "old-final.safetensors"}
    assert (out / "notes.txt").read_text() == "mine"
