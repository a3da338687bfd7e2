"""`python -m minti train`: textual inversion from the command line.

The training flags are generated from TrainConfig's fields (minti.training.config): name, help
and the default the help names all come from the field. Only the flags that choose and load the
model (--model, --device, --dtype, --prediction) are written here. Every option defaults to None
and resolve() fills the defaults, so that `--resume DIR` takes whatever was not given from the
run's config.json, and the demo (no --model) takes its own values for what was not given.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path

from minti.errors import UserError, missing_path
from minti.training.config import DEVICE, GROUPS, WHAT, TrainConfig, known_fields

DTYPES = ("float16", "bfloat16", "float32")
WEIGHTS = ("dtype", "fp8")  # --weights: "dtype" stores every weight in --dtype (minti.load's weights=None)
WEIGHTS_HELP = ("how the frozen UNet and text-encoder Linear/Conv weights are stored: fp8 keeps them in 8 bits "
                "(a scale per output channel), widened to --dtype one layer at a time; the VAE, norms and "
                "embeddings stay in --dtype (default dtype)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from minti.demo import demo

    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    groups[WHAT].add_argument(
        "--model", help="checkpoint: .safetensors / .ckpt file or diffusers folder (SD 1.x, 2.x, SDXL). Without it: "
        "the "
        f"demo, {demo.TOKEN} (init {demo.INIT!r}) on weights/{demo.DEMO_IMAGES.name}/ with the tiny "
        f"weights/{demo.DEMO_MODEL.name} at {demo.RESOLUTION} px, {demo.STEPS} steps, batch {demo.BATCH_SIZE}, "
        f"lr {demo.LR:g} {demo.LR_SCHEDULE}, into {demo.OUTPUT}, ending with an init-vs-learned grid; flags given "
        "override these")
    groups[WHAT].add_argument("--concepts", metavar="FILE", help="train several concepts in one run: a .toml/.json "
                              "file of [[concept]] tables (token, images; optionally init, vectors, template, lr, "
                              "name), each into <output>/<name>/; the other flags apply to every concept "
                              "(continue with --resume <output>)")
    add_config_flags(groups)
    device = groups[DEVICE]
    device.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    device.add_argument("--dtype", choices=DTYPES, help="model weights' dtype (default float16 on cuda, float32 on "
                        "cpu; SDXL's VAE stays float32 under float16); the embedding is always trained in float32")
    device.add_argument("--prediction", choices=("eps", "v"), help="override the model's prediction type "
                        "(SD 2.x 768 models are v; SD 1.x and SDXL are eps)")
    device.add_argument("--weights", choices=WEIGHTS, help=WEIGHTS_HELP + "; --resume keeps the run's")


def default_help(field: dataclasses.Field) -> str:
    """The default a flag's help names: the field's metadata says it where the field's own
    default does not (None) or differs from the command line's."""
    if field.metadata["default_help"] is not None:
        return field.metadata["default_help"]
    if isinstance(field.default, bool):
        return "on" if field.default else "off"
    if isinstance(field.default, float):
        return f"{field.default:g}"
    return str(field.default)


def add_config_flags(groups: dict) -> None:
    """One flag per TrainConfig field that has a --help group (`groups`: name -> argparse group):
    --flag-name from the field's name, its help from the metadata with "(default X)" appended.
    Every flag defaults to None, so that resolve() can tell a flag that was given from one that
    was not."""
    for field in dataclasses.fields(TrainConfig):
        group = field.metadata["group"]
        if group is None:
            continue
        help_text = f"{field.metadata['help']} (default {default_help(field)})".replace("%", "%%")
        groups[group].add_argument("--" + field.name.replace("_", "-"), default=None, help=help_text,
                                   **field.metadata["argparse"])


# --------------------------------------------------------------------------- resolving


def resolve(args: argparse.Namespace) -> tuple[dict, TrainConfig]:
    """-> (load settings {model, device, dtype, prediction, weights, demo}, TrainConfig)."""
    from minti.demo import demo
    from minti.training.embedding import file_stem
    from minti.training.run_folder import RunFolder

    given = {k: v for k, v in vars(args).items() if v is not None}
    saved: dict = {}
    # No --model and nothing to resume: the demo (the tiny shipped model and its concept), with
    # every flag that was given overriding the demo's value. With --model, normal rules.
    is_demo = args.model is None and args.resume is None
    if is_demo:
        demo.require()
        named_output = "output" in given and "overwrite" not in given
        given = {**demo.train_defaults(), **given, "model": str(demo.DEMO_MODEL)}
        if named_output:  # the demo redoes its own folder freely, never one the user named
            given["overwrite"] = False
    load = {"model": given.get("model"), "device": given.get("device"), "dtype": given.get("dtype"),
            "prediction": given.get("prediction"), "weights": given.get("weights"), "demo": is_demo}
    if args.resume is not None:
        record = RunFolder(args.resume).read_config()
        # where to write and whether to start over are this command's, not the saved run's
        saved = {k: v for k, v in record["config"].items() if k not in ("resume", "overwrite", "output")}
        load["model"] = load["model"] or record.get("model")
        load["dtype"] = load["dtype"] or record.get("dtype")
        load["weights"] = load["weights"] or record.get("weights")  # a run trained on fp8 weights goes on in fp8
        if "prediction" in record.get("identity", {}) and load["prediction"] is None:
            load["prediction"] = record["identity"]["prediction"]
        load["demo"] = demo.is_demo_model(load["model"])  # a resumed demo run ends with the grid too
    if load["model"] is None:
        raise UserError("no model: pass --model with a Stable Diffusion checkpoint (.safetensors/.ckpt file "
                        "or diffusers folder)")
    if "token" not in given and "token" not in saved:
        raise UserError("no token: pass --token with the new word to learn, e.g. --token '<my-cat>'")
    values = {**saved, **known_fields(given)}
    if isinstance(values.get("lr"), str):
        try:
            values["lr"] = float(values["lr"])
        except ValueError:
            pass  # an A1111 schedule string; minti.training.lr_schedules parses it
    values["output"] = given.get("output") or args.resume or str(Path("runs") / file_stem(values["token"]))
    return load, TrainConfig(**values)


def resolve_device(device: str | None) -> str:
    """--device checked against what minti runs on and what this machine has; None: cuda when
    available, else cpu."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        hint = " (did you mean cuda?)" if device.lower() in ("gpu", "nvidia", "cuda0") else ""
        raise UserError(f"--device {device} is not a device{hint}: use cuda, cuda:N or cpu") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise UserError(f"--device {device}: this machine has {count} CUDA device{'s' if count > 1 else ''} "
                            f"(cuda:0{f'..cuda:{count - 1}' if count > 1 else ''})")
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"--device {device}: no Apple GPU (MPS) is available here; use --device cpu")
    elif parsed.type != "cpu":
        raise UserError(f"--device {device} is not supported: minti runs on cuda (NVIDIA GPUs) or cpu")
    return device


def load_model(model: str, device: str | None, dtype: str | None, prediction: str | None,
               weights: str | None = None):
    import torch

    import minti

    device = resolve_device(device)
    dtype = dtype or ("float16" if device.startswith("cuda") else "float32")
    if not Path(model).exists():
        reason = missing_path(model)
        raise UserError(f"--model {model} {reason}" + (": pass a .safetensors/.ckpt file or a diffusers folder"
                                                       if reason == "does not exist" else ""))
    return minti.load(model, dtype=getattr(torch, dtype), device=device, prediction=prediction,
                      weights=None if weights in (None, "dtype") else weights)


def refuse_if_memory_cannot_fit(load: dict, config: TrainConfig) -> None:
    """Plan --memory auto from the checkpoint's shapes (a meta load reads headers only) before the
    weights go onto the GPU, so that a card even --memory low cannot fit is refused with the
    numbers and what would fit, instead of running out of memory later."""
    import torch

    import minti
    from minti.training import memory

    device = resolve_device(load["device"])
    on_cuda = device.startswith("cuda") and torch.cuda.is_available()
    if config.memory != "auto" or (config.vram is None and not on_cuda) or not Path(load["model"]).exists():
        return
    dtype = load["dtype"] or ("float16" if device.startswith("cuda") else "float32")
    weights = None if load.get("weights") in (None, "dtype") else load["weights"]
    meta = minti.load(load["model"], dtype=getattr(torch, dtype), device="meta", prediction=load["prediction"],
                      weights=weights)
    budget = int(config.vram * 2**30) if config.vram is not None else torch.cuda.mem_get_info(torch.device(device))[0]
    memory.choose(meta, config.resolution or meta.default_size, config.batch_size, budget)


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
    from minti.training import distributed
    from minti.training.concepts import joint_run_folders
    from minti.training.run_folder import RunFolder
    from minti.training.trainer import train

    if args.concepts is not None or joint_run_folders(args.resume):
        from minti.cli import train_many

        return train_many.run(args)
    setup_logging()
    world = distributed.launched()  # under torchrun: this process's rank; rank 0 alone reports
    distributed.quiet_unless_writer(world)
    load, config = resolve(args)
    load["device"] = distributed.device_for_rank(load["device"], world)
    # what can be refused without the model is refused before it loads (minutes for SDXL)
    if config.steps < 1:  # in Python, steps=0 returns the starting vectors; here it would save nothing
        raise UserError(f"--steps must be >= 1, got {config.steps}")
    config.validate()
    resolve_device(load["device"])
    RunFolder(config.output).check_start(config)
    if args.model is None and args.resume is None:
        print(f"minti train: no --model: the demo, {config.token} (init {config.init!r}) on {config.images} with "
              f"{load['model']}, {config.steps} steps, into {config.output}; pass --model to train your own",
              file=sys.stderr)
    started = time.perf_counter()
    refuse_if_memory_cannot_fit(load, config)
    try:
        sd = load_model(load["model"], load["device"], load["dtype"], load["prediction"], load["weights"])
    except KeyboardInterrupt:  # before training there is nothing to save
        print("minti train: interrupted while loading the model; nothing saved", file=sys.stderr)
        return 130
    progress = Progress(None if world.writes else open(os.devnull, "w"))
    try:
        emb = train(sd, config, on_step=progress)
    except KeyboardInterrupt:  # before the loop, or a second Ctrl-C: saves are atomic, the last one stands
        progress.close()
        kept = " (the last save there is intact)" if (Path(config.output) / "state.pt").exists() else ""
        print(f"minti train: interrupted; nothing more saved in {config.output}{kept}", file=sys.stderr)
        return 130
    finally:
        progress.close()
    if not world.writes:
        return 0
    out = Path(config.output)
    files = list(RunFolder(out).embedding_files(emb))
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
        try:
            demo_report(sd, config, emb)
        except OSError as e:  # the embedding is saved; the grid and summary are extras
            print(f"minti train: warning: could not write the demo's grid and summary ({e}); the embedding is "
                  f"saved: {files[0]}", file=sys.stderr)
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
