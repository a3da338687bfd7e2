"""Several processes training one run, launched by torchrun: data parallel over each concept's batch.

    torchrun --nproc-per-node 4 -m minti train --model M --images photos/ --token "<my-cat>" --batch-size 2

torchrun starts one process (rank) per GPU and tells each its place through the environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/MASTER_PORT). Every rank loads the model, caches
every concept's latents and runs the same loop. For each micro-batch a rank draws the whole
global batch (world size x --batch-size samples, with the noise and timesteps one process at
that batch size would draw) and computes the loss of its own slice. One all-reduce per step
then averages the vectors' gradients and losses, so every rank applies the same update and the
vectors stay identical without ever being sent. Rank 0 alone writes files.

Many concepts on several ranks: every rank takes its slice of every concept's batch, the same
policy as for one concept, rather than the ranks splitting the concepts between them. Each
concept then draws exactly what its run at the global batch size would, the ranks stay evenly
loaded whatever the number of concepts, and there is one code path.

The state a run saves is per global step (vectors, optimizer, step), and what a step draws
depends on (seed, step, global batch) only, so a run resumes under any world size.

A rank that dies or hangs must not leave the others waiting forever: every collective has a
timeout (MINTI_DIST_TIMEOUT seconds), and a failed one raises RankLost, which the trainer turns
into one line after saving what the last finished step left. With NCCL, blocking wait makes a
timeout an error in the training thread rather than a watchdog abort.
"""
from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import torch

from minti.errors import RunError, UserError

TIMEOUT_ENV = "MINTI_DIST_TIMEOUT"
# Long enough for rank 0's previews and saves, which the other ranks wait for at the next
# collective; short enough that a dead rank is noticed within minutes.
DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class World:
    """This process's place among the ranks training the run (size 1: a plain single process)."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def writes(self) -> bool:
        """Whether this rank writes the run's files and reports progress (rank 0 alone)."""
        return self.rank == 0


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not a whole number: start several processes "
                        "with torchrun --nproc-per-node N -m minti train ...") from None


def timeout_seconds() -> float:
    value = os.environ.get(TIMEOUT_ENV)
    if value is None or value == "":
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise UserError(f"environment variable {TIMEOUT_ENV}={value!r} must be a number of seconds > 0 (how long "
                        f"a rank waits for the others; default {DEFAULT_TIMEOUT_S:g})")
    return seconds


def launched() -> World:
    """Where this process stands: the default process group if one exists, else what torchrun
    put in the environment, else a single process."""
    timeout = timeout_seconds()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return World(torch.distributed.get_rank(), torch.distributed.get_world_size(),
                     _env_int("LOCAL_RANK") or 0, timeout)
    size = _env_int("WORLD_SIZE")
    if size is None or size == 1:
        return World(timeout_s=timeout)
    rank = _env_int("RANK")
    if size < 1 or rank is None or not 0 <= rank < size:
        raise UserError(f"WORLD_SIZE={size} but RANK={os.environ.get('RANK')!r}: start several processes with "
                        "torchrun --nproc-per-node N -m minti train ..., which sets both")
    if not torch.distributed.is_available():
        raise UserError(f"WORLD_SIZE={size}, but this torch build has no torch.distributed: run one process")
    local = _env_int("LOCAL_RANK")
    return World(rank, size, rank if local is None else local, timeout)


def device_for_rank(device: str | None, world: World) -> str | None:
    """The device this rank trains on: under torchrun on a CUDA machine each rank takes GPU
    LOCAL_RANK (what "cuda", or no --device, means there); anything else is kept."""
    if world.size == 1 or not torch.cuda.is_available() or device not in (None, "cuda"):
        return device
    torch.cuda.set_device(world.local_rank)
    return f"cuda:{world.local_rank}"


def quiet_unless_writer(world: World) -> None:
    """Rank 0 alone reports: the other ranks log only errors (their errors still print)."""
    if not world.writes:
        logging.getLogger("minti").setLevel(logging.ERROR)


@contextmanager
def joined(world: World, device: torch.device) -> Iterator[None]:
    """Join the other ranks for the duration (a process group over NCCL for CUDA models, gloo
    otherwise), unless this is a single process or the caller already made the group."""
    if world.size == 1 or torch.distributed.is_initialized():
        yield
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")  # a timeout raises here, see the docstring
        torch.cuda.set_device(device if device.index is not None else torch.cuda.current_device())
    try:
        torch.distributed.init_process_group(backend, rank=world.rank, world_size=world.size,
                                             timeout=timedelta(seconds=world.timeout_s))
    except (RuntimeError, ValueError) as e:
        raise UserError(f"rank {world.rank} of {world.size} could not reach the others ({_first_line(e)}): start "
                        f"every rank with torchrun --nproc-per-node {world.size} -m minti train ...") from None
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


class RankLost(Exception):
    """A collective failed: another rank died, or did not answer within the timeout."""

    def __init__(self, world: World, error: Exception) -> None:
        self.world = world
        self.detail = _first_line(error)

    def user_error(self, step: int, saved: str) -> RunError:
        return RunError(f"rank {self.world.rank} of {self.world.size} lost the other ranks during step {step + 1}: "
                         f"one died or did not answer within {self.world.timeout_s:g} s ({TIMEOUT_ENV}; "
                         f"{self.detail}); {saved}")


def _first_line(error: Exception) -> str:
    """What a torch.distributed error says, without the source location and advice it wraps it in."""
    lines = str(error).strip().splitlines()
    line = re.sub(r"^\[[^\]]*\]\s*", "", lines[0] if lines else type(error).__name__)
    return line.split(". This is typically")[0].rstrip(".")[:160]


def _collective_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def average_(tensors: list[torch.Tensor], world: World) -> None:
    """Replace each tensor by its mean over the ranks, with one all-reduce for all of them."""
    if world.size == 1 or not tensors:
        return
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors]).to(_collective_device())
    try:
        torch.distributed.all_reduce(flat)
    except RuntimeError as e:  # DistBackendError, DistNetworkError, gloo's timeouts
        raise RankLost(world, e) from None
    flat /= world.size
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def any_rank(flag: bool, world: World) -> bool:
    """Whether `flag` is set on any rank: all ranks stop together (Ctrl-C reaches them one by one)."""
    if world.size == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    try:
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    except RuntimeError as e:
        raise RankLost(world, e) from None
    return bool(value.item() > 0)
