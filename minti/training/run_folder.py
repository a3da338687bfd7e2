"""A training run's folder: every file a run writes, and reading them back to resume.

    config.json                  the resolved run; `python -m minti train --resume DIR` reads it back
    <name>.safetensors, <name>.pt, learned_embeds.safetensors
                                 the embedding (minti.training.embedding.FORMATS)
    <name>-<step>.safetensors    intermediate saves
    state.pt                     vectors, optimizer, loss scaler and RNG: what resume needs
    loss.jsonl                   one line per optimizer step
    previews/<name>-<step>.png   previews

Every write is atomic (minti.atomic), so an interrupted run leaves the last save intact. The
state is written after the embedding, so a state file never points at vectors newer than the
embedding files. A full disk while saving is one line that says which save is intact, and
non-finite vectors are never written.

A run never replaces a file it did not write unless told to (--overwrite): before anything is
loaded, check_start() looks for files named like this run's outputs. Those an earlier minti run
wrote here (what the token in its config.json names, by run_files' patterns) are the run's own;
any other is refused by name. --overwrite, or a fresh start after a run that never saved, first
clears what the earlier run wrote, so no stale intermediate save or preview stays beside the new ones.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

import minti.atomic as atomic
from minti.errors import RunError, UserError, missing_path
from minti.training.report import REPORT_FILE
from minti.training.config import TrainConfig, known_fields
from minti.training.embedding import FORMATS, Embedding, file_stem
from minti.version import __version__

log = logging.getLogger("minti")

CONFIG_FILE = "config.json"
STATE_FILE = "state.pt"
STATE_FORMAT = "minti-train-state-1"
LOSS_LOG = "loss.jsonl"
PREVIEWS = "previews"


def run_files(name: str) -> list[str]:
    """Patterns (regular expressions on the path relative to the run folder) of every file a run
    of the token whose file name is `name` writes."""
    n = re.escape(name)
    return [re.escape(CONFIG_FILE), re.escape(STATE_FILE), re.escape(LOSS_LOG),
            *(re.escape(f.file_name(name)) for f in FORMATS.values()), rf"{n}-\d+\.safetensors",
            rf"{PREVIEWS}/{n}-\d+\.png", rf"{n}\.png", re.escape(REPORT_FILE)]


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


class RunFolder:
    """The files of one training run in `path` (see the module docstring)."""

    def __init__(self, path: str | Path, world_size: int = 1) -> None:
        self.path = Path(path)
        self.world_size = world_size  # processes under torchrun: --batch-size is per process
        self.saved_step: int | None = None  # the step of this session's last complete save
        self._log_failed = False

    # -- starting a run -----------------------------------------------------------------------
    def check_start(self, config: TrainConfig) -> None:
        """Before anything is loaded: the folder can be written, a fresh run does not replace the run
        already here, and no file this run would replace was written by anything but a minti run
        here, unless config.overwrite. UserError naming the folder or the files otherwise."""
        self._check_writable()
        if config.overwrite:
            return
        resumes_here = self._resumes_here(config)
        if (self.path / STATE_FILE).exists() and not resumes_here:
            raise UserError(f"{self.path} already holds a training run: continue it with --resume {self.path}, "
                            "or pick another --output (or pass --overwrite to start over there)")
        ours = self._earlier_run_files()
        foreign = [p for p in self._existing(file_stem(config.token)) if p not in ours]
        if foreign:
            shown = ", ".join(str(p.relative_to(self.path)) for p in foreign[:6]) + (", ..." if len(foreign) > 6 else "")
            raise UserError(f"--output {self.path} holds files this run would replace that no minti run there "
                            f"wrote: {shown}; pick another --output, or pass --overwrite to replace them")

    def _check_writable(self) -> None:
        if (problem := atomic.folder_problem(self.path)) is not None:
            raise UserError(f"--output {self.path} {problem}" + (" (the run writes several files into it)"
                                                                 if problem.startswith("is a file") else ""))

    def _resumes_here(self, config: TrainConfig) -> bool:
        if config.resume is None:
            return False
        resume = Path(config.resume)
        resume = resume.parent if resume.name == STATE_FILE else resume
        return resume.resolve() == self.path.resolve()

    def _existing(self, name: str) -> list[Path]:
        """The files here named like the outputs of a run of `name`."""
        patterns = [re.compile(p) for p in run_files(name)]
        candidates = [*self.path.glob("*"), *self.path.glob(f"{PREVIEWS}/*")] if self.path.is_dir() else []
        return sorted(p for p in candidates if p.is_file() and
                      any(pattern.fullmatch(p.relative_to(self.path).as_posix()) for pattern in patterns))

    def _earlier_run_files(self) -> list[Path]:
        """The files here that an earlier minti run wrote: what its config.json's token names."""
        try:
            record = json.loads((self.path / CONFIG_FILE).read_text(encoding="utf-8"))
            token = record["config"]["token"] if "minti" in record else None
        except (OSError, ValueError, KeyError, TypeError):
            return []
        return self._existing(file_stem(token)) if isinstance(token, str) else []

    def clear_earlier_run(self) -> list[Path]:
        """Remove what an earlier minti run wrote here (only its files; check_start has let it
        through, so it never saved, or --overwrite was given); -> the files removed."""
        removed = self._earlier_run_files()
        for path in removed:
            path.unlink(missing_ok=True)
        if removed:
            log.info("removed %d files of the earlier run in %s", len(removed), self.path)
        return removed

    def write_config(self, config: TrainConfig, sd, n_vectors: int, resolution: int, identity: dict) -> None:
        """config.json: the run as it was resolved, with absolute paths so that `--resume DIR`
        works from any working directory. A run that does not resume this folder's first clears
        what an earlier run wrote here (see clear_earlier_run)."""
        if not self._resumes_here(config):
            self.clear_earlier_run()
        values = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(config).items()}
        values.update(vectors=n_vectors, resolution=resolution, images=str(Path(config.images).resolve()))
        if Path(values["template"]).is_file():
            values["template"] = str(Path(values["template"]).resolve())
        record = {"config": values, "model": str(Path(sd.source).resolve()),
                  "dtype": str(sd.dtype).removeprefix("torch."), "weights": getattr(sd, "weights", None),
                  "device": str(sd.device), "world_size": self.world_size, "identity": identity,
                  "minti": __version__}
        with self._writing(CONFIG_FILE):
            self.path.mkdir(parents=True, exist_ok=True)
            atomic.write_text(self.path / CONFIG_FILE, json.dumps(record, indent=2) + "\n")

    @contextmanager
    def _writing(self, name: str) -> Iterator[None]:
        """A file written before the first step: a full disk there is one line, nothing lost yet."""
        try:
            yield
        except OSError as e:
            reason = e.reason if isinstance(e, atomic.WriteError) else (e.strerror or str(e))
            raise RunError(f"cannot write {self.path / name} ({reason}) before the first step; free space (or pick "
                           "another --output) and run again") from None

    def read_config(self) -> dict:
        """config.json as written by write_config, its "config" holding TrainConfig fields under
        today's names (an older run's preview_cfg is read as preview_guidance)."""
        path = self.path / CONFIG_FILE
        if not self.path.exists():
            raise UserError(f"--resume {self.path} {missing_path(self.path)}: pass the output folder of an earlier "
                            "minti train run")
        if not path.is_file():
            raise UserError(f"--resume {self.path}: no {CONFIG_FILE} there; pass the output folder of an earlier "
                            "minti train run")
        fix = ("fix it by hand (it holds the run's settings: model, images, token, ...) or start a new run "
               "with another --output")
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is not valid JSON ({e}): {fix}") from None
        if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
            raise UserError(f"{path} has no \"config\" object: it is not a minti run's config.json; {fix}")
        record["config"] = known_fields(dict(record["config"]))
        problem = _wrong_type(record["config"]) or _wrong_type(record, RECORD_TYPES)
        if problem:
            raise UserError(f"{path}: {problem}; {fix}")
        return record

    # -- saving -------------------------------------------------------------------------------
    def embedding_files(self, embedding: Embedding) -> dict[Path, tuple[str, ...]]:
        """file -> the format written there: each format that holds the embedding, under its file
        name. Each saved as a file path, so that the folder's own name never matters (a folder may
        well be called my-cat.pt)."""
        return {self.path / FORMATS[fmt].file_name(embedding.name): (fmt,) for fmt in embedding.formats}

    def save(self, embedding: Embedding, identity: dict, optimizer: torch.optim.Optimizer, scaler,
             intermediate: bool = False, optimizer_state: dict | None = None) -> list[Path]:
        """The embedding in every format (plus <name>-<step>.safetensors if intermediate), then
        state.pt; returns the embedding files. optimizer_state: a state_dict to record instead of
        the optimizer's own (a diverged run keeps the one of its last good step). Refuses non-finite
        vectors; a full disk is a RunError that names the save still intact."""
        if not all(bool(torch.isfinite(v).all()) for v in embedding.vectors):
            raise RunError(f"refusing to save the step-{embedding.step} embedding of {embedding.token}: its vectors "
                           f"are not finite; the last save in {self.path} is kept")
        files = self.embedding_files(embedding)
        if intermediate:
            files[self.path / f"{embedding.name}-{embedding.step}.safetensors"] = ("safetensors",)
        state = {"format": STATE_FORMAT, "token": embedding.token, "n_vectors": embedding.n_vectors,
                 "model": identity, "step": embedding.step, "vectors": list(embedding.vectors),
                 "optimizer": optimizer_state if optimizer_state is not None else optimizer.state_dict(),
                 "scaler": scaler.state_dict(), "world_size": self.world_size,
                 "rng": {"torch": torch.get_rng_state(),
                         **({"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {})}}
        written: list[Path] = []
        try:
            for path, formats in files.items():
                embedding.save(path, formats=formats)
                written.append(path)
            atomic.torch_save(state, self.path / STATE_FILE)
        except OSError as e:
            reason = e.reason if isinstance(e, atomic.WriteError) else (e.strerror or str(e))
            done = f"{', '.join(p.name for p in written)} of step {embedding.step} written, " if written else ""
            earlier = (self.path / STATE_FILE).exists()
            kept = (f"the state of step {self.saved_step} is intact" if self.saved_step is not None
                    else f"the {STATE_FILE} from before this session is intact" if earlier
                    else f"no {STATE_FILE} was written")
            then = f"continue with --resume {self.path}" if earlier else "run again"
            raise RunError(f"could not save step {embedding.step} in {self.path} ({reason}): {done}{kept}. Free "
                           f"space, then {then}") from None
        self.saved_step = embedding.step
        return list(files)

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
        with self._writing(LOSS_LOG):
            atomic.write_text(path, "".join(line + "\n" for line in kept))

    def log_loss(self, record: dict) -> None:
        """One line of loss.jsonl. The log is for reading, not resuming: a failed write (a full disk)
        is a warning, once, and training goes on to its next save, which says what it could keep."""
        try:
            with open(self.path / LOSS_LOG, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            if not self._log_failed:
                log.warning("cannot append to %s (%s): the loss log misses steps from %s on",
                            self.path / LOSS_LOG, e.strerror or e, record.get("step"))
            self._log_failed = True

    def preview_path(self, name: str, step: int) -> Path:
        return self.path / PREVIEWS / f"{name}-{step:05d}.png"

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


# config.json's top-level entries besides "config" that resume reads, and their types
RECORD_TYPES = {"model": (str,), "dtype": (str, type(None)), "weights": (str, type(None)), "identity": (dict,)}


def _field_types() -> dict[str, tuple[type, ...]]:
    """The JSON types each TrainConfig field may hold, read from its annotation ("int | None", ...)."""
    json_types = {"int": (int,), "float": (int, float), "str": (str,), "Path": (str,), "bool": (bool,),
                  "None": (type(None),), "tuple": (list, tuple)}
    out = {}
    for field in dataclasses.fields(TrainConfig):
        names = [part.strip().split("[")[0] for part in str(field.type).split("|")]
        out[field.name] = tuple(t for name in names for t in json_types.get(name, (object,)))
    return out


def _wrong_type(values: dict, types: dict[str, tuple[type, ...]] | None = None) -> str | None:
    """"KEY is VALUE, not a TYPE" for the first entry of the wrong JSON type, else None."""
    types = types if types is not None else _field_types()
    names = {int: "a whole number", float: "a number", str: "text", bool: "true or false", dict: "an object",
             list: "a list", tuple: "a list"}
    for key, allowed in types.items():
        if key not in values:
            continue
        value = values[key]
        ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
        if ok and isinstance(value, float) and not math.isfinite(value):
            ok = False
        if not ok:
            want = " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in allowed if t is not type(None)))
            return f"\"{key}\" is {json.dumps(value)}, not {want}"
    return None
