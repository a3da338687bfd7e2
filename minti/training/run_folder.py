"""A training run's folder: every file a run writes, and reading them back to resume.

    config.json                  the resolved run; `python -m minti train --resume DIR` reads it back
    <name>.safetensors, <name>.pt, learned_embeds.safetensors
                                 the embedding (formats: minti.training.embedding)
    <name>-<step>.safetensors    intermediate saves
    state.pt                     vectors, optimizer, loss scaler and RNG: what resume needs
    loss.jsonl                   one line per optimizer step
    previews/<name>-<step>.png   previews

Every write is atomic (minti.atomic), so an interrupted run leaves the last save intact. The
state is written after the embedding, so a state file never points at vectors newer than the
embedding files.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from minti import atomic
from minti.errors import UserError
from minti.training.config import TrainConfig, known_fields
from minti.training.embedding import Embedding

CONFIG_FILE = "config.json"
STATE_FILE = "state.pt"
STATE_FORMAT = "minti-train-state-1"
LOSS_LOG = "loss.jsonl"


def checkpoint_short_hash(path: str | Path) -> str | None:
    """A1111's short hash of a model file (first 10 hex digits of its sha256); None for a folder."""
    path = Path(path)
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()[:10]


def _folder_fingerprint(path: Path) -> str:
    # A diffusers folder has no single hash users know; names and sizes of its files identify it.
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file() and p.suffix in (".safetensors", ".bin", ".json", ".txt"):
            h.update(f"{p.relative_to(path).as_posix()}:{p.stat().st_size};".encode())
    return "folder:" + h.hexdigest()[:10]


def model_identity(sd, short_hash: str | None) -> dict:
    """What a resumed run must share with its start: a run on another model would train nonsense."""
    return {"family": sd.family, "prediction": sd.prediction, "embedding_dims": list(sd.embedding_dims),
            "hash": short_hash if short_hash is not None else _folder_fingerprint(Path(sd.source))}


def _version() -> str:
    import minti

    return minti.__version__


class RunFolder:
    """The files of one training run in `path` (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    # -- starting a run -----------------------------------------------------------------------
    def refuse_if_taken(self, overwrite: bool) -> None:
        """A fresh run must not replace the run already here unless asked to."""
        if (self.path / STATE_FILE).exists() and not overwrite:
            raise UserError(f"{self.path} already holds a training run: continue it with --resume {self.path}, "
                            "or pick another --output (or pass --overwrite to start over there)")

    def write_config(self, config: TrainConfig, sd, n_vectors: int, resolution: int, identity: dict) -> None:
        """config.json: the run as it was resolved, with absolute paths so that `--resume DIR`
        works from any working directory."""
        values = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(config).items()}
        values.update(vectors=n_vectors, resolution=resolution, images=str(Path(config.images).resolve()))
        if Path(values["template"]).is_file():
            values["template"] = str(Path(values["template"]).resolve())
        record = {"config": values, "model": str(Path(sd.source).resolve()),
                  "dtype": str(sd.dtype).removeprefix("torch."), "weights": getattr(sd, "weights", None),
                  "device": str(sd.device), "identity": identity,
                  "minti": _version()}
        self.path.mkdir(parents=True, exist_ok=True)
        atomic.write_text(self.path / CONFIG_FILE, json.dumps(record, indent=2) + "\n")

    def read_config(self) -> dict:
        """config.json as written by write_config, its "config" holding TrainConfig fields under
        today's names (an older run's preview_cfg is read as preview_guidance)."""
        path = self.path / CONFIG_FILE
        if not path.is_file():
            raise UserError(f"--resume {self.path}: no {CONFIG_FILE} there; pass the output folder of an earlier "
                            "minti train run")
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            record["config"] = known_fields(dict(record["config"]))
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path} is damaged ({e}): pass --model, --images and --token again") from None
        return record

    # -- saving -------------------------------------------------------------------------------
    def save(self, embedding: Embedding, identity: dict, optimizer: torch.optim.Optimizer, scaler,
             intermediate: bool = False) -> list[Path]:
        """The embedding in every format (plus <name>-<step>.safetensors if intermediate), then
        state.pt; returns the embedding files."""
        files = embedding.save(self.path)
        if intermediate:
            files += embedding.save(self.path / f"{embedding.name}-{embedding.step}.safetensors")
        state = {"format": STATE_FORMAT, "token": embedding.token, "n_vectors": embedding.n_vectors,
                 "model": identity, "step": embedding.step, "vectors": list(embedding.vectors),
                 "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                 "rng": {"torch": torch.get_rng_state(),
                         **({"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {})}}
        atomic.torch_save(state, self.path / STATE_FILE)
        return files

    def start_loss_log(self, step: int) -> None:
        """loss.jsonl from `step` on: a run resumed at step N keeps the lines up to N and drops
        those written after its last save, so the log reads like an uninterrupted run's."""
        path = self.path / LOSS_LOG
        kept = []
        if step > 0 and path.exists():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= step:
                        kept.append(line)
                except (ValueError, KeyError):
                    continue
        atomic.write_text(path, "".join(line + "\n" for line in kept))

    def log_loss(self, record: dict) -> None:
        with open(self.path / LOSS_LOG, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def preview_path(self, name: str, step: int) -> Path:
        return self.path / "previews" / f"{name}-{step:05d}.png"

    # -- resuming -----------------------------------------------------------------------------
    def read_state(self, token: str, identity: dict, n_vectors: int | None) -> dict:
        """state.pt (this folder's, or this path if it is the file), checked against the run that
        resumes it: the same token, model and (when given) number of vectors."""
        path = self.path / STATE_FILE if self.path.is_dir() else self.path
        where = f"--resume {self.path}"
        if not path.is_file():
            raise UserError(f"{where}: no {STATE_FILE} there; pass the output folder of an earlier run")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a damaged file, or not ours
            raise UserError(f"cannot read {path} ({e}): the state is damaged; start again or use an earlier copy") from None
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise UserError(f"{path} is not a minti training state")
        if state["token"] != token:
            raise UserError(f"{where} trained token {state['token']!r}, not {token!r}: "
                            f"resume with --token {state['token']} or start a new run with another --output")
        if state["model"] != identity:
            theirs = state["model"]
            diff = ", ".join(f"{k} {theirs.get(k)} vs {identity[k]}" for k in identity if theirs.get(k) != identity[k])
            raise UserError(f"{where} was trained on another model ({diff}): resume with the same --model it "
                            "started with")
        if n_vectors is not None and n_vectors != state["n_vectors"]:
            raise UserError(f"{where} has {state['n_vectors']} vectors, not --vectors {n_vectors}")
        return state
