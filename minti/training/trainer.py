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
is its one-concept case. What it writes into each concept's `output` (when set) and reads back
to resume is minti.training.run_folder's; the settings are minti.training.config's; several
processes under torchrun are minti.training.distributed's.
"""
from __future__ import annotations

import copy
import logging
import math
import re
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from minti import atomic, diffusion, sampling
from minti.errors import RunError, UserError, missing_path
from minti.training import distributed, lr_schedules, memory, report
from minti.training import templates as tpl
from minti.training.config import TrainConfig
from minti.training.data import TrainingData, buckets_on, generator, load_images
from minti.training.embedding import Embedding, file_stem, load_embedding, mismatch, save_png_card
from minti.training.norm import NormControl
from minti.training.run_folder import RunFolder, checkpoint_short_hash, model_identity

log = logging.getLogger("minti")

MAX_VECTORS = 75  # a prompt holds 75 content tokens; more vectors than that can never be used
# The largest training size accepted: four times SDXL's, past any published fine-tune; larger is a typo
# that would otherwise end in an out-of-memory crash while resizing the images.
MAX_RESOLUTION = 4096
# What --init treats as a file rather than words: the embedding, model and image suffixes (and the
# usual typo of .safetensors), besides anything with a path separator.
PATH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".safetensor", ".sft", ".png", ".jpg", ".jpeg",
                 ".webp")
EMBEDDING_MAX_BYTES = 64 * 2**20  # far above any embedding (kilobytes), far below any model (gigabytes)


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


class LossScaler:
    """Dynamic loss scaling for fp16 models: gradients flow back through fp16 activations, where
    small values underflow to zero; scale the loss up, and skip any step whose gradients overflow.
    The scale never falls below 1: a step that overflows at scale 1 is not an overflow of the
    scaling but a diverged loss (_optimizer_step)."""

    def __init__(self, scale: float | None, growth_interval: int = 2000) -> None:
        self.scale = scale
        self.growth_interval = growth_interval
        self.good_steps = 0

    @property
    def enabled(self) -> bool:
        return self.scale is not None

    @property
    def at_floor(self) -> bool:
        return self.enabled and self.scale <= 1.0

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


def looks_like_a_path(init: str) -> bool:
    """Whether --init names a file rather than words: a file suffix, or a path separator in one
    word ("embeddings/dog") or in a path that exists. A bare word is words even when a folder of
    that name happens to exist here, and a phrase ("a black/white cat") is words."""
    text = init.strip()
    if Path(text).suffix.lower() in PATH_SUFFIXES:
        return True
    if "/" not in text and "\\" not in text:
        return False
    return not any(c.isspace() for c in text) or Path(text).expanduser().exists()


def init_embedding(init: str) -> Embedding | None:
    """The embedding --init names, None for words. Anything that looks like a path and is not a
    readable embedding is an error, never quietly prompt words."""
    if not looks_like_a_path(init):
        return None
    path = Path(init.strip()).expanduser()
    if not path.exists():
        reason = missing_path(path)
        raise UserError(f"--init {init} {reason}" + (": pass an embedding file (.pt/.safetensors) or words, "
                                                     "e.g. --init cat" if reason == "does not exist" else ""))
    if path.is_file() and path.stat().st_size > EMBEDDING_MAX_BYTES:
        raise UserError(f"--init {init} is {path.stat().st_size / 2**30:.1f} GiB: a model checkpoint, not an "
                        "embedding; pass an embedding file (.pt/.safetensors) or words, e.g. --init cat")
    try:
        return load_embedding(path)
    except ValueError as e:
        raise UserError(f"--init {init}: {e}") from None


def initial_vectors(sd, init: str, n: int | None) -> list[torch.Tensor]:
    """fp32 CPU [n, dim] per encoder, from init words or an embedding file (init_embedding)."""
    emb = init_embedding(init)
    if emb is not None:
        if emb.dims != list(sd.embedding_dims):
            raise UserError(f"--init {mismatch(init, emb, sd)}, or init from words")
        n = n or emb.n_vectors
        if n < emb.n_vectors:
            log.warning("--init %s holds %d vectors but --vectors is %d: only %d of them start the embedding "
                        "(evenly picked, as A1111 does)", init, emb.n_vectors, n, n)
        return [spread(v, n) for v in emb.vectors]
    n = n or 1
    out = []
    for tokenizer, encoder in zip(sd.tokenizers, sd.text_encoders):
        ids = [i for i in tokenizer.tokenize_words(init) if i < tokenizer.vocab_size]
        if not ids:
            raise UserError(f"--init {init!r} tokenizes to nothing: give one or more words that describe the "
                            "concept's kind, e.g. --init cat")
        if len(ids) > n and not out:  # once, for the first text encoder
            log.warning("--init %r is %d tokens but the embedding has %d vector%s: only %d of them start it "
                        "(evenly picked, as A1111 does); pass --vectors %d to start from every one", init, len(ids),
                        n, "s" if n > 1 else "", n, len(ids))
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
    res = config.resolution if config.resolution is not None else sd.default_size
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
    for name in ("steps", "save_every", "preview_every", "warmup_steps"):  # steps=0: the init embedding (API)
        if getattr(config, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(config, name)}")
    for name in ("batch_size", "grad_accum", "repeats", "preview_steps"):
        if getattr(config, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")
    if config.preview_steps > sampling.MAX_STEPS:
        raise UserError(f"--preview-steps {config.preview_steps} is more than the {sampling.MAX_STEPS} a sampler "
                        "can take (20-50 are usual)")
    if config.resolution is not None and not 1 <= config.resolution <= MAX_RESOLUTION:
        raise UserError(f"--resolution {config.resolution} is outside 1-{MAX_RESOLUTION}: pass the training size in "
                        "pixels (512 for SD 1.x, 768 for SD 2.x v models, 1024 for SDXL), or leave it out")
    if config.max_grad_norm is not None and not config.max_grad_norm > 0:
        raise UserError(f"--max-grad-norm must be > 0, got {config.max_grad_norm}")
    if config.vram is not None and not (config.vram > 0 and math.isfinite(config.vram)):
        raise UserError(f"--vram must be a positive number of GiB, got {config.vram}")
    if config.images is None:
        raise UserError("no training images: pass --images with a folder of 3-20 pictures of the concept")
    _check_images_folder(Path(config.images))
    init_embedding(config.init)  # a file --init names is read before the model loads, so it fails fast
    if not config.token or any(c.isspace() for c in config.token):
        raise UserError(f"--token {config.token!r} must be one word without spaces, e.g. <my-cat>")
    if not re.search(r"\w", config.token):  # the files are named after it: '<>' would make "embedding.pt"
        raise UserError(f"--token {config.token!r} has no letters or digits to name its files by: use a word "
                        "such as <my-cat>")
    if config.preview_sampler not in sampling.SAMPLERS:
        raise UserError(f"unknown preview sampler {config.preview_sampler!r}: use {' or '.join(sampling.SAMPLERS)}")


def _validate_together(configs: list[TrainConfig]) -> None:
    """Concepts trained in one run: distinct tokens and output folders, one memory plan."""
    for name in ("token", "output"):
        seen: dict = {}
        for c in configs:
            value = getattr(c, name)
            if value is not None and str(value) in seen:
                raise UserError(f"two concepts use --{name} {value}: give each concept its own {name}")
            seen[str(value)] = c
    for name in ("memory", "vram"):
        values = [getattr(c, name) for c in configs]
        if len(set(values)) > 1:
            raise UserError(f"the concepts ask for different --{name} ({', '.join(map(str, values))}): they share "
                            "one model and one memory plan; give them the same value")


def _warn_about(config: TrainConfig) -> None:
    """Settings that are valid but almost certainly not meant (once per run; _validate may run twice)."""
    if isinstance(config.lr, (int, float)) and config.lr == 0:
        log.warning("--lr 0: the vectors will not change; pass a learning rate such as --lr 5e-3")


def _check_images_folder(folder: Path) -> None:
    """What the image reader (minti.training.data) cannot tell apart: a link that loops or points
    nowhere is not a missing folder, and a folder whose images all sit in subfolders is not empty."""
    from minti.training.data import IMAGE_EXTENSIONS

    if not folder.exists():
        reason = missing_path(folder)
        if reason != "does not exist":
            raise UserError(f"--images {folder} {reason}")
        return  # the reader says it, with the formats it takes
    if not folder.is_dir() or any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.iterdir() if p.is_file()):
        return
    nested = sorted(p for p in folder.glob("*/*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if nested:
        subfolders = sorted({p.parent.name + "/" for p in nested})
        which = f"subfolders {', '.join(subfolders[:4])} hold" if len(subfolders) > 1 else f"subfolder {subfolders[0]} holds"
        raise UserError(f"--images {folder} has no images of its own, but its {which} {len(nested)}: pass one as "
                        "--images (minti reads only the images directly inside the folder)")


def kernels_in_use(sd) -> str:
    """One line: which path (Triton kernel or torch) each hot op takes on this run, and why."""
    from minti.models.backends import describe_backends

    return describe_backends(sd.device, sd.dtype)


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
def _latents_cached(sd, concepts: list, vae_was_loaded: bool) -> Iterator[None]:
    """Encode every image variant of every concept once; the VAE then leaves the training device
    until training is over (and comes back if it was loaded before)."""
    with _as_user_error():
        for c in concepts:
            c.data.encode(sd, c.config.latent_sampling)
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
        return joint_extra([self], detach)

    def embedding(self, step: int, values: list[torch.Tensor] | None = None) -> Embedding:
        """The vectors as an Embedding of `step`; `values`: earlier vectors to give instead (a
        diverged run keeps its last good ones)."""
        values = values if values is not None else [p.detach() for p in self.params]
        return Embedding(self.token, [v.float().cpu() for v in values], step=step,
                         sd_checkpoint=self.sd_checkpoint, sd_checkpoint_name=self.sd_checkpoint_name)


def joint_extra(vectors: list[_Vectors], detach: bool = False) -> list[torch.Tensor]:
    """The `extra` rows for encode_tokens with every listed token's vectors at its offset, one
    tensor per text encoder; rows of placeholders not listed (registered before, between or by
    concepts not in this batch) are zeros, which no prompt of the batch reads."""
    ordered = sorted(vectors, key=lambda v: v.offset)
    out = []
    for encoder in range(len(ordered[0].params)):
        pieces, row = [], 0
        for v in ordered:
            p = v.params[encoder].detach() if detach else v.params[encoder]
            if v.offset > row:
                pieces.append(p.new_zeros(v.offset - row, p.shape[1]))
            pieces.append(p)
            row = v.offset + p.shape[0]
        out.append(torch.cat(pieces) if len(pieces) > 1 else pieces[0])
    return out


@dataclass
class _Concept:
    """One concept of a run: its settings, images, vectors, optimizer and run folder. Each keeps
    its own step, so that each draws exactly what a run of it alone would draw."""
    config: TrainConfig
    data: TrainingData
    vectors: _Vectors
    optimizer: torch.optim.Optimizer
    scaler: LossScaler
    lr_at: Callable[[int], float]
    folder: RunFolder | None  # where this process writes its files (rank 0 only); None: nothing written
    preview_prompt: str
    norms: NormControl  # --norm / --max-norm, applied after every update
    step: int = 0  # optimizer steps done
    resumed_at: int = 0
    diverged: _Diverged | None = None  # set when its loss or gradient turned non-finite: it stops alone
    last_good: _LastGood = field(default_factory=lambda: _LastGood())  # what it keeps if it diverges

    @property
    def training(self) -> bool:
        return self.diverged is None and self.step < self.config.steps

    @property
    def previews(self) -> bool:
        return self.folder is not None and self.config.preview_every > 0


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


@dataclass
class _Draw:
    """One concept's share of a micro-batch on this rank."""
    latents: torch.Tensor
    prompts: list[str]
    weights: torch.Tensor | None
    variants: list
    noise: torch.Tensor
    t: torch.Tensor
    share: float  # this rank's part of the global batch's loss weight, relative to an equal split


def _draw(c: _Concept, micro: int, world: distributed.World) -> _Draw:
    """Micro-batch `micro` of concept c's current step: its samples, timesteps and noise depend on
    (seed, step, micro) only. Every rank draws the whole global batch (world size x batch size,
    what one process at that batch size draws) and keeps its own slice of it."""
    config = c.config
    size = config.batch_size * world.size
    first = (c.step * config.grad_accum + micro) * size
    latents, prompts, weights, variants = c.data.batch(first, size)
    g = generator(config.seed, "noise", c.step, micro)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, diffusion.NUM_TRAIN_TIMESTEPS, (latents.shape[0],), generator=g)
    if world.size == 1:
        return _Draw(latents, prompts, weights, variants, noise, t, 1.0)
    mine = slice(world.rank * config.batch_size, (world.rank + 1) * config.batch_size)
    share = 1.0
    if weights is not None:
        # alpha masks normalise the loss by the mask mass of the whole batch: a rank holding more
        # of it weighs more in the average over ranks, exactly as in one process
        share = float(weights[mine].sum() * world.size / weights.sum().clamp(min=1e-8))
        weights = weights[mine]
    return _Draw(latents[mine], prompts[mine], weights, variants[mine], noise[mine], t[mine], share)


def _micro_batch_loss(sd, concepts: list[_Concept], acp: torch.Tensor, micro: int,
                      world: distributed.World) -> torch.Tensor:
    """The losses [len(concepts)] of micro-batch `micro` of each concept's current step. Concepts
    whose latents have the same shape share one text-encoder and UNet pass; each concept's loss
    is the mean over its own samples, so its gradient is the one it gets when trained alone."""
    draws = [_draw(c, micro, world) for c in concepts]
    losses: list[torch.Tensor | None] = [None] * len(concepts)
    for shape in dict.fromkeys(tuple(d.latents.shape[1:]) for d in draws):
        members = [i for i, d in enumerate(draws) if tuple(d.latents.shape[1:]) == shape]
        batch = [draws[i] for i in members]
        prompts = [p for d in batch for p in d.prompts]
        extra = joint_extra([concepts[i].vectors for i in members])
        context, pooled = sd.encode_tokens(sd.tokenize(prompts), extra)
        y = None
        if sd.family == "sdxl":
            rows, row = [], 0
            for i, d in zip(members, batch):
                for v in d.variants:
                    rows.append(sd.sdxl_vector(pooled[row:row + 1], original_size=v.original_size,
                                               crop=v.crop_top_left, target_size=v.target_size))
                    row += 1
            y = torch.cat(rows)
        weights = [d.weights for d in batch] if any(d.weights is not None for d in batch) else None
        out = diffusion.diffusion_loss(sd.unet, torch.cat([d.latents for d in batch]).to(sd.device),
                                       torch.cat([d.noise for d in batch]), torch.cat([d.t for d in batch]),
                                       context, y, prediction=sd.prediction, weights=weights, acp=acp,
                                       groups=[d.latents.shape[0] for d in batch])
        for i, d, loss in zip(members, batch, out):
            losses[i] = loss * d.share if d.share != 1.0 else loss
    return torch.stack(losses)


def _forward_backward(sd, concepts: list[_Concept], acp: torch.Tensor, world: distributed.World) -> torch.Tensor:
    """The gradients of one optimizer step of every concept (grad_accum micro-batches), averaged
    over the ranks -> [len(concepts)] each concept's mean loss of the step. The backward runs
    once per micro-batch on the sum of the concepts' losses, each scaled by its own fp16 loss
    scale, so each concept's gradient is its own loss's."""
    losses: list[list[torch.Tensor]] = [[] for _ in concepts]
    for micro in range(max(c.config.grad_accum for c in concepts)):
        members = [i for i, c in enumerate(concepts) if micro < c.config.grad_accum]
        micro_losses = _micro_batch_loss(sd, [concepts[i] for i in members], acp, micro, world)
        scaled = [loss * ((concepts[i].scaler.scale if concepts[i].scaler.enabled else 1.0)
                          / concepts[i].config.grad_accum) for i, loss in zip(members, micro_losses)]
        torch.stack(scaled).sum().backward()
        for i, loss in zip(members, micro_losses):
            losses[i].append(loss.detach())
    means = torch.stack([torch.stack(ls).mean() for ls in losses])
    if world.size > 1:
        for p in (p for c in concepts for p in c.vectors.params):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        distributed.average_([means] + [p.grad for c in concepts for p in c.vectors.params], world)
    return means


class _Diverged(Exception):
    def __init__(self, loss: float) -> None:
        self.loss = loss

    def user_error(self, step: int, resumed_at: int, folder: RunFolder | None, kept: int | None) -> RunError:
        """step: optimizer steps done when the loss of the next one was not finite; resumed_at: the
        step this session started from; kept: the step of the vectors kept (the last whose loss and
        gradient were finite), None if none was."""
        if kept is None:  # the very vectors this session started from: the model or the data
            start = ("before any update" if resumed_at == 0
                     else f"at the first step after resuming from step {resumed_at}")
            if step > resumed_at:  # steps fp16 loss scaling skipped, halving its scale down to 1
                start += f" and still at step {step + 1} with the loss scale down to 1"
            return RunError(f"the loss is {self.loss} {start}, so it is not the learning rate: the model's "
                            "weights or the images give NaN/inf (a broken merge or conversion can hold NaN "
                            "weights); check the checkpoint, or train with --dtype float32; nothing was saved")
        where = (f"; kept the embedding of step {kept}, the last with a finite loss, in {folder.path}"
                 if folder is not None else f"; the last embedding with a finite loss is from step {kept}")
        return RunError(f"the loss or its gradient became non-finite at step {step + 1} (loss {self.loss}; "
                        f"diverged){where}. Lower --lr, add --max-grad-norm 1, or train in float32")


class _LastGood:
    """The vectors and optimizer state of the last step whose loss and gradient were finite, so that
    a diverged run keeps those, never the update that then produced NaN/inf. Copies of a few
    [n, dim] tensors per step: nothing next to a UNet step."""

    def __init__(self) -> None:
        self.step: int | None = None
        self.vectors: list[torch.Tensor] = []
        self.optimizer: dict = {}
        self._pending: tuple = ()

    def before(self, step: int, vectors: _Vectors, optimizer: torch.optim.Optimizer) -> None:
        """The state `step` is about to be updated from; it becomes the good one once its loss is."""
        self._pending = (step, [p.detach().clone() for p in vectors.params], copy.deepcopy(optimizer.state_dict()))

    def finite(self) -> None:
        self.step, self.vectors, self.optimizer = self._pending


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


def _optimizer_step(c: _Concept, mean_loss: float, lr: float) -> bool:
    """Apply concept c's step from the gradients _forward_backward left -> whether it was applied.
    A non-finite loss or gradient skips the step under fp16 loss scaling, halving the scale, and
    raises _Diverged without it or once the scale is down to 1 (NaN weights, a diverged run: no
    scale explains it, and skipping on would skip forever)."""
    finite = math.isfinite(mean_loss) and all(bool(torch.isfinite(p.grad).all()) for p in c.vectors.params)
    if not finite:
        c.optimizer.zero_grad(set_to_none=True)
        if not c.scaler.enabled or c.scaler.at_floor:
            raise _Diverged(mean_loss)
        c.scaler.update(False)
        return False
    scale = c.scaler.scale if c.scaler.enabled else 1.0
    if scale != 1.0:
        for p in c.vectors.params:
            p.grad.div_(scale)
    if c.config.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(c.vectors.params, c.config.max_grad_norm)
    for group in c.optimizer.param_groups:
        group["lr"] = lr
    c.optimizer.step()
    c.norms.apply(c.vectors.params)  # on the trained vectors, after the update
    c.optimizer.zero_grad(set_to_none=True)
    c.scaler.update(True)
    return True


def _preview(sd, config: TrainConfig, folder: RunFolder, vectors: _Vectors, prompt: str, data: TrainingData,
             step: int) -> None:
    """Draw the preview image of `step` (always the same seed) into the run folder."""
    height, width = data.preview_size()  # the square, or the bucket most images are in
    latents = sampling.generate(sd, [prompt], extra=vectors.extra(detach=True), steps=config.preview_steps,
                                guidance=config.preview_guidance, seeds=[config.seed],
                                method=config.preview_sampler, height=height, width=width,
                                shape=data.preview_latent_shape())
    pixels = sampling.decode(sd, latents)  # the VAE comes back for this only, the UNet waits on the host
    path = folder.preview_path(file_stem(config.token), step)
    try:
        atomic.save_png(sampling.to_pil(pixels)[0], path)
    except OSError as e:  # a preview is for looking at: a full disk here must not end (or lose) the run
        log.warning("could not write the preview %s (%s); training goes on", path, e.reason
                    if isinstance(e, atomic.WriteError) else e.strerror or e)
    report.write_quietly(folder.path)


def _png_card(sd, c: _Concept) -> None:
    """--png-card: <name>.png beside the .pt, the newest preview carrying the embedding (A1111's
    card); without a preview one is drawn for it. A failure to write it is a warning."""
    if report.newest_preview(c.folder.path) is None:
        _preview(sd, c.config, c.folder, c.vectors, c.preview_prompt, c.data, c.step)
    try:
        save_png_card(c.vectors.embedding(c.step), report.newest_preview(c.folder.path),
                      c.folder.path / f"{file_stem(c.config.token)}.png")
    except OSError as e:
        log.warning("could not write the PNG card (%s); the embedding files are saved", e)


# ---------------------------------------------------------------------------- the run


def _warn_if_the_batch_changes(config: TrainConfig, saved_world: int, world_size: int) -> None:
    """A run resumes on any number of processes, but --batch-size is per process: say so when
    the images per step differ from the saved run's."""
    try:
        saved_batch = int(RunFolder(config.resume).read_config()["config"].get("batch_size", config.batch_size))
    except UserError:  # a state without its config.json: nothing to compare with
        return
    before, now = saved_world * saved_batch, world_size * config.batch_size
    if before == now:
        return
    keep = (f"pass --batch-size {before // world_size} to keep {before}" if before % world_size == 0
            else f"a batch of {before} does not split over {world_size} processes")
    log.warning("%s was trained with %d images per step (%d process%s x --batch-size %d); this run takes %d "
                "(%d x %d): %s", config.resume, before, saved_world, "es" if saved_world > 1 else "", saved_batch,
                now, world_size, config.batch_size, keep)


def _concept(sd, config: TrainConfig, setup: tuple, identity: dict | None, short_hash: str | None,
             world: distributed.World) -> _Concept:
    """Everything one concept needs before its first step: its state when resuming, vectors,
    placeholder token, images, optimizer and loss scaler."""
    lr_at, templates, resolution = setup
    folder = RunFolder(config.output, world.size) if config.output is not None else None
    state = (RunFolder(config.resume).read_state(config.token, identity, config.vectors)
             if config.resume is not None else None)
    if state is not None and int(state["step"]) >= config.steps:  # before anything is rewritten
        raise UserError(f"{config.resume} is already at step {int(state['step'])} and --steps {config.steps} asks for "
                        f"no more: pass --steps larger than {int(state['step'])} to train on (its files are unchanged)")
    if state is not None and world.writes:
        _warn_if_the_batch_changes(config, int(state.get("world_size", 1)), world.size)
    if folder is not None and world.writes:
        folder.check_start(config)
    init = initial_vectors(sd, config.init, config.vectors or (state["n_vectors"] if state else None))
    offset = register_token(sd, config.token, init[0].shape[0])
    data = _training_data(sd, config, resolution, templates, init[0].shape[0])
    preview_prompt = _preview_prompt(config, data.templates)
    norms = NormControl.from_config(config.norm, config.max_norm, [token_table(e) for e in sd.text_encoders])
    if norms.active:
        log.info(norms.describe())
    vectors = _Vectors(config.token, [torch.nn.Parameter(v.to(sd.device, torch.float32)) for v in init], offset,
                       short_hash, _checkpoint_name(sd.source))
    optimizer = torch.optim.AdamW(vectors.params, lr=lr_at(0), betas=tuple(config.adam_betas), eps=config.adam_eps,
                                  weight_decay=config.weight_decay)
    fp16 = sd.dtype == torch.float16
    scaler = LossScaler(config.loss_scale if config.loss_scale is not None else (2.0 ** 16 if fp16 else None))
    step = _resume(state, vectors, optimizer, scaler) if state is not None else 0
    return _Concept(config, data, vectors, optimizer, scaler, lr_at, folder if world.writes else None,
                    preview_prompt, norms, step=step, resumed_at=step)


def _finish(sd, c: _Concept, identity: dict | None) -> None:
    """The end of a concept's run: the final save, then the last preview when it reached its steps
    (a preview that fails, a full disk, must not cost the steps since the last save)."""
    if c.step > 0 and c.folder is not None:
        c.folder.save(c.vectors.embedding(c.step), identity, c.optimizer, c.scaler)
    if c.previews and c.step >= c.config.steps and c.step > c.resumed_at:
        _preview(sd, c.config, c.folder, c.vectors, c.preview_prompt, c.data, c.step)
    if c.step > 0 and c.folder is not None:
        if c.config.png_card:
            _png_card(sd, c)
        report.write_quietly(c.folder.path)


def _step_info(sd, done: list[tuple], concepts: list[_Concept], iterations: int, elapsed: float) -> StepInfo:
    """What on_step hears: `done` holds (concept, loss, lr, applied) of each concept that stepped."""
    first = done[0][0]
    return StepInfo(step=max(c.step for c, *_ in done), total=max(c.config.steps for c in concepts),
                    loss=sum(loss for _, loss, _, _ in done) / len(done), lr=done[0][2],
                    skipped=any(not applied for *_, applied in done), loss_scale=first.scaler.scale,
                    seconds=elapsed, steps_per_second=iterations / max(elapsed, 1e-9),
                    peak_memory=torch.cuda.max_memory_allocated(sd.device) if sd.device.type == "cuda" else None,
                    losses={c.config.token: loss for c, loss, _, _ in done})


def _saved_after_lost_rank(lost: distributed.RankLost, concepts: list[_Concept], identity: dict | None,
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
        _validate(config)
        _warn_about(config)
    _validate_together(configs)
    world = distributed.launched()
    _freeze(sd)
    vae_was_loaded = _restore_vae(sd)  # needed once, to cache the latents
    # Hashing a multi-GB file takes seconds: only when files are written or a resume is checked.
    needs_identity = any(c.output is not None or c.resume is not None for c in configs)
    short_hash = checkpoint_short_hash(sd.source) if needs_identity else None
    identity = model_identity(sd, short_hash) if needs_identity else None
    with _as_user_error():
        setups = [(lr_schedules.make_lr_schedule(c.lr, c.lr_schedule, c.steps, c.warmup_steps),
                   tpl.load_templates(c.template), training_resolution(sd, c)) for c in configs]
        # one batch on each rank holds every concept's samples: plan the memory for all of them;
        # also with --buckets: no bucket has more pixels than resolution^2 (data.make_buckets)
        plan = memory.apply(sd, configs[0].memory, max(s[2] for s in setups), sum(c.batch_size for c in configs),
                            configs[0].vram)
    concepts = [_concept(sd, config, setup, identity, short_hash, world) for config, setup in zip(configs, setups)]
    _log_how_it_runs(sd, plan)  # only once the input is valid: a bad flag gets its one error line
    acp = diffusion.alphas_cumprod().to(sd.device, torch.float32)  # once, not per step
    iterations = 0

    with _Stop(second_interrupt_raises=world.size == 1) as stop, distributed.joined(world, sd.device), \
            _latents_cached(sd, concepts, vae_was_loaded):
        for c in concepts:
            if c.folder is not None:
                c.folder.write_config(c.config, sd, c.vectors.params[0].shape[0], c.data.resolution, identity)
                c.folder.start_loss_log(c.step)
            if c.previews and c.step == 0 and not stop.requested:
                _preview(sd, c.config, c.folder, c.vectors, c.preview_prompt, c.data, c.step)
        start = time.perf_counter()
        if sd.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(sd.device)
        try:
            # every rank takes the same decisions from the same all-reduced numbers; the stop flag
            # is shared too, so all ranks end at the same step
            while (active := [c for c in concepts if c.training]) and not distributed.any_rank(stop.requested, world):
                losses = _forward_backward(sd, active, acp, world).tolist()
                done = []  # (concept, loss, lr, applied) of the concepts that made their step
                for c, loss in zip(active, losses):
                    lr = c.lr_at(c.step)
                    c.last_good.before(c.step, c.vectors, c.optimizer)
                    try:
                        applied = _optimizer_step(c, loss, lr)
                    except _Diverged as e:  # keep the last vectors whose loss was finite; the others go on
                        c.diverged = e
                        kept = c.last_good
                        if c.folder is not None and kept.step is not None:
                            c.folder.save(c.vectors.embedding(kept.step, kept.vectors), identity, c.optimizer,
                                          c.scaler, optimizer_state=kept.optimizer)
                        if len(concepts) > 1:
                            log.error("%s: %s", c.config.token, e.user_error(c.step, c.resumed_at, c.folder, kept.step))
                        continue
                    if applied:
                        c.last_good.finite()
                    c.step += 1
                    done.append((c, loss, lr, applied))
                    elapsed = time.perf_counter() - start
                    if c.folder is not None:
                        c.folder.log_loss({"step": c.step, "loss": loss, "lr": lr, "skipped": not applied,
                                           "loss_scale": c.scaler.scale, "seconds": round(elapsed, 3)})
                    if c.folder is not None and c.config.save_every and c.step % c.config.save_every == 0 \
                            and c.step < c.config.steps:
                        c.folder.save(c.vectors.embedding(c.step), identity, c.optimizer, c.scaler, intermediate=True)
                    if c.previews and c.step % c.config.preview_every == 0 and c.step < c.config.steps:
                        _preview(sd, c.config, c.folder, c.vectors, c.preview_prompt, c.data, c.step)
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
    # a diverged concept's embedding is its last good one, as saved, never the update that broke it
    embeddings = [c.vectors.embedding(c.last_good.step, c.last_good.vectors)
                  if c.diverged is not None and c.last_good.step is not None else c.vectors.embedding(c.step)
                  for c in concepts]
    diverged = [c for c in concepts if c.diverged is not None]
    if diverged:
        raise Diverged([(c.config.token, c.diverged.user_error(c.step, c.resumed_at, c.folder, c.last_good.step))
                        for c in diverged], embeddings)
    return embeddings

