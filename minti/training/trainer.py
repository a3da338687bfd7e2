"""Textual inversion: learn N new token vectors so that a frozen Stable Diffusion draws a concept.

    sd = minti.load("v1-5-pruned-emaonly.safetensors", dtype=torch.float16, device="cuda")
    emb = minti.train(sd, minti.TrainConfig(token="<my-cat>", init="cat", images="photos/",
                                            output="runs/my-cat"))

Only the new vectors are parameters (fp32, one [N, dim] tensor per text encoder); everything
else stays frozen and bit-identical. Every random draw (batch order, crop/flip variant, template,
timestep, noise) is derived from (seed, step), so a resumed run draws exactly what the
uninterrupted one would have, and a CPU run is bit-reproducible.

`train_many` is the whole run, top to bottom: setup, then the loop of optimizer steps with its
logging, saves, previews and stop handling, for one or more concepts sharing each batch; `train`
is its one-concept case. The step itself is minti.training.step's, what comes before the first
one minti.training.setup's. What it writes into each concept's `output` (when set) and reads back
to resume is minti.training.run_folder's; the settings are minti.training.config's; several
processes under torchrun are minti.training.distributed's.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

import minti.atomic as atomic
from minti.diffusion import alphas_cumprod
from minti.errors import RunError, UserError
from minti.sampling import decode, generate, to_pil
from minti.training import distributed, report
from minti.training.config import TrainConfig, validate_together
from minti.training.embedding import Embedding, file_stem, save_png_card
from minti.training.run_folder import checkpoint_short_hash, model_identity
from minti.training.setup import freeze, latents_cached, log_how_it_runs, set_up, vae_on_device
from minti.training.step import Concept, LossDiverged, forward_backward, optimizer_step

log = logging.getLogger("minti")


@dataclass
class StepInfo:
    """What on_step receives after every optimizer step. Return False from on_step to stop."""
    step: int  # optimizer steps done (the furthest concept's)
    total: int
    loss: float  # mean loss of this step's micro-batches (and, with several concepts, of the concepts)
    lr: float  # the first concept's
    skipped: bool  # fp16 overflow: the step was not applied (for some concept)
    loss_scale: float | None  # the first concept's
    seconds: float  # since training (this session) started
    steps_per_second: float
    peak_memory: int | None  # bytes, CUDA only
    losses: dict[str, float] | None = None  # token -> its loss, for each concept that made this step


class Diverged(RunError):
    """Concepts whose loss or gradient turned non-finite (under fp16 loss scaling: at scale 1);
    their last good embeddings are saved. `embeddings` holds every concept's final embedding, in order."""

    def __init__(self, errors: list[tuple[str, UserError]], embeddings: list[Embedding]) -> None:
        if len(embeddings) == 1:
            message = str(errors[0][1])
        else:
            message = "; ".join(f"{token}: {error}" for token, error in errors) + \
                f" (the other {len(embeddings) - len(errors)} trained on)"
        super().__init__(message)
        self.embeddings = embeddings


def train(sd, config: TrainConfig, on_step: Callable[[StepInfo], bool | None] | None = None) -> Embedding:
    """Train `config.token` on `config.images` with the loaded model `sd`; return the embedding.

    With config.output set, writes the run's files there (minti.training.run_folder) and handles
    Ctrl-C/SIGTERM by saving and returning early (the returned step is then < config.steps).
    on_step(StepInfo) runs after every optimizer step; returning False stops like Ctrl-C.
    Raises minti.errors.UserError for bad input and for a loss that turns NaN/inf without fp16
    loss scaling (after saving the last good embedding). The one-concept case of train_many.
    """
    return train_many(sd, [config], on_step)[0]


def train_many(sd, configs: list[TrainConfig],
               on_step: Callable[[StepInfo], bool | None] | None = None) -> list[Embedding]:
    """Train several concepts at once, one TrainConfig each; return their embeddings in order.

    The model is frozen, so the concepts share every forward pass: each micro-batch holds every
    concept's samples (each prompt with its own token) and each concept's loss is the mean over
    its own samples, so each concept trains exactly as it would alone with the same settings
    (up to batched-kernel rounding) and writes the files of a solo run into its own output. The
    settings that shape the model (memory, vram) must agree. A concept whose loss turns non-finite
    keeps its last good embedding and stops alone; after the others finish, train_many raises
    Diverged (a UserError) naming it, which holds every concept's embedding. Under torchrun every
    rank trains its slice of each batch (minti.training.distributed); rank 0 writes the files.
    """
    if not configs:
        raise UserError("no concepts to train: pass at least one TrainConfig")
    for config in configs:
        config.validate()
        config.warn_if_unusual()
    validate_together(configs)
    world = distributed.launched()
    freeze(sd)
    vae_was_loaded = vae_on_device(sd)  # needed once, to cache the latents
    # Hashing a multi-GB file takes seconds: only when files are written or a resume is checked.
    needs_identity = any(c.output is not None or c.resume is not None for c in configs)
    short_hash = checkpoint_short_hash(sd.source) if needs_identity else None
    identity = model_identity(sd, short_hash) if needs_identity else None
    concepts, plan = set_up(sd, configs, identity, short_hash, world)
    log_how_it_runs(sd, plan)  # only once the input is valid: a bad flag gets its one error line
    acp = alphas_cumprod().to(sd.device, torch.float32)  # once, not per step
    iterations = 0

    with _Stop(second_interrupt_raises=world.size == 1) as stop, distributed.joined(world, sd.device), \
            latents_cached(sd, concepts, vae_was_loaded):
        _start(sd, concepts, identity, stop)
        start = time.perf_counter()
        if sd.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(sd.device)
        try:
            # every rank takes the same decisions from the same all-reduced numbers; the stop flag
            # is shared too, so all ranks end at the same step
            while (active := [c for c in concepts if c.training]) and not distributed.any_rank(stop.requested, world):
                losses = forward_backward(sd, active, acp, world).tolist()
                done = []  # (concept, loss, lr, applied) of the concepts that made their step
                for c, loss in zip(active, losses):
                    lr = c.lr_at(c.step)
                    try:
                        applied = optimizer_step(c, loss, lr)
                    except LossDiverged as e:  # it keeps its last vectors whose loss was finite; the others go on
                        _stop_diverged(c, e, identity, several=len(concepts) > 1)
                        continue
                    c.step += 1
                    done.append((c, loss, lr, applied))
                    _log_save_preview(sd, c, loss, lr, applied, identity, time.perf_counter() - start)
                if done:
                    iterations += 1
                    info = _step_info(sd, done, concepts, iterations, time.perf_counter() - start)
                    if on_step is not None and on_step(info) is False:
                        stop.requested = True
        except distributed.RankLost as e:  # the vectors are those of the last step every rank finished
            raise _saved_after_lost_rank(e, concepts, identity, world) from None
        for c in concepts:
            if c.diverged is None:
                _finish(sd, c, identity)
        if stop.requested and all(c.step == 0 for c in concepts):
            log.warning("stopped before the first step: nothing was saved")
    return _embeddings(concepts)


# ---------------------------------------------------------------------------- the run's parts, in order


class _Stop:
    """Ctrl-C / SIGTERM set a flag; the loop saves and returns at the next step boundary.
    A second Ctrl-C raises KeyboardInterrupt at once (the saves are atomic, nothing tears),
    except under torchrun: a terminal's Ctrl-C reaches each rank directly and again through
    torchrun, which kills the ranks itself if they take too long to save."""

    def __init__(self, second_interrupt_raises: bool = True) -> None:
        self.requested = False
        self.second_interrupt_raises = second_interrupt_raises
        self._old: dict[int, object] = {}

    def __enter__(self) -> _Stop:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT and self.second_interrupt_raises:
            raise KeyboardInterrupt
        if not self.requested:
            what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            log.warning("%s received: stopping after this step and saving (press Ctrl-C again to quit at once, "
                        "keeping the last save)", what)
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _start(sd, concepts: list[Concept], identity: dict | None, stop: _Stop) -> None:
    """Before the first step: each concept's config.json and loss log, and its preview of step 0."""
    for c in concepts:
        if c.folder is not None:
            c.folder.write_config(c.config, sd, c.vectors.params[0].shape[0], c.data.resolution, identity)
            c.folder.start_loss_log(c.step)
        if c.previews and c.step == 0 and not stop.requested:
            _preview(sd, c, c.step)


def _stop_diverged(c: Concept, e: LossDiverged, identity: dict | None, several: bool) -> None:
    """Concept c stops: its folder keeps the last vectors whose loss was finite (with several
    concepts, its error is logged now; train_many raises Diverged once the others are done)."""
    c.diverged = e
    kept = c.last_good
    if c.folder is not None and kept.step is not None:
        c.folder.save(c.vectors.embedding(kept.step, kept.vectors), identity, c.optimizer, c.scaler,
                      optimizer_state=kept.optimizer)
    if several:
        log.error("%s: %s", c.config.token, e.user_error(c.step, c.resumed_at, c.folder, kept.step))


def _log_save_preview(sd, c: Concept, loss: float, lr: float, applied: bool, identity: dict | None,
                      seconds: float) -> None:
    """After concept c's step: its loss.jsonl line, then its intermediate save and preview when due
    (the last step's are _finish's)."""
    if c.folder is not None:
        c.folder.log_loss({"step": c.step, "loss": loss, "lr": lr, "skipped": not applied,
                           "loss_scale": c.scaler.scale, "seconds": round(seconds, 3)})
    if c.folder is not None and c.config.save_every and c.step % c.config.save_every == 0 \
            and c.step < c.config.steps:
        c.folder.save(c.vectors.embedding(c.step), identity, c.optimizer, c.scaler, intermediate=True)
    if c.previews and c.step % c.config.preview_every == 0 and c.step < c.config.steps:
        _preview(sd, c, c.step)


def _preview(sd, c: Concept, step: int) -> None:
    """Draw concept c's preview image of `step` (always the same seed) into its run folder."""
    config = c.config
    height, width = c.data.preview_size()  # the square, or the bucket most images are in
    latents = generate(sd, [c.preview_prompt], extra=c.vectors.extra(detach=True), steps=config.preview_steps,
                       guidance=config.preview_guidance, seeds=[config.seed], method=config.preview_sampler,
                       height=height, width=width, shape=c.data.preview_latent_shape())
    pixels = decode(sd, latents)  # the VAE comes back for this only, the UNet waits on the host
    path = c.folder.preview_path(file_stem(config.token), step)
    try:
        atomic.save_png(to_pil(pixels)[0], path)
    except OSError as e:  # a preview is for looking at: a full disk here must not end (or lose) the run
        log.warning("could not write the preview %s (%s); training goes on", path, e.reason
                    if isinstance(e, atomic.WriteError) else e.strerror or e)
    report.write_quietly(c.folder.path)


def _step_info(sd, done: list[tuple], concepts: list[Concept], iterations: int, elapsed: float) -> StepInfo:
    """What on_step hears: `done` holds (concept, loss, lr, applied) of each concept that stepped."""
    first = done[0][0]
    return StepInfo(step=max(c.step for c, *_ in done), total=max(c.config.steps for c in concepts),
                    loss=sum(loss for _, loss, _, _ in done) / len(done), lr=done[0][2],
                    skipped=any(not applied for *_, applied in done), loss_scale=first.scaler.scale,
                    seconds=elapsed, steps_per_second=iterations / max(elapsed, 1e-9),
                    peak_memory=torch.cuda.max_memory_allocated(sd.device) if sd.device.type == "cuda" else None,
                    losses={c.config.token: loss for c, loss, _, _ in done})


def _saved_after_lost_rank(lost: distributed.RankLost, concepts: list[Concept], identity: dict | None,
                           world: distributed.World) -> UserError:
    """Rank 0 saves what the last step all ranks finished left; -> the one-line error."""
    saved = []
    for c in concepts:
        if c.step > 0 and c.folder is not None:
            if c.diverged is None:  # a diverged concept saved its last good vectors already
                c.folder.save(c.vectors.embedding(c.step), identity, c.optimizer, c.scaler)
            saved.append(str(c.folder.path))
    if saved:
        where = f"saved the last step all ranks finished in {', '.join(saved)}: continue with --resume"
    else:
        where = "nothing saved" if world.writes else "rank 0 writes the files"
    return lost.user_error(max(c.step for c in concepts), where)


def _finish(sd, c: Concept, identity: dict | None) -> None:
    """The end of a concept's run: the final save, then the last preview when it reached its steps
    (a preview that fails, a full disk, must not cost the steps since the last save)."""
    if c.step > 0 and c.folder is not None:
        c.folder.save(c.vectors.embedding(c.step), identity, c.optimizer, c.scaler)
    if c.previews and c.step >= c.config.steps and c.step > c.resumed_at:
        _preview(sd, c, c.step)
    if c.step > 0 and c.folder is not None:
        if c.config.png_card:
            _png_card(sd, c)
        report.write_quietly(c.folder.path)


def _png_card(sd, c: Concept) -> None:
    """--png-card: <name>.png beside the .pt, the newest preview carrying the embedding (A1111's
    card); without a preview one is drawn for it. A failure to write it is a warning."""
    if report.newest_preview(c.folder.path) is None:
        _preview(sd, c, c.step)
    try:
        save_png_card(c.vectors.embedding(c.step), report.newest_preview(c.folder.path),
                      c.folder.path / f"{file_stem(c.config.token)}.png")
    except OSError as e:
        log.warning("could not write the PNG card (%s); the embedding files are saved", e)


def _embeddings(concepts: list[Concept]) -> list[Embedding]:
    """Every concept's final embedding, in order; Diverged naming those that diverged. A diverged
    concept's embedding is its last good one, as saved, never the update that broke it."""
    embeddings = [c.vectors.embedding(c.last_good.step, c.last_good.vectors)
                  if c.diverged is not None and c.last_good.step is not None else c.vectors.embedding(c.step)
                  for c in concepts]
    diverged = [c for c in concepts if c.diverged is not None]
    if diverged:
        raise Diverged([(c.config.token, c.diverged.user_error(c.step, c.resumed_at, c.folder, c.last_good.step))
                        for c in diverged], embeddings)
    return embeddings
