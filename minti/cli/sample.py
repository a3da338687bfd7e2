"""`python -m minti sample`: draw images with one or more embeddings (ours or downloaded).

The trigger word of an embedding is, as in A1111/ComfyUI, its file name (`my-cat.pt` ->
"my-cat"), or the key of a diffusers learned_embeds file; `<my-cat>` in the prompt also works
for a file named my-cat. `--token` overrides it for a single embedding.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

import torch

import minti.atomic as atomic
import minti.sampling as smp
from minti.cli.common import DTYPES, PREDICTIONS, WEIGHTS, WEIGHTS_HELP, load_model, resolve_device, setup_logging
from minti.demo import demo
from minti.errors import RunError, UserError, missing_path
from minti.training.embedding import load_embedding, mismatch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint: .safetensors / .ckpt file or diffusers folder (default: the "
                        "tiny demo model weights/minti-tiny.safetensors, 64x64, guidance 4)")
    parser.add_argument("--embedding", action="append", default=None, metavar="FILE",
                        help="embedding file (.safetensors / .pt / .bin, any of A1111, diffusers, SDXL formats); "
                        "repeat for several")
    parser.add_argument("--token", help="trigger word for the (single) embedding (default: its file name, or the "
                        "token stored in a diffusers file)")
    parser.add_argument("--prompt", help="what to draw, e.g. 'a photo of <my-cat> on the beach'")
    parser.add_argument("--negative", default=None, help="negative prompt (default empty)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps, 1-999 (default 30)")
    parser.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (default 7.5; 4 "
                        "with the demo model)")
    parser.add_argument("--sampler", choices=("ddim", "euler"), default=None, help="deterministic sampler "
                        "(default ddim)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the first image; image i uses seed+i "
                        "(default 0)")
    parser.add_argument("--n", type=int, default=None, help="number of images (default 4)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per forward pass (default 1)")
    parser.add_argument("--width", type=int, default=None, help="default: 512, 768 for SD 2.x v, 1024 for SDXL, "
                        "64 for the demo model")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--out", default=None, help="output folder (default runs/samples); files are never "
                        "overwritten")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default float16 on cuda, float32 on cpu")
    parser.add_argument("--prediction", choices=PREDICTIONS, default=None, help="override the prediction type")
    parser.add_argument("--weights", choices=WEIGHTS, default=None, help=WEIGHTS_HELP)


def register_embeddings(sd, paths: list[str], prompt: str, token: str | None = None) -> list:
    """Load each embedding, check it fits the model, register its token; -> the `extra` tensors
    (one per text encoder: every embedding's rows, in registration order)."""
    if token is not None and len(paths) != 1:
        raise UserError("--token names the trigger word of a single --embedding; with several, rename the files")
    rows: list[list] = [[] for _ in sd.embedding_dims]
    for path in paths:
        try:
            emb = load_embedding(path, token=token)
        except ValueError as e:
            raise UserError(str(e)) from None
        if emb.dims != list(sd.embedding_dims):
            raise UserError(f"--embedding {mismatch(path, emb, sd)}")
        word = emb.token
        if token is None and not word.startswith("<") and f"<{word}>" in prompt:
            word = f"<{word}>"  # our files are <name>.pt for the token <name>
        if word not in prompt:
            logging.getLogger("minti").warning("the prompt does not contain %r: %s has no effect", word, path)
        try:
            sd.add_placeholder(word, emb.n_vectors)
        except ValueError as e:
            raise UserError(f"{path}: {e}") from None
        for i, v in enumerate(emb.vectors):
            rows[i].append(v)
    if not paths:
        return None
    extra = [torch.cat(r) for r in rows]
    _refuse_non_finite_text(sd, prompt, extra, paths)
    return extra


def _refuse_non_finite_text(sd, prompt: str, extra: list, paths: list[str]) -> None:
    """Finite vectors can still be too large for the text encoder (a diverged run's): the images
    would come out black. One forward pass of the prompt tells, and one without the embeddings
    whether it is them or the model."""
    def finite(extra_rows) -> bool:
        with torch.no_grad():
            context, pooled = sd.encode_text([prompt], extra_rows)
        return bool(torch.isfinite(context).all()) and (pooled is None or bool(torch.isfinite(pooled).all()))

    if finite([v.to(sd.device, sd.dtype) for v in extra]):
        return
    if not finite([torch.zeros_like(v, device=sd.device, dtype=sd.dtype) for v in extra]):
        raise UserError(f"--model {sd.source}: its text encoder's output is NaN/inf whatever the embedding (NaN "
                        "weights?): use another checkpoint")
    largest = max(float(v.abs().max()) for v in extra)
    raise UserError(f"--embedding {', '.join(paths)}: the text encoder's output is NaN/inf with "
                    f"{'this embedding' if len(paths) == 1 else 'these embeddings'} (values up to {largest:.3g}; "
                    "a diverged training run?): use an earlier save")


def _next_index(out: Path) -> int:
    numbers = [int(p.name[:5]) for p in out.glob("*.png") if p.name[:5].isdigit()]
    return max(numbers, default=-1) + 1


MAX_SIZE = 4096  # as training's --resolution: anything larger is a typo, not an image size


def run(args: argparse.Namespace) -> int:
    setup_logging()
    model, native_size, guidance = args.model, None, 7.5
    if model is None:  # the tiny model minti ships (see minti.demo.demo), at its own size and guidance
        if not demo.DEMO_MODEL.is_file():
            raise UserError(demo.missing())
        model, native_size, guidance = str(demo.DEMO_MODEL), demo.RESOLUTION, demo.GRID_CFG
        if not args.prompt:
            raise UserError(f"no prompt: pass --prompt, e.g. --prompt 'a large red star on a striped green "
                            f"background', or after the demo --embedding {demo.OUTPUT / 'demo.safetensors'} "
                            f"--prompt '{demo.PROMPT}'")
    if not args.prompt:
        raise UserError("no prompt: pass --prompt, e.g. --prompt 'a photo of <my-cat> on the beach'")
    guidance = guidance if args.cfg is None else args.cfg
    n = 4 if args.n is None else args.n
    steps = 30 if args.steps is None else args.steps
    batch = args.batch_size or 1
    if n < 1 or batch < 1 or steps < 1:
        raise UserError("--n, --batch-size and --steps must be >= 1")
    if not math.isfinite(guidance):
        raise UserError(f"--cfg {args.cfg} is not a number: pass the guidance scale, e.g. --cfg 7.5")
    if steps > smp.MAX_STEPS:
        raise UserError(f"--steps {steps} is more than the {smp.MAX_STEPS} a sampler can take (20-50 are usual)")
    for name, value in (("--width", args.width), ("--height", args.height)):
        if value is not None and not 1 <= value <= MAX_SIZE:
            raise UserError(f"{name} {value} is outside 1-{MAX_SIZE}: pass the image size in pixels")
    for path in args.embedding or []:  # read before the model loads: a bad file fails fast
        if not Path(path).exists():
            reason = missing_path(path)
            raise UserError(f"--embedding {path} {reason}" + (": check the path" if reason == "does not exist" else ""))
        try:
            load_embedding(path)
        except ValueError as e:
            raise UserError(f"--embedding {e}" if str(e).startswith(str(path)) else str(e)) from None
    out = Path(args.out or Path("runs") / "samples")
    if (problem := atomic.folder_problem(out)) is not None:
        raise UserError(f"--out {out} {problem}")
    resolve_device(args.device)
    if args.model is None:
        print(f"minti sample: no --model: using the demo model {model}", file=sys.stderr)
    sd = load_model(model, args.device, args.dtype, args.prediction, args.weights)
    extra = register_embeddings(sd, args.embedding or [], args.prompt, args.token)
    size = native_size or sd.default_size
    height, width = args.height or size, args.width or size
    try:
        shape = smp.latent_shape(sd, height, width)
    except ValueError as e:
        raise UserError(f"--width/--height: {e}") from None
    sd.offload_vae()  # sampling needs only the UNet and text encoders; smp.decode brings it back
    out.mkdir(parents=True, exist_ok=True)
    seed = 0 if args.seed is None else args.seed
    first = _next_index(out)
    written = []
    for start in range(0, n, batch):
        seeds = list(range(seed + start, seed + min(n, start + batch)))
        latents = smp.generate(sd, [args.prompt] * len(seeds), extra=extra, negative=args.negative or "",
                               steps=steps, guidance=guidance, seeds=seeds,
                               height=height, width=width, method=args.sampler or "ddim", shape=shape)
        pixels = smp.decode(sd, latents) if bool(torch.isfinite(latents).all()) else latents
        if not bool(torch.isfinite(pixels).all()):  # they would be saved as black squares
            raise RunError(f"the images of seeds {seeds[0]}-{seeds[-1]} came out NaN/inf: the model gives non-finite "
                           f"values (NaN weights?) or the settings overflow (try --dtype float32); "
                           f"{len(written)} image{'s' if len(written) != 1 else ''} written before")
        for s, image in zip(seeds, smp.to_pil(pixels)):
            path = out / f"{first + len(written):05d}-seed{s}.png"
            try:
                atomic.save_png(image, path)
            except OSError as e:
                raise RunError(f"cannot write {path} ({e.reason if isinstance(e, atomic.WriteError) else e.strerror or e}); "
                               f"{len(written)} image{'s' if len(written) != 1 else ''} written before") from None
            written.append(path)
            print(path, file=sys.stderr)
    print(f"minti sample: {len(written)} image{'s' if len(written) != 1 else ''} in {out}")
    return 0
