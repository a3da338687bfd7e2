"""What a run does before its first step (minti.training.trainer.train_many calls these in order):
the model frozen and its VAE on the device to cache the latents, the memory plan of the batch the
concepts share, and each concept built: its resumed state, vectors, placeholder token, images,
optimizer and loss scaler (a minti.training.step.Concept).
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from minti.errors import UserError
from minti.models.backends import describe_backends
from minti.models.fp8 import describe_weight_bytes
from minti.sampling import latent_factor
from minti.training import distributed, lr_schedules, memory
from minti.training import templates as tpl
from minti.training.config import MAX_VECTORS, TrainConfig
from minti.training.data import TrainingData, buckets_on, load_images
from minti.training.norm import NormControl
from minti.training.placeholder import initial_vectors, register_token, token_table
from minti.training.run_folder import RunFolder
from minti.training.step import Concept, LossScaler, Vectors, restore

log = logging.getLogger("minti")


def training_resolution(sd, config: TrainConfig) -> int:
    """config.resolution, or the model family's native size; checked against the UNet's depth."""
    res = config.resolution if config.resolution is not None else sd.default_size
    factor = latent_factor(sd)
    # The UNet halves the latent once per level below the first; the latent must survive that.
    levels = len(sd.unet.cfg.channel_mult) - 1 if hasattr(sd.unet, "cfg") else 3
    multiple = factor * 2 ** levels
    if res % multiple or res <= 0:
        raise UserError(f"--resolution {res} must be a positive multiple of {multiple} for this model")
    return res


def freeze(sd) -> None:
    """minti.load returns frozen modules; make sure, since a stray requires_grad would make
    autograd keep a gradient the size of the whole model."""
    for module in [sd.unet, *sd.text_encoders]:
        module.requires_grad_(False).eval()


def vae_on_device(sd) -> bool:
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
def _as_user_error() -> Iterator[None]:
    """The data, template, schedule and memory code raise ValueError for bad input: the user's."""
    try:
        yield
    except ValueError as e:
        raise UserError(str(e)) from None


def set_up(sd, configs: list[TrainConfig], identity: dict | None, short_hash: str | None,
           world: distributed.World) -> tuple[list[Concept], memory.Plan]:
    """Every concept of the run, built in order, and the memory plan of the batch they share."""
    with _as_user_error():
        setups = [(lr_schedules.make_lr_schedule(c.lr, c.lr_schedule, c.steps, c.warmup_steps),
                   tpl.load_templates(c.template), training_resolution(sd, c)) for c in configs]
        # one batch on each rank holds every concept's samples: plan the memory for all of them;
        # also with --buckets: no bucket has more pixels than resolution^2 (data.make_buckets)
        plan = memory.apply(sd, configs[0].memory, max(s[2] for s in setups), sum(c.batch_size for c in configs),
                            configs[0].vram)
    concepts = [_concept(sd, config, setup, identity, short_hash, world) for config, setup in zip(configs, setups)]
    return concepts, plan


def _concept(sd, config: TrainConfig, setup: tuple, identity: dict | None, short_hash: str | None,
             world: distributed.World) -> Concept:
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
    vectors = Vectors(config.token, [torch.nn.Parameter(v.to(sd.device, torch.float32)) for v in init], offset,
                      short_hash, _checkpoint_name(sd.source))
    optimizer = torch.optim.AdamW(vectors.params, lr=lr_at(0), betas=tuple(config.adam_betas), eps=config.adam_eps,
                                  weight_decay=config.weight_decay)
    fp16 = sd.dtype == torch.float16
    scaler = LossScaler(config.loss_scale if config.loss_scale is not None else (2.0 ** 16 if fp16 else None))
    step = restore(state, vectors, optimizer, scaler) if state is not None else 0
    return Concept(config, data, vectors, optimizer, scaler, lr_at, folder if world.writes else None,
                   preview_prompt, norms, step=step, resumed_at=step)


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


def _training_data(sd, config: TrainConfig, resolution: int, templates: list[str], n_vectors: int) -> TrainingData:
    with _as_user_error():
        images = load_images(config.images)
        if config.template in tpl.BUILTIN and any(im.caption_from == "txt" for im in images):
            # captions name what the token should NOT absorb (background, pose, ...): use them
            templates = tpl.with_filewords(templates)
        data = TrainingData(images, resolution, templates, config.token, seed=config.seed, crop=config.crop,
                            random_crops=config.random_crops, flip=config.flip, alpha_mask=config.alpha_mask,
                            repeats=config.repeats, buckets=buckets_on(config.buckets, sd.family_facts),
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


@contextmanager
def latents_cached(sd, concepts: list[Concept], vae_was_loaded: bool) -> Iterator[None]:
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


def log_how_it_runs(sd, plan: memory.Plan) -> None:
    """The memory plan, the path each kernel op takes and the weights' bytes, one line each."""
    log.info(plan.describe())
    log.info(kernels_in_use(sd))
    log.info(weight_bytes_line(sd))


def kernels_in_use(sd) -> str:
    """One line: which path (Triton kernel or torch) each hot op takes on this run, and why."""
    return describe_backends(sd.device, sd.dtype)


def weight_bytes_line(sd) -> str:
    """One line: the bytes of each part's frozen weights (and how many are fp8, with --weights fp8)."""
    return describe_weight_bytes(sd.parts())
