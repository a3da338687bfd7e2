"""One optimizer step of textual inversion, for one or more concepts sharing each batch.

A `Concept` is what one concept trains with: its settings, images (TrainingData), its `Vectors`
(the only parameters: fp32 rows of its placeholder token, one tensor per text encoder), AdamW,
a `LossScaler` and its run folder. minti.training.trainer's loop runs, per step,

    losses = forward_backward(sd, concepts, acp, world)    # grad_accum micro-batches of every concept
    for c, loss in zip(concepts, losses.tolist()):
        applied = optimizer_step(c, loss, c.lr_at(c.step))  # raises LossDiverged

and bench/step.py times the same two calls. Every random draw of a micro-batch (`draw`: samples,
crop/flip variant, template, timestep, noise) depends on (seed, step, micro) only, so a resumed run
draws exactly what the uninterrupted one would have, and a CPU run is bit-reproducible.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from minti.diffusion import NUM_TRAIN_TIMESTEPS, diffusion_loss
from minti.errors import RunError
from minti.training import distributed
from minti.training.config import TrainConfig
from minti.training.data import TrainingData, generator
from minti.training.embedding import Embedding
from minti.training.norm import NormControl
from minti.training.run_folder import RunFolder

log = logging.getLogger("minti")


class LossScaler:
    """Dynamic loss scaling for fp16 models: gradients flow back through fp16 activations, where
    small values underflow to zero; scale the loss up, and skip any step whose gradients overflow.
    The scale never falls below 1: a step that overflows at scale 1 is not an overflow of the
    scaling but a diverged loss (optimizer_step)."""

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


# ---------------------------------------------------------------------------- the trained vectors


@dataclass
class Vectors:
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


def joint_extra(vectors: list[Vectors], detach: bool = False) -> list[torch.Tensor]:
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


# ---------------------------------------------------------------------------- a concept


class LossDiverged(Exception):
    """A concept's loss or gradient turned non-finite where no loss scale explains it."""

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


class LastGood:
    """The vectors and optimizer state of the last step whose loss and gradient were finite, so that
    a diverged run keeps those, never the update that then produced NaN/inf. Copies of a few
    [n, dim] tensors per step: nothing next to a UNet step."""

    def __init__(self) -> None:
        self.step: int | None = None
        self.vectors: list[torch.Tensor] = []
        self.optimizer: dict = {}
        self._pending: tuple = ()

    def before(self, step: int, vectors: Vectors, optimizer: torch.optim.Optimizer) -> None:
        """The state `step` is about to be updated from; it becomes the good one once its loss is."""
        self._pending = (step, [p.detach().clone() for p in vectors.params], copy.deepcopy(optimizer.state_dict()))

    def finite(self) -> None:
        self.step, self.vectors, self.optimizer = self._pending


@dataclass
class Concept:
    """One concept of a run: its settings, images, vectors, optimizer and run folder. Each keeps
    its own step, so that each draws exactly what a run of it alone would draw."""
    config: TrainConfig
    data: TrainingData
    vectors: Vectors
    optimizer: torch.optim.Optimizer
    scaler: LossScaler
    lr_at: Callable[[int], float]
    folder: RunFolder | None  # where this process writes its files (rank 0 only); None: nothing written
    preview_prompt: str
    norms: NormControl  # --norm / --max-norm, applied after every update
    step: int = 0  # optimizer steps done
    resumed_at: int = 0
    diverged: LossDiverged | None = None  # set when its loss or gradient turned non-finite: it stops alone
    last_good: LastGood = field(default_factory=LastGood)  # what it keeps if it diverges

    @property
    def training(self) -> bool:
        return self.diverged is None and self.step < self.config.steps

    @property
    def previews(self) -> bool:
        return self.folder is not None and self.config.preview_every > 0


def restore(state: dict, vectors: Vectors, optimizer: torch.optim.Optimizer, scaler: LossScaler) -> int:
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


# ---------------------------------------------------------------------------- the step


@dataclass
class Draw:
    """One concept's share of a micro-batch on this rank."""
    latents: torch.Tensor
    prompts: list[str]
    weights: torch.Tensor | None
    variants: list
    noise: torch.Tensor
    t: torch.Tensor
    share: float  # this rank's part of the global batch's loss weight, relative to an equal split


def draw(c: Concept, micro: int, world: distributed.World) -> Draw:
    """Micro-batch `micro` of concept c's current step: its samples, timesteps and noise depend on
    (seed, step, micro) only. Every rank draws the whole global batch (world size x batch size,
    what one process at that batch size draws) and keeps its own slice of it."""
    config = c.config
    size = config.batch_size * world.size
    first = (c.step * config.grad_accum + micro) * size
    latents, prompts, weights, variants = c.data.batch(first, size)
    g = generator(config.seed, "noise", c.step, micro)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (latents.shape[0],), generator=g)
    if world.size == 1:
        return Draw(latents, prompts, weights, variants, noise, t, 1.0)
    mine = slice(world.rank * config.batch_size, (world.rank + 1) * config.batch_size)
    share = 1.0
    if weights is not None:
        # alpha masks normalise the loss by the mask mass of the whole batch: a rank holding more
        # of it weighs more in the average over ranks, exactly as in one process
        share = float(weights[mine].sum() * world.size / weights.sum().clamp(min=1e-8))
        weights = weights[mine]
    return Draw(latents[mine], prompts[mine], weights, variants[mine], noise[mine], t[mine], share)


def micro_batch_loss(sd, concepts: list[Concept], acp: torch.Tensor, micro: int,
                     world: distributed.World) -> torch.Tensor:
    """The losses [len(concepts)] of micro-batch `micro` of each concept's current step. Concepts
    whose latents have the same shape share one text-encoder and UNet pass; each concept's loss
    is the mean over its own samples, so its gradient is the one it gets when trained alone."""
    draws = [draw(c, micro, world) for c in concepts]
    losses: list[torch.Tensor | None] = [None] * len(concepts)
    for shape in dict.fromkeys(tuple(d.latents.shape[1:]) for d in draws):
        members = [i for i, d in enumerate(draws) if tuple(d.latents.shape[1:]) == shape]
        batch = [draws[i] for i in members]
        prompts = [p for d in batch for p in d.prompts]
        extra = joint_extra([concepts[i].vectors for i in members])
        context, pooled = sd.encode_tokens(sd.tokenize(prompts), extra)
        y = None
        if sd.family_facts.size_conditioning:  # each sample's own original size and crop
            variants = [v for d in batch for v in d.variants]
            y = torch.cat([sd.size_condition(pooled[row:row + 1], original_size=v.original_size,
                                             crop=v.crop_top_left, target_size=v.target_size)
                           for row, v in enumerate(variants)])
        weights = [d.weights for d in batch] if any(d.weights is not None for d in batch) else None
        out = diffusion_loss(sd.unet, torch.cat([d.latents for d in batch]).to(sd.device),
                             torch.cat([d.noise for d in batch]), torch.cat([d.t for d in batch]),
                             context, y, prediction=sd.prediction, weights=weights, acp=acp,
                             groups=[d.latents.shape[0] for d in batch])
        for i, d, loss in zip(members, batch, out):
            losses[i] = loss * d.share if d.share != 1.0 else loss
    return torch.stack(losses)


def forward_backward(sd, concepts: list[Concept], acp: torch.Tensor, world: distributed.World) -> torch.Tensor:
    """The gradients of one optimizer step of every concept (grad_accum micro-batches), averaged
    over the ranks -> [len(concepts)] each concept's mean loss of the step. The backward runs
    once per micro-batch on the sum of the concepts' losses, each scaled by its own fp16 loss
    scale, so each concept's gradient is its own loss's."""
    losses: list[list[torch.Tensor]] = [[] for _ in concepts]
    for micro in range(max(c.config.grad_accum for c in concepts)):
        members = [i for i, c in enumerate(concepts) if micro < c.config.grad_accum]
        micro_losses = micro_batch_loss(sd, [concepts[i] for i in members], acp, micro, world)
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


def optimizer_step(c: Concept, mean_loss: float, lr: float) -> bool:
    """Apply concept c's step from the gradients forward_backward left -> whether it was applied;
    the state it updated from becomes c.last_good once its loss and gradient are finite.
    A non-finite loss or gradient skips the step under fp16 loss scaling, halving the scale, and
    raises LossDiverged without it or once the scale is down to 1 (NaN weights, a diverged run: no
    scale explains it, and skipping on would skip forever)."""
    c.last_good.before(c.step, c.vectors, c.optimizer)
    finite = math.isfinite(mean_loss) and all(bool(torch.isfinite(p.grad).all()) for p in c.vectors.params)
    if not finite:
        c.optimizer.zero_grad(set_to_none=True)
        if not c.scaler.enabled or c.scaler.at_floor:
            raise LossDiverged(mean_loss)
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
    c.last_good.finite()
    return True
