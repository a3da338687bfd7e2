"""`python -m minti sample`: draw images with one or more embeddings (ours or downloaded).

The trigger word of an embedding is, as in A1111/ComfyUI, its file name (`my-cat.pt` ->
"my-cat"), or the key of a diffusers learned_embeds file; `<my-cat>` in the prompt also works
for a file named my-cat. `--token` overrides it for a single embedding.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from minti.errors import UserError


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
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default 30)")
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
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None,
                        help="default float16 on cuda, float32 on cpu")
    parser.add_argument("--prediction", choices=("eps", "v"), default=None, help="override the prediction type")
    from minti.cli.train import WEIGHTS, WEIGHTS_HELP

    parser.add_argument("--weights", choices=WEIGHTS, default=None, help=WEIGHTS_HELP)


def register_embeddings(sd, paths: list[str], prompt: str, token: str | None = None) -> list:
    """Load each embedding, check it fits the model, register its token; -> the `extra` tensors
    (one per text encoder: every embedding's rows, in registration order)."""
    import torch

    from minti.training.embedding import load_embedding, mismatch

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
    return [torch.cat(r) for r in rows]


def _next_index(out: Path) -> int:
    numbers = [int(p.name[:5]) for p in out.glob("*.png") if p.name[:5].isdigit()]
    return max(numbers, default=-1) + 1


def run(args: argparse.Namespace) -> int:
    from minti import atomic
    from minti import sampling as smp
    from minti.cli.train import load_model, setup_logging

    setup_logging()
    model, native_size, guidance = args.model, None, 7.5
    if model is None:  # the tiny model minti ships (see minti.demo.demo), at its own size and guidance
        from minti.demo import demo

        if not demo.DEMO_MODEL.is_file():
            raise UserError(demo.missing())
        model, native_size, guidance = str(demo.DEMO_MODEL), demo.RESOLUTION, demo.GRID_CFG
        if not args.prompt:
            raise UserError(f"no prompt: pass --prompt, e.g. --prompt 'a large red star on a striped green "
                            f"background', or after the demo --embedding {demo.OUTPUT / 'demo.safetensors'} "
                            f"--prompt '{demo.PROMPT}'")
        print(f"minti sample: no --model: using the demo model {model}", file=sys.stderr)
    if not args.prompt:
        raise UserError("no prompt: pass --prompt, e.g. --prompt 'a photo of <my-cat> on the beach'")
    guidance = guidance if args.cfg is None else args.cfg
    n = 4 if args.n is None else args.n
    steps = 30 if args.steps is None else args.steps
    batch = args.batch_size or 1
    if n < 1 or batch < 1 or steps < 1:
        raise UserError("--n, --batch-size and --steps must be >= 1")
    for path in args.embedding or []:
        if not Path(path).exists():
            raise UserError(f"--embedding {path} does not exist: check the path")
    sd = load_model(model, args.device, args.dtype, args.prediction, args.weights)
    extra = register_embeddings(sd, args.embedding or [], args.prompt, args.token)
    size = native_size or sd.default_size
    height, width = args.height or size, args.width or size
    try:
        shape = smp.latent_shape(sd, height, width)
    except ValueError as e:
        raise UserError(f"--width/--height: {e}") from None
    sd.offload_vae()  # sampling needs only the UNet and text encoders; smp.decode brings it back
    out = Path(args.out or Path("runs") / "samples")
    out.mkdir(parents=True, exist_ok=True)
    seed = 0 if args.seed is None else args.seed
    first = _next_index(out)
    written = []
    for start in range(0, n, batch):
        seeds = list(range(seed + start, seed + min(n, start + batch)))
        latents = smp.generate(sd, [args.prompt] * len(seeds), extra=extra, negative=args.negative or "",
                               steps=steps, guidance=guidance, seeds=seeds,
                               height=height, width=width, method=args.sampler or "ddim", shape=shape)
        pixels = smp.decode(sd, latents)
        for s, image in zip(seeds, smp.to_pil(pixels)):
            path = out / f"{first + len(written):05d}-seed{s}.png"
            atomic.save_png(image, path)
            written.append(path)
            print(path, file=sys.stderr)
    print(f"minti sample: {len(written)} image{'s' if len(written) != 1 else ''} in {out}")
    return 0
