"""`python -m minti train`: textual inversion from the command line.

Every option defaults to None here and the run code fills the defaults, so that (1) `--resume
DIR` can take whatever was not given from the run's config.json, and (2) later defaults (a
shipped demo model and images) slot in without touching the parser.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import fields
from pathlib import Path

from minti.errors import UserError

DTYPES = ("float16", "bfloat16", "float32")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from minti.demo import demo

    what = parser.add_argument_group("what to train")
    what.add_argument("--model", help="checkpoint: .safetensors / .ckpt file or diffusers folder (SD 1.x, 2.x). "
                      f"Without it: the demo, {demo.TOKEN} (init {demo.INIT!r}) on weights/{demo.DEMO_IMAGES.name}/ "
                      f"with the tiny weights/{demo.DEMO_MODEL.name} at {demo.RESOLUTION} px, {demo.STEPS} steps, "
                      f"batch {demo.BATCH_SIZE}, lr {demo.LR:g} {demo.LR_SCHEDULE}, into {demo.OUTPUT}, ending with an "
                      "init-vs-learned grid; flags given override these")
    what.add_argument("--images", help="folder with 3-20 images of the concept (jpg/png/webp/bmp; "
                      "optional <image>.txt captions for [filewords])")
    what.add_argument("--token", help="the new word, e.g. '<my-cat>'; files are named after it without <> "
                      "(A1111/ComfyUI trigger on the file name)")
    what.add_argument("--init", help="word(s) whose vectors start the embedding, e.g. 'cat' (default '*'), "
                      "or an embedding file to continue from")
    what.add_argument("--vectors", type=int, help="vectors per token, 1-75 (default 1; more = more capacity, "
                      "more prompt space)")
    how = parser.add_argument_group("training")
    how.add_argument("--steps", type=int, help="total optimizer steps, also when resuming (default 3000)")
    how.add_argument("--resolution", type=int, help="training size in pixels (default 512; 768 for SD 2.x v models)")
    how.add_argument("--batch-size", type=int, help="images per micro-batch (default 1)")
    how.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    how.add_argument("--lr", help="learning rate (default 5e-3), or A1111's schedule '0.005:100, 1e-3:1000, 1e-5'")
    how.add_argument("--lr-schedule", help="constant (default), cosine or linear decay to 0, or A1111's syntax")
    how.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default 0)")
    how.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0)")
    how.add_argument("--max-grad-norm", type=float, help="clip the gradient norm (default: no clipping)")
    how.add_argument("--seed", type=int, help="makes batches, crops, timesteps and noise reproducible (default 0)")
    data = parser.add_argument_group("data")
    data.add_argument("--template", help="object (default), style, or a text file of prompts with [name] "
                      "(and optionally [filewords])")
    data.add_argument("--repeats", type=int, help="each image this many times per epoch (default 1)")
    data.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                      help="also train on mirrored images (default off: text and logos must not mirror)")
    data.add_argument("--crop", choices=("center", "random"), help="square crop after resizing the short side "
                      "(default center)")
    data.add_argument("--random-crops", type=int, help="crop variants cached per image with --crop random (default 4)")
    data.add_argument("--alpha-mask", action=argparse.BooleanOptionalAction, default=None,
                      help="PNG transparency weights the loss (default: composite on white only)")
    data.add_argument("--latent-sampling", choices=("mean", "sample"),
                      help="cache the VAE posterior mean (default) or one sample per image variant")
    out = parser.add_argument_group("output")
    out.add_argument("--output", help="run folder (default runs/<token without <>>)")
    out.add_argument("--save-every", type=int, help="save <name>-<step>.safetensors and the state every N steps "
                     "(default 500; 0 = only at the end)")
    out.add_argument("--preview-every", type=int, help="draw a preview image every N steps (default 500; 0 = never)")
    out.add_argument("--preview-prompt", help="prompt for previews (default: the first template line)")
    out.add_argument("--preview-steps", type=int, help="sampling steps per preview (default 20)")
    out.add_argument("--resume", metavar="DIR", help="continue the run in DIR (settings not given are taken from "
                     "its config.json)")
    out.add_argument("--overwrite", action="store_true", default=None,
                     help="start a new run in an --output folder that already holds one")
    dev = parser.add_argument_group("device")
    dev.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    dev.add_argument("--dtype", choices=DTYPES, help="model weights' dtype (default float16 on cuda, float32 on "
                     "cpu); the embedding is always trained in float32")
    dev.add_argument("--memory", choices=("auto", "low", "fast"),
                     help="low: recompute each UNet block in backward (least VRAM, ~30%% slower); fast: store "
                     "activations; auto (default): fast when it fits in free GPU memory, else low")
    dev.add_argument("--prediction", choices=("eps", "v"), help="override the model's prediction type "
                     "(SD 2.x 768 models are v)")


# --------------------------------------------------------------------------- resolving


def _train_fields() -> set[str]:
    from minti.training.trainer import TrainConfig

    return {f.name for f in fields(TrainConfig)}


def resolve(args: argparse.Namespace) -> tuple[dict, object]:
    """-> (load settings {model, device, dtype, prediction}, TrainConfig)."""
    from minti.demo import demo
    from minti.training.embedding import file_stem
    from minti.training.trainer import TrainConfig

    given = {k: v for k, v in vars(args).items() if v is not None}
    saved: dict = {}
    # No --model and nothing to resume: the demo (the tiny shipped model and its concept), with
    # every flag that was given overriding the demo's value. With --model, normal rules.
    is_demo = args.model is None and args.resume is None
    if is_demo:
        demo.require()
        given = {**demo.train_defaults(), **given, "model": str(demo.DEMO_MODEL)}
    load = {"model": given.get("model"), "device": given.get("device"), "dtype": given.get("dtype"),
            "prediction": given.get("prediction"), "demo": is_demo}
    if args.resume is not None:
        record_path = Path(args.resume) / "config.json"
        if not record_path.is_file():
            raise UserError(f"--resume {args.resume}: no config.json there; pass the output folder of an earlier "
                            "minti train run")
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
            saved = dict(record["config"])
        except (ValueError, KeyError) as e:
            raise UserError(f"{record_path} is damaged ({e}): pass --model, --images and --token again") from None
        load["model"] = load["model"] or record.get("model")
        load["dtype"] = load["dtype"] or record.get("dtype")
        saved.pop("resume", None)
        saved.pop("overwrite", None)
        saved.pop("output", None)
        if "prediction" in record.get("identity", {}) and load["prediction"] is None:
            load["prediction"] = record["identity"]["prediction"]
        load["demo"] = demo.is_demo_model(load["model"])  # a resumed demo run ends with the grid too
    if load["model"] is None:
        raise UserError("no model: pass --model with a Stable Diffusion checkpoint (.safetensors/.ckpt file "
                        "or diffusers folder)")
    if "token" not in given and "token" not in saved:
        raise UserError("no token: pass --token with the new word to learn, e.g. --token '<my-cat>'")
    names = _train_fields()
    values = {k: v for k, v in saved.items() if k in names}
    if "adam_betas" in values:
        values["adam_betas"] = tuple(values["adam_betas"])
    values.update({k: v for k, v in given.items() if k in names})
    if "lr" in values and isinstance(values["lr"], str):
        try:
            values["lr"] = float(values["lr"])
        except ValueError:
            pass  # an A1111 schedule string; minti.training.schedules parses it
    token = values["token"]
    values["output"] = given.get("output") or args.resume or str(Path("runs") / file_stem(token))
    return load, TrainConfig(**values)


def load_model(model: str, device: str | None, dtype: str | None, prediction: str | None):
    import torch

    import minti

    if not torch.cuda.is_available() and device is not None and device.startswith("cuda"):
        raise UserError("--device cuda: no CUDA GPU is available here; use --device cpu")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("float16" if device.startswith("cuda") else "float32")
    if not Path(model).exists():
        raise UserError(f"--model {model} does not exist: pass a .safetensors/.ckpt file or a diffusers folder")
    return minti.load(model, dtype=getattr(torch, dtype), device=device, prediction=prediction)


# --------------------------------------------------------------------------- progress


class Progress:
    """One carriage-return line on a terminal; a line every ~5% when stderr is a file/pipe."""

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.tty = getattr(stream, "isatty", lambda: False)()
        self.recent: list[float] = []
        self.skipped = 0
        self.open_line = False  # a carriage-return line is on screen without its newline

    def __call__(self, info) -> None:
        import math

        if math.isfinite(info.loss):
            self.recent = (self.recent + [info.loss])[-50:]
        self.skipped += info.skipped
        loss = sum(self.recent) / len(self.recent) if self.recent else float("nan")
        line = (f"step {info.step}/{info.total}  loss {loss:.4f}  lr {info.lr:.2e}  "
                f"{info.steps_per_second:.2f} it/s")
        if info.peak_memory is not None:
            line += f"  peak {info.peak_memory / 2**30:.2f} GiB"
        if info.loss_scale is not None:
            line += f"  scale {info.loss_scale:.0f}" + (f" ({self.skipped} skipped)" if self.skipped else "")
        if self.tty:
            self.stream.write("\r" + line.ljust(100)[:160])
            self.open_line = True
        else:
            every = max(1, info.total // 20)
            if info.step % every == 0 or info.step >= info.total:
                self.stream.write(line + "\n")
        self.stream.flush()

    def mean_loss(self) -> float:
        return sum(self.recent) / len(self.recent) if self.recent else float("nan")

    def close(self) -> None:
        if self.open_line:
            self.stream.write("\n")
            self.stream.flush()
            self.open_line = False


class _StderrHandler(logging.Handler):
    """Writes to whatever sys.stderr is at the time (not the one bound when the CLI first ran)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


def setup_logging() -> None:
    logger = logging.getLogger("minti")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("minti: %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO)


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def run(args: argparse.Namespace) -> int:
    from minti.training.trainer import train

    setup_logging()
    load, config = resolve(args)
    if args.model is None and args.resume is None:
        print(f"minti train: no --model: the demo, {config.token} (init {config.init!r}) on {config.images} with "
              f"{load['model']}, {config.steps} steps, into {config.output}; pass --model to train your own",
              file=sys.stderr)
    started = time.perf_counter()
    try:
        sd = load_model(load["model"], load["device"], load["dtype"], load["prediction"])
    except KeyboardInterrupt:  # before training there is nothing to save
        print("minti train: interrupted while loading the model; nothing saved", file=sys.stderr)
        return 130
    if sd.family == "sdxl":
        logging.getLogger("minti").warning("SDXL training is experimental in this version (two text encoders, "
                                           "saved as clip_l/clip_g)")
    progress = Progress()
    try:
        emb = train(sd, config, on_step=progress)
    except KeyboardInterrupt:  # before the loop, or a second Ctrl-C: saves are atomic, the last one stands
        progress.close()
        kept = " (the last save there is intact)" if (Path(config.output) / "state.pt").exists() else ""
        print(f"minti train: interrupted; nothing more saved in {config.output}{kept}", file=sys.stderr)
        return 130
    finally:
        progress.close()
    out = Path(config.output)
    files = [out / f"{emb.name}.safetensors"] + ([] if emb.is_sdxl else [out / f"{emb.name}.pt",
                                                                         out / "learned_embeds.safetensors"])
    elapsed = _duration(time.perf_counter() - started)
    if emb.step < config.steps:
        if emb.step == 0 and not (out / "state.pt").exists():
            print(f"minti train: stopped before the first step; nothing saved", file=sys.stderr)
            return 0
        print(f"minti train: stopped at step {emb.step}/{config.steps}; saved {files[0]} "
              f"(+ state). Resume with: python -m minti train --resume {out}", file=sys.stderr)
        return 0
    print(f"minti train: {config.token} trained for {emb.step} steps in {elapsed} (loss {progress.mean_loss():.4f}, "
          f"mean of the last {len(progress.recent)}): {', '.join(str(f) for f in files)}")
    if load["demo"]:
        demo_report(sd, config, emb)
    return 0


def demo_report(sd, config, emb) -> None:
    """After the demo: the init-vs-learned grid, its concept scores and the held-out losses."""
    from minti.demo import demo

    started = time.perf_counter()
    print(f"minti train: drawing the init-vs-learned grid ({2 * demo.GRID_SEEDS} images, {config.preview_steps} "
          "DDIM steps each)...", file=sys.stderr)
    ev = demo.evidence(sd, config, emb.vectors, Path(config.output))
    out = Path(config.output)
    print(f"minti train: grid {out / demo.GRID_FILE} (top: the concept images; then {ev.init_label!r}; then "
          f"{ev.prompt!r}; {len(ev.seeds)} seeds), summary {out / demo.SUMMARY_FILE} "
          f"({_duration(time.perf_counter() - started)})")
    print(f"minti train: concept score vs {config.images} (lower = closer): init {ev.init_score:.3f}, learned "
          f"{ev.learned_score:.3f}; loss on held-out (timestep, noise) pairs: init {ev.heldout_init:.5f}, "
          f"learned {ev.heldout_learned:.5f}")
    print(f"minti train: try it: python -m minti sample --embedding {out / f'{emb.name}.safetensors'} "
          f"--prompt '{ev.prompt}'")
