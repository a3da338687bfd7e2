"""The out-of-the-box demo: `python -m minti train` with no arguments.

It trains the token <demo> on weights/demo-concept/ with the tiny model minti ships
(weights/minti-tiny.safetensors, built by weights/build_tiny.py), then draws the evidence that
textual inversion learned something: a grid of the same prompt and seeds with the init word in
one row and the learned token in the other, scored against the concept images with
minti.demo.concept_score (from pixels, never from the training loss), plus the eps loss on
held-out (timestep, noise) pairs before and after.

The paths are module constants so tests can point them at a model built in a tmp folder.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

import minti.atomic as atomic
from minti.demo import toy_images
from minti.errors import UserError
from minti.training import templates as tpl

# torch, and every module that imports it, is imported inside the functions: the CLI reads this
# module's constants for its --help, which imports in 0.2 s without torch and 2.5 s or more with it

WEIGHTS = Path(__file__).resolve().parents[2] / "weights"  # the repo's weights/, wherever minti is run from
DEMO_MODEL = WEIGHTS / "minti-tiny.safetensors"
DEMO_IMAGES = WEIGHTS / "demo-concept"
BUILD_COMMAND = "python weights/build_tiny.py"

TOKEN = "<demo>"
INIT = toy_images.CONCEPT_CAPTION_INIT  # "shape": the tiny model's captions use it for any shape
RESOLUTION = 64  # the tiny model's only size (minti's sd1 default of 512 would be 64x the work)
OUTPUT = Path("runs") / "demo"
PROMPT = tpl.fill(tpl.OBJECT[0], TOKEN)  # the first training template: what the grid draws, as previews do

# Training. Sized so that the whole demo (loading, training, the grid, the held-out loss) runs
# well inside a 5-minute budget on 2 CPU cores, with room for a slower machine; the measured
# step time and demo time are in bench/RESULTS.md ("Demo"), where they can be re-measured
# without going stale here. 3,200 samples: each of the 5 concept images ~640 times at different
# (timestep, noise); batch 8 rather than 4 because the diffusion loss is noisy across timesteps.
# lr 5e-3 is A1111's (and the trainer's) default; the cosine decay lets the vector settle
# instead of ending on a full-size Adam step, so the grid drawn from the final vector shows
# where training got to, not one lucky or unlucky last step. How far the learned token beats
# the init word over training seeds is measured by bench/demo_margin.py (bench/RESULTS.md).
STEPS = 400
BATCH_SIZE = 8
LR = 5e-3
LR_SCHEDULE = "cosine"

# The grid and the concept score: deterministic DDIM at the guidance the build's report uses.
GRID_SEEDS = 8  # images per row; the concept score compares sets, 8 is what the build reports with
GRID_STEPS = 30  # as the build's report; --preview-steps overrides it
GRID_CFG = 4.0
GRID_FIRST_SEED = 1000
# Held-out (timestep, noise) pairs per concept image; the trainer draws its noise from
# minti.training.data.generator(seed, "noise", step, micro), this seed is a stream it never uses.
HELDOUT_PAIRS = 16
HELDOUT_SEED = 987_654_321

LABEL_HEIGHT = 17  # pixels of text above each grid row
GRID_FILE = "demo-grid.png"
SUMMARY_FILE = "demo-summary.json"


def missing() -> str | None:
    """Why the demo cannot run (one line naming the fix), or None when it can."""
    if not DEMO_MODEL.is_file():
        return (f"the demo model {DEMO_MODEL} is missing (it ships in minti's git repository; a copy without "
                f"weights/ lacks it): check it out again, or rebuild it with `{BUILD_COMMAND}` (about 2 h on "
                "2 CPU cores, see weights/README.md), or pass --model with a Stable Diffusion checkpoint")
    if not DEMO_IMAGES.is_dir():
        return (f"the demo images {DEMO_IMAGES} are missing: `{BUILD_COMMAND}` writes them (rerunning it "
                "after a finished build only redoes the last stages), or pass --images")
    return None


def require() -> None:
    if (why := missing()) is not None:
        raise UserError(why)


def train_defaults(steps: int | None = None) -> dict:
    """TrainConfig values of the demo (CLI flags override each). `steps` overrides STEPS."""
    return {"images": str(DEMO_IMAGES), "token": TOKEN, "init": INIT, "resolution": RESOLUTION,
            "steps": STEPS if steps is None else steps, "batch_size": BATCH_SIZE, "lr": LR,
            "lr_schedule": LR_SCHEDULE, "preview_every": 0,  # the grid below is the preview
            "preview_steps": GRID_STEPS, "preview_guidance": GRID_CFG,
            # the demo is seeded and cheap: running the same command again redoes it
            "overwrite": True, "output": str(OUTPUT)}


def is_demo_model(path: str | Path | None) -> bool:
    return path is not None and Path(path).resolve() == DEMO_MODEL.resolve()


# ----------------------------------------------------------------------------- evidence


@dataclass
class Evidence:
    prompt: str  # with the token; the init row has the init vectors in its place
    init_label: str
    init_score: float
    learned_score: float
    init_components: dict[str, float]
    learned_components: dict[str, float]
    heldout_init: float
    heldout_learned: float
    seeds: list[int]
    steps: int
    cfg: float


def learned_beats_init(ev: Evidence | dict, margin: float = 0.0, min_drop: float = 0.0) -> tuple[bool, str]:
    """The end-to-end claim of the demo: the learned token draws images closer to the concept
    than the init word, by more than `margin` (concept-score units), and its loss on held-out
    (timestep, noise) pairs is lower than the init word's by more than the fraction `min_drop`.
    -> (holds, why)."""
    e = ev if isinstance(ev, dict) else ev.__dict__
    closer = e["learned_score"] + margin < e["init_score"]
    drop = 1.0 - e["heldout_learned"] / e["heldout_init"]
    fits = drop > min_drop
    why = (f"concept score learned {e['learned_score']:.3f} vs init {e['init_score']:.3f} (margin {margin:g}: "
           f"{'ok' if closer else 'NOT closer'}); held-out loss learned {e['heldout_learned']:.5f} vs init "
           f"{e['heldout_init']:.5f}, {100 * drop:.1f}% lower (at least {100 * min_drop:g}%: "
           f"{'dropped' if fits else 'did NOT drop'})")
    return closer and fits, why


def heldout_loss(sd, data, token: str, templates: list[str], extra: list[torch.Tensor],
                 pairs: int = HELDOUT_PAIRS, seed: int = HELDOUT_SEED) -> float:
    """The training objective on fixed (timestep, noise) pairs that training never drew: `pairs`
    per cached concept latent, timesteps evenly spread over the schedule, prompts cycling through
    the templates. Same pairs for any `extra`, so init and learned vectors compare directly."""
    import torch  # here, not at the top: see the imports

    from minti.diffusion import NUM_TRAIN_TIMESTEPS, alphas_cumprod, diffusion_loss

    acp = alphas_cumprod().to(sd.device, torch.float32)
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.stack(data.latents).repeat_interleave(pairs, dim=0)
    n = x0.shape[0]
    t = torch.tensor([int((i % pairs + 0.5) * NUM_TRAIN_TIMESTEPS / pairs) for i in range(n)])
    noise = torch.randn(x0.shape, generator=gen)
    prompts = [tpl.fill(templates[i % len(templates)], token) for i in range(n)]
    total = 0.0
    with torch.no_grad():
        for s in range(0, n, 32):
            sl = slice(s, s + 32)
            x, e, tt = x0[sl].to(sd.device), noise[sl].to(sd.device), t[sl].to(sd.device)
            context, _ = sd.encode_tokens(sd.tokenize(prompts[sl]), extra)
            total += float(diffusion_loss(sd.unet, x, e, tt, context, prediction=sd.prediction, acp=acp,
                                          reduction="sum"))
    return total / noise.numel()


def _grid(rows: list[tuple[str, list]], scale: int = 2):
    """Rows of equal-sized PIL images, each under a one-line label, scaled up (64 px is small)."""
    size, pad, label_h = rows[0][1][0].size[0] * scale, 4, LABEL_HEIGHT
    try:  # Pillow >= 10.1 scales its bundled font; at the old bitmap's size words run together
        font = ImageFont.load_default(size=LABEL_HEIGHT - 3)
    except TypeError:
        font = ImageFont.load_default()
    width = pad + max(len(images) for _, images in rows) * (size + pad)
    out = Image.new("RGB", (width, len(rows) * (label_h + size + pad) + pad), "white")
    draw = ImageDraw.Draw(out)
    y = pad
    for label, images in rows:
        draw.text((pad, y), label, fill="black", font=font)
        y += label_h
        for c, im in enumerate(images):
            out.paste(im.convert("RGB").resize((size, size), Image.NEAREST), (pad + c * (size + pad), y))
        y += size + pad
    return out


def full_precision(sd):
    """The model the embedding is evaluated with: `sd` itself, or, when it was trained on fp8
    weights, the same checkpoint loaded again with every weight in sd.dtype (users draw with the
    unquantised model; the embedding must work there, not only with the weights it saw)."""
    from minti.loading.pipeline import load  # here, not at the top: see the imports

    if getattr(sd, "weights", None) is None:
        return sd
    return load(sd.source, dtype=sd.dtype, device=sd.device, prediction=sd.prediction)


def evidence(sd, config, learned: list[torch.Tensor], out: Path | None) -> Evidence:
    """Sample the grid (init row, learned row), score both against config.images, compute the
    held-out loss of both, and write demo-grid.png and demo-summary.json into `out`. A model
    trained on fp8 weights is evaluated with its full-precision weights (full_precision)."""
    import torch  # here, not at the top: see the imports

    from minti.demo import concept_score
    from minti.sampling import generate, to_pil
    from minti.training.data import TrainingData, load_images
    from minti.training.placeholder import initial_vectors, looks_like_a_path, register_token
    from minti.training.setup import training_resolution
    from minti.training.step import Vectors

    trained_on = getattr(sd, "weights", None) or "dtype"
    sd = full_precision(sd)
    n = learned[0].shape[0]
    init = initial_vectors(sd, config.init, n)
    offset = register_token(sd, config.token, n)  # registered by training; this finds its rows
    templates = tpl.load_templates(config.template)
    prompt = config.preview_prompt or tpl.fill(templates[0], config.token)
    init_label = f"{prompt} ({config.token} = {Path(config.init).name})" if looks_like_a_path(config.init) else \
        prompt.replace(config.token, config.init)
    res = training_resolution(sd, config)
    seeds = list(range(GRID_FIRST_SEED, GRID_FIRST_SEED + GRID_SEEDS))
    # each row's vectors at the token's rows, zeros for placeholders registered before it
    extras = {row: Vectors(config.token, vectors, offset, None, "").extra()
              for row, vectors in (("init", init), ("learned", learned))}
    if sd.vae is None:
        sd.restore_vae(sd.device)
    images, scores = {}, {}
    concept = concept_score.to_arrays(config.images)
    for row, extra in extras.items():
        latents = generate(sd, [prompt] * len(seeds), extra=extra, steps=config.preview_steps,
                           guidance=config.preview_guidance, seeds=seeds, height=res, width=res)
        with torch.no_grad():
            pixels = sd.decode_latents(latents.to(sd.dtype)).float().cpu()
        images[row] = to_pil(pixels)
        scores[row] = concept_score.concept_score(pixels, concept)
    data = TrainingData(load_images(config.images), res, templates, config.token, seed=config.seed)
    data.encode(sd)
    ev = Evidence(prompt=prompt, init_label=init_label, init_score=scores["init"].total,
                  learned_score=scores["learned"].total, init_components=scores["init"].components,
                  learned_components=scores["learned"].components,
                  heldout_init=heldout_loss(sd, data, config.token, templates, extras["init"]),
                  heldout_learned=heldout_loss(sd, data, config.token, templates, extras["learned"]),
                  seeds=seeds, steps=config.preview_steps, cfg=config.preview_guidance)
    if out is not None:
        refs = [Image.fromarray(a.astype("uint8")) for a in concept]
        grid = _grid([(f"concept images ({Path(config.images).name}/)", refs),
                      (f"init: {init_label}   concept score {ev.init_score:.2f}", images["init"]),
                      (f"learned: {prompt}   concept score {ev.learned_score:.2f}", images["learned"])])
        atomic.save_png(grid, out / GRID_FILE)
        summary = dict(ev.__dict__, images=str(config.images), token=config.token, init=config.init,
                       train_steps=config.steps, lr=config.lr, batch_size=config.batch_size,
                       trained_weights=trained_on, evaluated_weights="dtype",
                       note="concept score: lower = closer to the concept images (minti.demo.concept_score)")
        atomic.write_text(out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    return ev
