"""Several ranks (torchrun's environment, gloo on the CPU) training one run: data parallel
equivalence, resume under another world size, and a dead or hung rank ending the run with a
clear message instead of a hang.

The ranks are forked from the test process with torch.multiprocessing: a fork inherits the
imported torch and the loaded tiny model, where a fresh interpreter per rank would spend
seconds importing. Each rank gets exactly the environment torchrun gives it."""
import json
import os
import queue
import shutil
import signal
import socket
import time
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from minti.cli import main
from minti.training import distributed
from minti.training.config import TrainConfig
from minti.training.embedding import load_embedding
from minti.training.run_folder import RunFolder
from minti.training.setup import _warn_if_the_batch_changes
from minti.training.trainer import train

ROOT = Path(__file__).resolve().parents[2]
DEMO_IMAGES = ROOT / "weights" / "demo-concept"
TIMEOUT_S = 2  # MINTI_DIST_TIMEOUT for these runs: how long a rank waits for a hung one

pytestmark = pytest.mark.usefixtures("one_thread")


def cfg(token, output=None, **kw):
    base = dict(token=token, images=str(DEMO_IMAGES), init="cat", steps=2, resolution=64, batch_size=1,
                save_every=0, preview_every=0, lr=1e-2, output=str(output) if output is not None else None)
    base.update(kw)
    return TrainConfig(**base)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, port, job, sd, results):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), **{distributed.TIMEOUT_ENV: str(TIMEOUT_S)})
    try:
        results.put((rank, job(rank, sd)))
    except Exception as e:  # noqa: BLE001  (the test reads what each rank ended with)
        results.put((rank, {"error": f"{type(e).__name__}: {e}"}))


def on_two_ranks(sd, job, wait_s=60):
    """Run job(rank, sd) in two forked ranks -> {rank: what it returned, or {"error"}}.
    A rank that never reports (killed, stopped) is missing; it is killed at the end."""
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    port = _free_port()
    ranks = [ctx.Process(target=_rank_main, args=(r, port, job, sd, results), daemon=True) for r in range(2)]
    for p in ranks:
        p.start()
    out = {}
    deadline = time.monotonic() + wait_s
    while len(out) < 2 and time.monotonic() < deadline:
        try:
            rank, value = results.get(timeout=0.2)
        except queue.Empty:
            if out and not any(p.is_alive() for r, p in enumerate(ranks) if r not in out):
                break  # the others are dead
            continue
        out[rank] = value
        deadline = min(deadline, time.monotonic() + 2)  # a rank that ended reports within moments of another
    for p in ranks:
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
        p.join(5)
    return out


def _fresh_run(rank, sd, output):
    saves = []
    original = RunFolder.save
    RunFolder.save = lambda self, *a, **kw: saves.append(rank) or original(self, *a, **kw)
    emb = train(sd, cfg("<dp>", output))
    return {"vectors": emb.vectors[0].tolist(), "saves": len(saves)}


def test_two_ranks_at_batch_1_train_what_one_process_does_at_batch_2(tiny_sd, tmp_path):
    ranks = on_two_ranks(tiny_sd, partial(_fresh_run, output=tmp_path / "two"))
    one = train(tiny_sd, cfg("<dp1>", batch_size=2))
    assert set(ranks) == {0, 1}, ranks
    assert ranks[0]["vectors"] == ranks[1]["vectors"]  # the same all-reduced update on every rank
    torch.testing.assert_close(torch.tensor(ranks[0]["vectors"]), one.vectors[0], rtol=0, atol=1e-6)
    assert not torch.allclose(one.vectors[0], train(tiny_sd, cfg("<dp2>", batch_size=1)).vectors[0], atol=1e-6)
    assert (ranks[0]["saves"], ranks[1]["saves"]) == (1, 0)  # rank 0 alone writes
    torch.testing.assert_close(load_embedding(tmp_path / "two" / "dp.safetensors").vectors[0], one.vectors[0],
                               rtol=0, atol=1e-6)


def _resume_with_the_cli(rank, sd, start, output, model):
    # --batch-size is per rank: 2 ranks x 1 keep the global batch of the 1 x 2 run
    rc = main(["train", "--resume", str(start), "--output", str(output), "--model", str(model),
               "--steps", "2", "--batch-size", "1", "--device", "cpu"])
    return {"rc": rc}


def test_a_run_resumes_on_another_number_of_ranks(tiny_sd, tmp_path):
    # one process at batch 2 stops after step 1; two ranks at batch 1 (the same global batch)
    # take over through the CLI and end where one process going on would
    straight = train(tiny_sd, cfg("<rs>", tmp_path / "straight", batch_size=2))
    train(tiny_sd, cfg("<rs>", tmp_path / "start", batch_size=2, steps=1))
    # the same weights under another name: resuming the demo's own model would end with its grid
    model = tmp_path / "tiny.safetensors"
    shutil.copyfile(tiny_sd.source, model)
    ranks = on_two_ranks(tiny_sd, partial(_resume_with_the_cli, start=tmp_path / "start", output=tmp_path / "two",
                                          model=model))
    assert ranks == {0: {"rc": 0}, 1: {"rc": 0}}
    resumed = load_embedding(tmp_path / "two" / "rs.pt")
    assert resumed.step == 2
    torch.testing.assert_close(resumed.vectors[0], straight.vectors[0], rtol=0, atol=1e-6)


def test_resuming_on_another_process_count_warns_when_the_images_per_step_change(tiny_sd, tmp_path, caplog):
    train(tiny_sd, cfg("<wb>", tmp_path / "start", batch_size=2, steps=1))
    assert json.loads((tmp_path / "start" / "config.json").read_text())["world_size"] == 1
    assert torch.load(tmp_path / "start" / "state.pt", weights_only=True)["world_size"] == 1
    resume = cfg("<wb>", resume=str(tmp_path / "start"), batch_size=2)
    caplog.clear()
    with caplog.at_level("WARNING", logger="minti"):
        _warn_if_the_batch_changes(resume, saved_world=1, world_size=2)
        _warn_if_the_batch_changes(cfg("<wb>", resume=str(tmp_path / "start"), batch_size=1), 1, 2)  # 2 x 1: the same
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'start'} was trained with 2 images per step (1 process x --batch-size 2); this run takes 4 "
        "(2 x 2): pass --batch-size 1 to keep 2"]


def _rank_1_dies(rank, sd, how, output):
    def on_step(info):
        if rank == 1 and info.step == 1:
            os.kill(os.getpid(), how)  # SIGKILL: a crash; SIGSTOP: a hang (its sockets stay open)

    train(sd, cfg("<lost>", output, steps=20), on_step=on_step)
    return {"error": None}


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_a_lost_rank_ends_the_other_with_a_clear_message_instead_of_a_hang(tiny_sd, tmp_path, how):
    ranks = on_two_ranks(tiny_sd, partial(_rank_1_dies, how=how, output=tmp_path / "run"), wait_s=30)
    assert 1 not in ranks and 0 in ranks, ranks
    error = ranks[0]["error"]
    assert error.startswith("RunError: rank 0 of 2 lost the other ranks during step 2"), error
    assert f"within {TIMEOUT_S} s" in error and "\n" not in error and str(tmp_path / "run") in error
    # rank 0 reported (on_two_ranks gives up on a rank after 30 s): a hang is noticed by the timeout,
    # a crash at once, by its closed sockets, not by waiting the timeout out
    assert ("Timed out" in error) == (how == signal.SIGSTOP), error
    assert load_embedding(tmp_path / "run" / "lost.pt").step == 1  # the last step both ranks finished


def _ctrl_c_on_rank_1(rank, sd, output):
    def on_step(info):
        if rank == 1 and info.step == 1:
            os.kill(os.getpid(), signal.SIGINT)  # the real handler, as from a terminal's Ctrl-C

    return {"step": train(sd, cfg("<int>", output, steps=20), on_step=on_step).step}


def test_ctrl_c_on_one_rank_stops_every_rank_at_the_same_step(tiny_sd, tmp_path):
    ranks = on_two_ranks(tiny_sd, partial(_ctrl_c_on_rank_1, output=tmp_path / "run"))
    assert ranks == {0: {"step": 1}, 1: {"step": 1}}
    assert torch.load(tmp_path / "run" / "state.pt", weights_only=True)["step"] == 1  # saved by rank 0
