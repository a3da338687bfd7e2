"""Textual inversion: learn N new token vectors so that a frozen Stable Diffusion draws a concept.

    sd = minti.load("v1-5-pruned-emaonly.safetensors", dtype=torch.float16, device="cuda")
    emb = minti.train(sd, minti.TrainConfig(token="<my-cat>", init="cat", images="photos/",
                                            output="runs/my-cat"))

Only the new vectors are parameters (fp32, one [N, dim] tensor per text encoder); everything
else stays frozen and bit-identical. Every random draw (batch order, crop/flip variant, template,
timestep, noise) is derived from (seed, step), so a resumed run draws exactly what the
uninterrupted one would have, and a CPU run is bit-reproducible.

`train` is the whole run, top to bottom: setup, then the loop of optimizer steps with its
logging, saves, previews and stop handling. What it writes into `output` (when set) and reads
back to resume is minti.training.run_folder's; the settings are minti.training.config's.
"""
from __future__ import annotations

import logging
import math
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from minti import atomic, diffusion, sampling
from minti.errors import UserError
from minti.training import lr_schedules, memory, report
from minti.training.norm import NormControl
from minti.training import templates as tpl
from minti.training.config import TrainConfig
from minti.training.data import TrainingData, buckets_on, generator, load_images
from minti.training.embedding import Embedding, file_stem, load_embedding, mismatch, save_png_card
from minti.training.run_folder import RunFolder, checkpoint_short_hash, model_identity

log = logging.getLogger("minti")

MAX_VECTORS = 75  # a prompt holds 75 content tokens; more vectors than that can never be used


@dataclass
class StepInfo:
    """What on_step receives after every optimizer step. Return False from on_step to stop."""
    step: int  # optimizer steps done
    total: int
    loss: float  # mean loss of this step's micro-batches
    lr: float
    skipped: bool  # fp16 overflow: the step was not applied
    loss_scale: float | None
    seconds: float  # since training (this session) started
    steps_per_second: float
    peak_memory: int | None  # bytes, CUDA only


class _Stop:
    """Ctrl-C / SIGTERM set a flag; the loop saves and returns at the next step boundary.
    A second Ctrl-C raises KeyboardInterrupt at once (the saves are atomic, nothing tears)."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, object] = {}

    def __enter__(self) -> _Stop:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class LossScaler:
    """Dynamic loss scaling for fp16 models: gradients flow back through fp16 activations, where
    small values underflow to zero; scale the loss up, and skip any step whose gradients overflow."""

    def __init__(self, scale: float | None, growth_interval: int = 2000) -> None:
        self.scale = scale
        self.growth_interval = growth_interval
        self.good_steps = 0

    @property
    def enabled(self) -> bool:
        return self.scale is not None

    def update(self, finite: bool) -> None:
        if not self.enabled:
            return
        if not finite:
            self.scale = max(self.scale / 2.0, 1.0)
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.good_steps % self.growth_interval == 0:
            self.scale = min(self.scale * 2.0, 2.0 ** 24)

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good_steps = state["scale"], state["good_steps"]


# ---------------------------------------------------------------------------- model helpers


def token_table(encoder: torch.nn.Module) -> torch.Tensor:
    """The frozen [vocab, dim] token-embedding weight of a text encoder (either CLIP layout)."""
    for name, module in encoder.named_modules():
        if name.endswith("token_embedding") and isinstance(module, torch.nn.Embedding):
            return module.weight
    raise RuntimeError(f"{type(encoder).__name__} has no token_embedding table")


def spread(rows: torch.Tensor, n: int) -> torch.Tensor:
    """N vectors from init rows, as A1111 does: row i*len//n, i.e. repeated when there are fewer
    rows than vectors and evenly thinned when there are more."""
    return torch.stack([rows[i * rows.shape[0] // n] for i in range(n)])


def initial_vectors(sd, init: str, n: int | None) -> list[torch.Tensor]:
    """fp32 CPU [n, dim] per encoder, from init words or an embedding file."""
    if Path(init).suffix.lower() in (".pt", ".bin", ".safetensors", ".png"):
        try:
            emb = load_embedding(init)
        except ValueError as e:
            raise UserError(f"--init {init}: {e}") from None
        if emb.dims != list(sd.embedding_dims):
            raise UserError(f"--init {mismatch(init, emb, sd)}, or init from words")
        n = n or emb.n_vectors
        return [spread(v, n) for v in emb.vectors]
    n = n or 1
    out = []
    for tokenizer, encoder in zip(sd.tokenizers, sd.text_encoders):
        ids = [i for i in tokenizer.tokenize_words(init) if i < tokenizer.vocab_size]
        if not ids:
            raise UserError(f"--init {init!r} tokenizes to nothing: give one or more words that describe the "
                            "concept's kind, e.g. --init cat")
        rows = token_table(encoder)[torch.tensor(ids, device=token_table(encoder).device)]
        out.append(spread(rows.detach().float().cpu().clone(), n))
    return out


def register_token(sd, token: str, n: int) -> int:
    """Register the placeholder (or reuse an earlier registration with the same count) and return
    the row offset of its first vector in the `extra` tensors."""
    tokenizer = sd.tokenizers[0]
    ids = tokenizer.placeholders.get(token) if hasattr(tokenizer, "placeholders") else None
    if ids is None:
        try:
            sd.add_placeholder(token, n)
        except ValueError as e:
            raise UserError(f"--token {token!r}: {e}") from None
        ids = tokenizer.placeholders[token]
    elif len(ids) != n:
        raise UserError(f"token {token!r} is already registered on this model with {len(ids)} vectors, not {n}: "
                        "use another token name or load the model again")
    return ids[0] - tokenizer.vocab_size


def training_resolution(sd, config: TrainConfig) -> int:
    """config.resolution, or the model family's native size; checked against the UNet's depth."""
    res = config.resolution or sd.default_size
    factor = sampling.latent_factor(sd)
    # The UNet halves the latent once per level below the first; the latent must survive that.
    levels = len(sd.unet.cfg.channel_mult) - 1 if hasattr(sd.unet, "cfg") else 3
    multiple = factor * 2 ** levels
    if res % multiple or res <= 0:
        raise UserError(f"--resolution {res} must be a positive multiple of {multiple} for this model")
    return res


def _validate(config: TrainConfig) -> None:
    if config.vectors is not None and not 1 <= config.vectors <= MAX_VECTORS:
        raise UserError(f"--vectors {config.vectors} is outside 1-{MAX_VECTORS}: a prompt holds at most "
                        f"{MAX_VECTORS} tokens (A1111 uses 1-8 in practice)")
    for name in ("steps", "save_every", "preview_every", "warmup_steps"):
        if getattr(config, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(config, name)}")
    for name in ("batch_size", "grad_accum", "repeats", "preview_steps"):
        if getattr(config, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")
    if config.max_grad_norm is not None and not config.max_grad_norm > 0:
        raise UserError(f"--max-grad-norm must be > 0, got {config.max_grad_norm}")
    if config.images is None:
        raise UserError("no training images: pass --images with a folder of 3-20 pictures of the concept")
    if not config.token or any(c.isspace() for c in config.token):
        raise UserError(f"--token {config.token!r} must be one word without spaces, e.g. <my-cat>")
    if config.preview_sampler not in sampling.SAMPLERS:
        raise UserError(f"unknown preview sampler {config.preview_sampler!r}: use {' or '.join(sampling.SAMPLERS)}")


def kernels_in_use(sd) -> str:
    """One line: which path (Triton kernel or torch) each hot op takes on this run, and why."""
    from minti.models import ops

    try:
        import minti.kernels as kernels
    except ImportError:
        return "kernels: minti.kernels is not importable; every op takes the torch path"
    return kernels.describe_backends(sd.device, sd.dtype, ops.BACKEND)


def _log_how_it_runs(sd, plan: memory.Plan) -> None:
    """The memory plan, the path each kernel op takes and the weights' bytes, one line each."""
    log.info(plan.describe())
    log.info(kernels_in_use(sd))
    log.info(weight_bytes_line(sd))


def weight_bytes_line(sd) -> str:
    """One line: the bytes of each part's frozen weights (and how many are fp8, with --weights fp8)."""
    from minti.models.fp8 import describe_weight_bytes

    return describe_weight_bytes(sd.parts())


def _freeze(sd) -> None:
    # minti.load returns frozen modules; make sure, since a stray requires_grad would make
    # autograd keep a gradient the size of the whole model.
    for module in [sd.unet, *sd.text_encoders]:
        module.requires_grad_(False).eval()


@contextmanager
def _as_user_error() -> Iterator[None]:
    """The data, template, schedule and memory code raise ValueError for bad input: the user's."""
    try:
        yield
    except ValueError as e:
        raise UserError(str(e)) from None


def _restore_vae(sd) -> bool:
    """Bring the VAE to the device to cache the latents; -> whether it was loaded before."""
    if sd.vae is not None:
        return True
    try:
        sd.restore_vae(sd.device)
    except RuntimeError as e:
        raise UserError(f"training needs the VAE encoder to cache the images' latents ({e}): load the "
                        "model with its VAE") from None
    return False


@contextmanager
def _latents_cached(sd, data: TrainingData, latent_sampling: str, vae_was_loaded: bool) -> Iterator[None]:
    """Encode every image variant once; the VAE then leaves the training device until training
    is over (and comes back if it was loaded before)."""
    with _as_user_error():
        data.encode(sd, latent_sampling)
    sd.offload_vae()
    try:
        yield
    finally:
        if vae_was_loaded:
            sd.restore_vae(sd.device)


def _training_data(sd, config: TrainConfig, resolution: int, templates: list[str], n_vectors: int) -> TrainingData:
    with _as_user_error():
        images = load_images(config.images)
        if config.template in tpl.BUILTIN and any(im.caption_from == "txt" for im in images):
            # captions name what the token should NOT absorb (background, pose, ...): use them
            templates = tpl.with_filewords(templates)
        data = TrainingData(images, resolution, templates, config.token, seed=config.seed, crop=config.crop,
                            random_crops=config.random_crops, flip=config.flip, alpha_mask=config.alpha_mask,
                            repeats=config.repeats, buckets=buckets_on(config.buckets, sd.family),
                            shuffle_tags=config.shuffle_tags, tag_dropout=config.tag_dropout,
                            keep_tokens=config.keep_tokens)
        # The text encoder sees 75 tokens: a template line that never puts every vector inside them
        # is an error (it would train nothing), one that does so only with some captions a warning.
        tokenizer = sd.tokenizers[0]
        tpl.check_token_shown(templates, [im.caption for im in images], config.token, tokenizer.tokenize_words,
                              tokenizer.placeholders[config.token], tpl.describe_source(config.template), MAX_VECTORS)
    return data


def _preview_prompt(config: TrainConfig, templates: list[str]) -> str:
    if config.preview_prompt and config.token not in config.preview_prompt:
        log.warning("--preview-prompt %r does not contain %s: previews will not show the concept",
                    config.preview_prompt, config.token)
    return config.preview_prompt or tpl.fill(templates[0], config.token)


def _checkpoint_name(source) -> str:
    # A1111 records the model's file name without suffix; a diffusers folder has its folder name.
    source = Path(source)
    return source.stem if source.is_file() else source.name


# ---------------------------------------------------------------------------- the step


@dataclass
class _Vectors:
    """The trained rows of `token`: one fp32 [n, dim] Parameter per text encoder, placed after
    `offset` rows of placeholders registered on the model before it."""
    token: str
    params: list[torch.nn.Parameter]
    offset: int
    sd_checkpoint: str | None  # what the saved embedding records about the model
    sd_checkpoint_name: str

    def extra(self, detach: bool = False) -> list[torch.Tensor]:
        """The `extra` rows for encode_tokens: zeros for placeholders registered before ours."""
        out = []
        for p in self.params:
            v = p.detach() if detach else p
            if self.offset:
                v = torch.cat([v.new_zeros(self.offset, v.shape[1]), v])
            out.append(v)
        return out

    def embedding(self, step: int) -> Embedding:
        return Embedding(self.token, [p.detach().float().cpu() for p in self.params], step=step,
                         sd_checkpoint=self.sd_checkpoint, sd_checkpoint_name=self.sd_checkpoint_name)


def _resume(state: dict, vectors: _Vectors, optimizer: torch.optim.Optimizer, scaler: LossScaler) -> int:
    """Put a run_folder state back in place; -> the step it was saved at."""
    with torch.no_grad():
        for p, v in zip(vectors.params, state["vectors"]):
            p.copy_(v.to(p.device))
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    rng = state.get("rng", {})
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    log.info("resuming %s from step %d", vectors.token, int(state["step"]))
    return int(state["step"])


def _micro_batch_loss(sd, config: TrainConfig, data: TrainingData, vectors: _Vectors, acp: torch.Tensor,
                      step: int, micro: int) -> torch.Tensor:
    """The loss of micro-batch `micro` of optimizer step `step`: its samples, timesteps and noise
    depend on (seed, step, micro) only."""
    first = (step * config.grad_accum + micro) * config.batch_size
    latents, prompts, weights, variants = data.batch(first, config.batch_size)
    g = generator(config.seed, "noise", step, micro)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, diffusion.NUM_TRAIN_TIMESTEPS, (latents.shape[0],), generator=g)
    context, pooled = sd.encode_tokens(sd.tokenize(prompts), vectors.extra())
    y = None
    if sd.family == "sdxl":
        y = torch.cat([sd.sdxl_vector(pooled[i:i + 1], original_size=v.original_size, crop=v.crop_top_left,
                                      target_size=v.target_size) for i, v in enumerate(variants)])
    return diffusion.diffusion_loss(sd.unet, latents.to(sd.device), noise, t, context, y,
                                    prediction=sd.prediction, weights=weights, acp=acp)


class _Diverged(Exception):
    def __init__(self, loss: float) -> None:
        self.loss = loss

    def user_error(self, step: int, folder: RunFolder | None) -> UserError:
        where = f"; the embedding from step {step} is in {folder.path}" if folder is not None else ""
        return UserError(f"the loss or its gradient became non-finite at step {step + 1} (loss {self.loss}; "
                         f"diverged){where}. Lower --lr, add --max-grad-norm 1, or train in float32")


def _optimizer_step(sd, config: TrainConfig, data: TrainingData, vectors: _Vectors, acp: torch.Tensor,
                    optimizer: torch.optim.Optimizer, scaler: LossScaler, step: int, lr: float) -> tuple[float, bool]:
    """One optimizer step over grad_accum micro-batches -> (mean loss, applied). A non-finite
    loss or gradient skips the step under fp16 loss scaling and raises _Diverged without it."""
    scale = scaler.scale if scaler.enabled else 1.0
    losses = []
    for micro in range(config.grad_accum):
        loss = _micro_batch_loss(sd, config, data, vectors, acp, step, micro)
        (loss * (scale / config.grad_accum)).backward()
        losses.append(loss.detach())
    mean_loss = float(torch.stack(losses).mean())
    finite = math.isfinite(mean_loss) and all(bool(torch.isfinite(p.grad).all()) for p in vectors.params)
    if not finite:
        optimizer.zero_grad(set_to_none=True)
        scaler.update(False)
        if not scaler.enabled:
            raise _Diverged(mean_loss)
        return mean_loss, False
    if scale != 1.0:
        for p in vectors.params:
            p.grad.div_(scale)
    if config.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(vectors.params, config.max_grad_norm)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scaler.update(True)
    return mean_loss, True


def _preview(sd, config: TrainConfig, folder: RunFolder, vectors: _Vectors, prompt: str, data: TrainingData,
             step: int) -> None:
    """Draw the preview image of `step` (always the same seed) into the run folder."""
    height, width = data.preview_size()  # the square, or the bucket most images are in
    latents = sampling.generate(sd, [prompt], extra=vectors.extra(detach=True), steps=config.preview_steps,
                                guidance=config.preview_guidance, seeds=[config.seed],
                                method=config.preview_sampler, height=height, width=width,
                                shape=data.preview_latent_shape())
    pixels = sampling.decode(sd, latents)  # the VAE comes back for this only, the UNet waits on the host
    atomic.save_png(sampling.to_pil(pixels)[0], folder.preview_path(file_stem(config.token), step))
    report.write_quietly(folder.path)


def _png_card(sd, config: TrainConfig, folder: RunFolder, vectors: _Vectors, prompt: str, data: TrainingData,
              step: int) -> None:
    """--png-card: <name>.png beside the .pt, the newest preview carrying the embedding (A1111's
    card); without a preview one is drawn for it. A failure to write it is a warning."""
    if report.newest_preview(folder.path) is None:
        _preview(sd, config, folder, vectors, prompt, data, step)
    try:
        save_png_card(vectors.embedding(step), report.newest_preview(folder.path),
                      folder.path / f"{file_stem(config.token)}.png")
    except OSError as e:
        log.warning("could not write the PNG card (%s); the embedding files are saved", e)


# ---------------------------------------------------------------------------- the run


def train(sd, config: TrainConfig, on_step: Callable[[StepInfo], bool | None] | None = None) -> Embedding:
    """Train `config.token` on `config.images` with the loaded model `sd`; return the embedding.

    With config.output set, writes the run's files there (minti.training.run_folder) and handles
    Ctrl-C/SIGTERM by saving and returning early (the returned step is then < config.steps).
    on_step(StepInfo) runs after every optimizer step; returning False stops like Ctrl-C.
    Raises minti.errors.UserError for bad input and for a loss that turns NaN/inf without fp16
    loss scaling (after saving the last good embedding).
    """
    _validate(config)
    _freeze(sd)
    vae_was_loaded = _restore_vae(sd)  # needed once, to cache the latents
    folder = RunFolder(config.output) if config.output is not None else None
    # Hashing a multi-GB file takes seconds: only when files are written or a resume is checked.
    needs_identity = folder is not None or config.resume is not None
    short_hash = checkpoint_short_hash(sd.source) if needs_identity else None
    identity = model_identity(sd, short_hash) if needs_identity else None
    with _as_user_error():
        lr_at = lr_schedules.make_lr_schedule(config.lr, config.lr_schedule, config.steps, config.warmup_steps)
        templates = tpl.load_templates(config.template)
        resolution = training_resolution(sd, config)
        # also with --buckets: no bucket has more pixels than resolution^2 (data.make_buckets)
        plan = memory.apply(sd, config.memory, resolution, config.batch_size, config.vram)
    state = (RunFolder(config.resume).read_state(config.token, identity, config.vectors)
             if config.resume is not None else None)
    if state is None and folder is not None:
        folder.refuse_if_taken(config.overwrite)
    init = initial_vectors(sd, config.init, config.vectors or (state["n_vectors"] if state else None))
    offset = register_token(sd, config.token, init[0].shape[0])
    data = _training_data(sd, config, resolution, templates, init[0].shape[0])
    preview_prompt = _preview_prompt(config, data.templates)
    norms = NormControl.from_config(config.norm, config.max_norm, [token_table(e) for e in sd.text_encoders])
    _log_how_it_runs(sd, plan)  # only once the input is valid: a bad flag gets its one error line
    if norms.active:
        log.info(norms.describe())
    vectors = _Vectors(config.token, [torch.nn.Parameter(v.to(sd.device, torch.float32)) for v in init], offset,
                       short_hash, _checkpoint_name(sd.source))
    optimizer = torch.optim.AdamW(vectors.params, lr=lr_at(0), betas=tuple(config.adam_betas), eps=config.adam_eps,
                                  weight_decay=config.weight_decay)
    fp16 = sd.dtype == torch.float16
    scaler = LossScaler(config.loss_scale if config.loss_scale is not None else (2.0 ** 16 if fp16 else None))
    step = resumed_at = _resume(state, vectors, optimizer, scaler) if state is not None else 0
    acp = diffusion.alphas_cumprod().to(sd.device, torch.float32)  # once, not per step
    previews = folder is not None and config.preview_every > 0

    with _Stop() as stop, _latents_cached(sd, data, config.latent_sampling, vae_was_loaded):
        if folder is not None:
            folder.write_config(config, sd, init[0].shape[0], resolution, identity)
            folder.start_loss_log(step)
        if previews and step == 0 and not stop.requested:
            _preview(sd, config, folder, vectors, preview_prompt, data, step)
        start = time.perf_counter()
        if sd.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(sd.device)
        while step < config.steps and not stop.requested:
            lr = lr_at(step)
            try:
                loss, applied = _optimizer_step(sd, config, data, vectors, acp, optimizer, scaler, step, lr)
            except _Diverged as e:  # keep the last good vectors, then stop
                if folder is not None:
                    folder.save(vectors.embedding(step), identity, optimizer, scaler)
                raise e.user_error(step, folder) from None
            norms.apply(vectors.params)  # --norm / --max-norm: on the trained vectors, after the update
            step += 1
            elapsed = time.perf_counter() - start
            info = StepInfo(step=step, total=config.steps, loss=loss, lr=lr, skipped=not applied,
                            loss_scale=scaler.scale, seconds=elapsed,
                            steps_per_second=(step - resumed_at) / max(elapsed, 1e-9),
                            peak_memory=torch.cuda.max_memory_allocated(sd.device) if sd.device.type == "cuda" else None)
            if folder is not None:
                folder.log_loss({"step": step, "loss": loss, "lr": lr, "skipped": not applied,
                                 "loss_scale": scaler.scale, "seconds": round(elapsed, 3)})
            if folder is not None and config.save_every and step % config.save_every == 0 and step < config.steps:
                folder.save(vectors.embedding(step), identity, optimizer, scaler, intermediate=True)
            if previews and step % config.preview_every == 0 and step < config.steps:
                _preview(sd, config, folder, vectors, preview_prompt, data, step)
            if on_step is not None and on_step(info) is False:
                stop.requested = True
        if previews and step >= config.steps and step > resumed_at:
            _preview(sd, config, folder, vectors, preview_prompt, data, step)
        if step == 0 and stop.requested:
            log.warning("stopped before the first step: nothing was saved")
        elif step > 0 and folder is not None:
            folder.save(vectors.embedding(step), identity, optimizer, scaler)
            if config.png_card:
                _png_card(sd, config, folder, vectors, preview_prompt, data, step)
            report.write_quietly(folder.path)
    return vectors.embedding(step)
