"""Textual inversion: learn N new token vectors so that a frozen Stable Diffusion draws a concept.

    sd = minti.load("v1-5-pruned-emaonly.safetensors", dtype=torch.float16, device="cuda")
    emb = minti.train(sd, minti.TrainConfig(token="<my-cat>", init="cat", images="photos/",
                                            output="runs/my-cat"))

Only the new vectors are parameters (fp32, one [N, dim] tensor per text encoder); everything
else stays frozen and bit-identical. Every random draw (batch order, crop/flip variant, template,
timestep, noise) is derived from (seed, step), so a resumed run draws exactly what the
uninterrupted one would have, and a CPU run is bit-reproducible.

Files in `output` (when set): <name>.safetensors / <name>.pt / learned_embeds.safetensors (see
minti.training.embedding), <name>-<step>.safetensors every save_every steps, previews/<name>-<step>.png,
loss.jsonl, config.json (the resolved run) and state.pt (what --resume needs).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from minti import atomic
from minti.training import memory
from minti import sampling as smp
from minti import diffusion
from minti.training import lr_schedules
from minti.training import templates as tpl
from minti.errors import UserError
from minti.training.data import TrainingData, generator, load_images
from minti.training.embedding import Embedding, file_stem, load_embedding

log = logging.getLogger("minti")

STATE_FILE = "state.pt"
STATE_FORMAT = "minti-train-state-1"
MAX_VECTORS = 75  # a prompt holds 75 content tokens; more vectors than that can never be used


@dataclass
class TrainConfig:
    """Everything a training run needs besides the model. Defaults follow A1111 where users expect them."""
    token: str = "<concept>"  # the placeholder; files are named after it without <>
    images: str | Path | None = None  # folder of 3-20 images of the concept
    init: str = "*"  # words whose token vectors start the embedding, or an embedding file
    vectors: int | None = None  # vectors per token (1-75); default 1, or the init file's count
    steps: int = 3000  # total optimizer steps, also when resuming
    resolution: int | None = None  # default: 512 (SD 1.x, SD 2.x eps), 768 (SD 2.x v), 1024 (SDXL)
    batch_size: int = 1
    grad_accum: int = 1
    lr: float | str = 5e-3  # a number, or A1111's "0.005:100, 1e-3:1000, 1e-5"
    lr_schedule: str = "constant"  # constant | cosine | linear (or the A1111 text)
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    max_grad_norm: float | None = None  # clip the vectors' gradient norm (None: no clipping)
    template: str = "object"  # object | style | path of a file with [name]/[filewords] lines
    repeats: int = 1  # each image this many times per epoch
    flip: bool = False  # also train on mirrored images (off: text and logos must not flip)
    crop: str = "center"  # center | random
    random_crops: int = 4  # cached crop variants per image for crop="random"
    alpha_mask: bool = False  # PNG alpha weights the loss instead of only compositing on white
    latent_sampling: str = "mean"  # mean | sample (one VAE sample per variant, drawn once)
    loss_scale: float | None = None  # fp16 dynamic loss scaling start; None: 2**16 for fp16 models, off otherwise
    save_every: int = 500  # intermediate <name>-<step>.safetensors + state (0: only at the end)
    preview_every: int = 500  # preview PNG every N steps, and before the first (0: none)
    preview_prompt: str | None = None  # default: the first template line
    preview_steps: int = 20
    preview_cfg: float = 7.5
    preview_sampler: str = "ddim"
    seed: int = 0
    output: str | Path | None = None  # None: write nothing (API use); the CLI defaults to runs/<name>
    resume: str | Path | None = None  # a run folder with state.pt
    overwrite: bool = False  # allow a fresh run into a folder that already holds one
    memory: str = "auto"  # auto | low | fast: recompute UNet blocks in backward (low) or store them (fast)


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
        self.signal_name = ""
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
        self.signal_name = signal.Signals(signum).name

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
    source = Path(sd.source)
    return {"family": sd.family, "prediction": sd.prediction, "embedding_dims": list(sd.embedding_dims),
            "hash": short_hash if short_hash is not None else _folder_fingerprint(source)}


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
    if Path(init).suffix.lower() in (".pt", ".bin", ".safetensors"):
        try:
            emb = load_embedding(init)
        except ValueError as e:
            raise UserError(f"--init {init}: {e}") from None
        if emb.dims != list(sd.embedding_dims):
            raise UserError(f"--init {init} holds {emb.dims}-wide vectors but this {sd.family} model needs "
                            f"{list(sd.embedding_dims)}: use an embedding trained for the same model family, "
                            "or init from words")
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


def _resolution(sd, config: TrainConfig) -> int:
    res = config.resolution or smp.default_size(sd)
    factor = smp.latent_factor(sd)
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
    if config.preview_sampler not in smp.SAMPLERS:
        raise UserError(f"unknown preview sampler {config.preview_sampler!r}: use {' or '.join(smp.SAMPLERS)}")


# ---------------------------------------------------------------------------- the run


class _Run:
    """One training session: holds the state that the loop, the saves and resume share."""

    def __init__(self, sd, config: TrainConfig, on_step: Callable[[StepInfo], bool | None] | None) -> None:
        self.sd, self.config, self.on_step = sd, config, on_step
        self.out = Path(config.output) if config.output is not None else None
        self.name = file_stem(config.token)
        # Hashing a multi-GB file takes seconds: only when files are written or a resume is checked.
        needs_identity = self.out is not None or config.resume is not None
        self.short_hash = checkpoint_short_hash(sd.source) if needs_identity else None
        self.identity = model_identity(sd, self.short_hash) if needs_identity else None
        self.step = 0
        self.last_loss = float("nan")
        self.log_file = None

    # -- setup --------------------------------------------------------------------------------
    def prepare(self) -> None:
        cfg, sd = self.config, self.sd
        try:
            self.schedule = lr_schedules.make_lr_schedule(cfg.lr, cfg.lr_schedule, cfg.steps, cfg.warmup_steps)
            templates = tpl.load_templates(cfg.template)
        except ValueError as e:
            raise UserError(str(e)) from None
        self.resolution = _resolution(sd, cfg)
        try:
            self.memory_plan = memory.apply(sd, cfg.memory, self.resolution, cfg.batch_size)
        except ValueError as e:
            raise UserError(str(e)) from None
        resume_state = self._read_resume() if cfg.resume is not None else None
        if resume_state is None and self.out is not None and (self.out / STATE_FILE).exists() and not cfg.overwrite:
            raise UserError(f"{self.out} already holds a training run: continue it with --resume {self.out}, "
                            "or pick another --output (or pass --overwrite to start over there)")
        n = cfg.vectors or (resume_state["n_vectors"] if resume_state else None)
        init = initial_vectors(sd, cfg.init, n)
        self.n_vectors = init[0].shape[0]
        self.offset = register_token(sd, cfg.token, self.n_vectors)
        try:
            images = load_images(cfg.images)
            if cfg.template in tpl.BUILTIN and any(im.caption for im in images):
                # captions name what the token should NOT absorb (background, pose, ...): use them
                templates = tpl.with_filewords(templates)
            self.data = TrainingData(images, self.resolution, templates, cfg.token, seed=cfg.seed, crop=cfg.crop,
                                     random_crops=cfg.random_crops, flip=cfg.flip, alpha_mask=cfg.alpha_mask,
                                     repeats=cfg.repeats)
        except ValueError as e:
            raise UserError(str(e)) from None
        self._check_prompt_length(templates, images)
        self.preview_prompt = cfg.preview_prompt or tpl.fill(templates[0], cfg.token)
        if cfg.preview_prompt and cfg.token not in cfg.preview_prompt:
            log.warning("--preview-prompt %r does not contain %s: previews will not show the concept",
                        cfg.preview_prompt, cfg.token)

        self.params = [torch.nn.Parameter(v.to(sd.device, torch.float32)) for v in init]
        beta1, beta2 = cfg.adam_betas
        self.optimizer = torch.optim.AdamW(self.params, lr=self.schedule(0), betas=(beta1, beta2), eps=cfg.adam_eps,
                                           weight_decay=cfg.weight_decay)
        fp16 = sd.dtype == torch.float16
        self.scaler = LossScaler(cfg.loss_scale if cfg.loss_scale is not None else (2.0 ** 16 if fp16 else None))
        if resume_state is not None:
            self._apply_resume(resume_state)
        self.acp = diffusion.alphas_cumprod().to(sd.device, torch.float32)  # once, not per step

    def _check_prompt_length(self, templates: list[str], images) -> None:
        # The text encoder sees 75 tokens; vectors pushed past that are cut off and never trained.
        tokenizer = self.sd.tokenizers[0]
        captions = {im.caption for im in images} or {""}
        longest = max(len(tokenizer.tokenize_words(tpl.fill(t, self.config.token, c)))
                      for t in templates for c in captions)
        if longest > MAX_VECTORS:
            log.warning("the longest training prompt is %d tokens; CLIP reads 75, so the rest (possibly some of "
                        "the %d vectors) is cut off: use fewer --vectors, shorter captions or templates",
                        longest, self.n_vectors)

    def _read_resume(self) -> dict:
        folder = Path(self.config.resume)
        path = folder / STATE_FILE if folder.is_dir() else folder
        if not path.is_file():
            raise UserError(f"--resume {folder}: no {STATE_FILE} there; pass the output folder of an earlier run")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a damaged file, or not ours
            raise UserError(f"cannot read {path} ({e}): the state is damaged; start again or use an earlier copy") from None
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise UserError(f"{path} is not a minti training state")
        if state["token"] != self.config.token:
            raise UserError(f"--resume {folder} trained token {state['token']!r}, not {self.config.token!r}: "
                            f"resume with --token {state['token']} or start a new run with another --output")
        if state["model"] != self.identity:
            theirs, ours = state["model"], self.identity
            diff = [k for k in ours if theirs.get(k) != ours[k]]
            raise UserError(f"--resume {folder} was trained on another model ({', '.join(f'{k} {theirs.get(k)} vs {ours[k]}' for k in diff)}): "
                            "resume with the same --model it started with")
        if self.config.vectors is not None and self.config.vectors != state["n_vectors"]:
            raise UserError(f"--resume {folder} has {state['n_vectors']} vectors, not --vectors {self.config.vectors}")
        return state

    def _apply_resume(self, state: dict) -> None:
        with torch.no_grad():
            for p, v in zip(self.params, state["vectors"]):
                p.copy_(v.to(p.device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        rng = state.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        log.info("resuming %s from step %d", self.config.token, self.step)

    # -- files --------------------------------------------------------------------------------
    def embedding(self) -> Embedding:
        return Embedding(self.config.token, [p.detach().float().cpu() for p in self.params], step=self.step,
                         sd_checkpoint=self.short_hash,
                         sd_checkpoint_name=_checkpoint_name(self.sd.source))

    def write_config(self) -> None:
        cfg = dataclasses.asdict(self.config)
        cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.items()}
        # absolute paths, so that `--resume DIR` works from any working directory
        cfg.update(vectors=self.n_vectors, resolution=self.resolution, images=str(Path(self.config.images).resolve()))
        if Path(cfg["template"]).is_file():
            cfg["template"] = str(Path(cfg["template"]).resolve())
        record = {"config": cfg, "model": str(Path(self.sd.source).resolve()), "dtype": str(self.sd.dtype).removeprefix("torch."),
                  "device": str(self.sd.device), "identity": self.identity, "minti": _version()}
        atomic.write_text(self.out / "config.json", json.dumps(record, indent=2) + "\n")

    def save(self, intermediate: bool = False) -> list[Path]:
        """Embeddings in every format, plus the resumable state; the state last, so a state
        file never points at vectors newer than the embedding files."""
        if self.out is None:
            return []
        emb = self.embedding()
        files = emb.save(self.out)
        if intermediate:
            files += emb.save(self.out / f"{self.name}-{self.step}.safetensors")
        state = {"format": STATE_FORMAT, "token": self.config.token, "n_vectors": self.n_vectors,
                 "model": self.identity, "step": self.step, "vectors": [p.detach().cpu() for p in self.params],
                 "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                 "rng": {"torch": torch.get_rng_state(),
                         **({"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {})}}
        atomic.torch_save(state, self.out / STATE_FILE)
        return files

    def open_log(self) -> None:
        if self.out is None:
            self.log_file = None
            return
        path = self.out / "loss.jsonl"
        kept = []
        if self.step > 0 and path.exists():  # resuming: drop entries past the resumed step
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= self.step:
                        kept.append(line)
                except (ValueError, KeyError):
                    continue
        atomic.write_text(path, "".join(line + "\n" for line in kept))
        self.log_file = open(path, "a", encoding="utf-8")

    def preview(self) -> None:
        if self.out is None or not self.config.preview_every:
            return
        sd, cfg = self.sd, self.config
        shape = tuple(self.data.latents.shape[1:])
        was_offloaded = sd.vae is None
        latents = smp.generate(sd, [self.preview_prompt], extra=self.extra(detach=True), steps=cfg.preview_steps,
                               cfg=cfg.preview_cfg, seeds=[cfg.seed], method=cfg.preview_sampler,
                               height=self.resolution, width=self.resolution, shape=shape)
        if was_offloaded:
            sd.restore_vae(sd.device)  # the decoder comes back only for this
        try:
            with torch.no_grad():
                pixels = sd.decode_latents(latents.to(sd.dtype))
        finally:
            if was_offloaded:
                sd.offload_vae()
        atomic.save_png(smp.to_pil(pixels)[0], self.out / "previews" / f"{self.name}-{self.step:05d}.png")

    # -- the step -----------------------------------------------------------------------------
    def extra(self, detach: bool = False) -> list[torch.Tensor]:
        """The `extra` rows for encode_tokens: zeros for placeholders registered before ours."""
        out = []
        for p in self.params:
            v = p.detach() if detach else p
            if self.offset:
                v = torch.cat([v.new_zeros(self.offset, v.shape[1]), v])
            out.append(v)
        return out

    def loss(self, latents: torch.Tensor, prompts: list[str], weights: torch.Tensor | None, variants,
             noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sd = self.sd
        context, pooled = sd.encode_tokens(sd.tokenize(prompts), self.extra())
        y = None
        if sd.family == "sdxl":
            y = torch.cat([sd.sdxl_vector(pooled[i:i + 1], original_size=self.data.sizes[v.image],
                                          crop=(v.top, v.left), target_size=(self.resolution, self.resolution))
                           for i, v in enumerate(variants)])
        return diffusion.diffusion_loss(sd.unet, latents.to(sd.device), noise, t, context, y,
                                        prediction=sd.prediction, weights=weights, acp=self.acp)

    def train_step(self) -> tuple[float, bool]:
        """One optimizer step over grad_accum micro-batches -> (mean loss, applied)."""
        cfg = self.config
        scale = self.scaler.scale if self.scaler.enabled else 1.0
        losses = []
        for micro in range(cfg.grad_accum):
            first = (self.step * cfg.grad_accum + micro) * cfg.batch_size
            latents, prompts, weights, variants = self.data.batch(first, cfg.batch_size)
            g = generator(cfg.seed, "noise", self.step, micro)
            noise = torch.randn(latents.shape, generator=g)
            t = torch.randint(0, diffusion.NUM_TRAIN_TIMESTEPS, (latents.shape[0],), generator=g)
            loss = self.loss(latents, prompts, weights, variants, noise, t)
            (loss * (scale / cfg.grad_accum)).backward()
            losses.append(loss.detach())
        mean_loss = float(torch.stack(losses).mean())
        finite = math.isfinite(mean_loss) and all(bool(torch.isfinite(p.grad).all()) for p in self.params)
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.update(False)
            if not self.scaler.enabled:
                raise _Diverged(mean_loss)
            return mean_loss, False
        if scale != 1.0:
            for p in self.params:
                p.grad.div_(scale)
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        for group in self.optimizer.param_groups:
            group["lr"] = self.schedule(self.step)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.update(True)
        return mean_loss, True


class _Diverged(Exception):
    def __init__(self, loss: float) -> None:
        self.loss = loss


def _checkpoint_name(source) -> str:
    # A1111 records the model's file name without suffix; a diffusers folder has its folder name.
    source = Path(source)
    return source.stem if source.is_file() else source.name


def _version() -> str:
    import minti

    return minti.__version__


def _freeze(sd) -> None:
    # minti.load returns frozen modules; make sure, since a stray requires_grad would make
    # autograd keep a gradient the size of the whole model.
    for module in [sd.unet, *sd.text_encoders]:
        module.requires_grad_(False).eval()


def train(sd, config: TrainConfig, on_step: Callable[[StepInfo], bool | None] | None = None) -> Embedding:
    """Train `config.token` on `config.images` with the loaded model `sd`; return the embedding.

    With config.output set, writes the run's files there (see the module docstring) and handles
    Ctrl-C/SIGTERM by saving and returning early (the returned step is then < config.steps).
    on_step(StepInfo) runs after every optimizer step; returning False stops like Ctrl-C.
    Raises minti.cli.UserError for bad input and for a loss that turns NaN/inf without fp16 loss
    scaling (after saving the last good embedding).
    """
    _validate(config)
    _freeze(sd)
    vae_was_loaded = sd.vae is not None
    if not vae_was_loaded:
        try:
            sd.restore_vae(sd.device)  # needed once, to cache the latents
        except RuntimeError as e:
            raise UserError(f"training needs the VAE encoder to cache the images' latents ({e}): load the "
                            "model with its VAE") from None
    run = _Run(sd, config, on_step)
    run.prepare()
    with _Stop() as stop:
        try:
            run.data.encode(sd, config.latent_sampling)
        except ValueError as e:
            raise UserError(str(e)) from None
        sd.offload_vae()  # latents are cached: the VAE leaves the training device
        try:
            return _loop(run, stop)
        finally:
            if vae_was_loaded:
                sd.restore_vae(sd.device)


def _loop(run: _Run, stop: _Stop) -> Embedding:
    cfg, sd = run.config, run.sd
    if run.out is not None:
        run.out.mkdir(parents=True, exist_ok=True)
        run.write_config()
        run.open_log()
    resumed_at = run.step
    try:
        if run.step == 0 and not stop.requested:
            run.preview()
        start = time.perf_counter()
        if sd.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(sd.device)
        while run.step < cfg.steps and not stop.requested:
            lr = run.schedule(run.step)
            try:
                loss, applied = run.train_step()
            except _Diverged as e:
                files = run.save()
                where = f"; the embedding from step {run.step} is in {run.out}" if files else ""
                raise UserError(f"the loss or its gradient became non-finite at step {run.step + 1} (loss {e.loss}; "
                                f"diverged){where}. Lower --lr, "
                                "add --max-grad-norm 1, or train in float32") from None
            run.step += 1
            run.last_loss = loss
            elapsed = time.perf_counter() - start
            info = StepInfo(step=run.step, total=cfg.steps, loss=loss, lr=lr, skipped=not applied,
                            loss_scale=run.scaler.scale, seconds=elapsed,
                            steps_per_second=(run.step - resumed_at) / max(elapsed, 1e-9),
                            peak_memory=torch.cuda.max_memory_allocated(sd.device) if sd.device.type == "cuda" else None)
            if run.log_file is not None:
                run.log_file.write(json.dumps({"step": run.step, "loss": loss, "lr": lr, "skipped": not applied,
                                               "loss_scale": run.scaler.scale, "seconds": round(elapsed, 3)}) + "\n")
                run.log_file.flush()
            if cfg.save_every and run.step % cfg.save_every == 0 and run.step < cfg.steps:
                run.save(intermediate=True)
            if cfg.preview_every and run.step % cfg.preview_every == 0 and run.step < cfg.steps:
                run.preview()
            if run.on_step is not None and run.on_step(info) is False:
                stop.requested, stop.signal_name = True, "on_step"
        if run.step >= cfg.steps and run.step > resumed_at:
            run.preview()
        if run.step > 0 or resumed_at > 0:
            run.save()
        elif stop.requested:
            log.warning("stopped before the first step: nothing was saved")
    finally:
        if run.log_file is not None:
            run.log_file.close()
    return run.embedding()
