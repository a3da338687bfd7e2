"""`python -m minti train`: textual inversion from the command line, one concept or several.

The training flags are generated from TrainConfig's fields (minti.training.config): name, help
and the default the help names all come from the field. Only the flags that choose and load the
model (--model, --device, --dtype, --prediction) are written here. Every option defaults to None
and resolve() fills the defaults, so that `--resume DIR` takes whatever was not given from the
run's config.json, and the demo (no --model) takes its own values for what was not given.

`--concepts FILE` trains several concepts in one run, and `--resume DIR` of such a run continues
them: each concept's settings are resolved exactly as one concept's are (its table supplies token,
images, init, vectors, template and lr; the command line the rest), into `<output>/<name>/`. One
concept is a run of one: the same sequence trains both (minti.training.trainer.train_many), and
only the closing lines differ.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

import torch

import minti
from minti.cli.common import (DTYPES, PREDICTIONS, WEIGHTS, WEIGHTS_HELP, Progress, default_dtype, duration,
                              load_model, resolve_device, setup_logging, stored_weights)
from minti.demo import demo
from minti.errors import UserError
from minti.training import distributed, memory
from minti.training.concepts import SETTINGS, joint_run_folders, read_concepts
from minti.training.config import DEVICE, GROUPS, WHAT, TrainConfig, known_fields
from minti.training.embedding import file_stem
from minti.training.run_folder import RunFolder
from minti.training.trainer import train_many


def add_arguments(parser: argparse.ArgumentParser) -> None:
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
    device.add_argument("--prediction", choices=PREDICTIONS, help="override the model's prediction type "
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


def resolve_many(args: argparse.Namespace) -> tuple[dict, list[TrainConfig], Path]:
    """--concepts FILE or --resume DIR of a run of several: -> (load settings, one TrainConfig per
    concept, the run's folder)."""
    if args.concepts is not None and args.resume is not None:
        raise UserError("pass --concepts FILE to start a run of several concepts or --resume DIR to continue one, "
                        "not both")
    for flag in ("token", "images"):
        if getattr(args, flag) is not None:
            raise UserError(f"--{flag} is set per concept in a run of several: put it in each [[concept]] table of "
                            f"{args.concepts}" if args.concepts is not None else
                            f"--{flag} is set per concept in a run of several: --resume {args.resume} continues "
                            "each with its own")
    namespaces = []
    if args.concepts is not None:
        if args.model is None:
            raise UserError(f"--concepts {args.concepts} needs --model: the checkpoint every concept is trained on")
        root = Path(args.output or Path("runs") / Path(args.concepts).stem)
        for concept in read_concepts(args.concepts):
            ns = copy.copy(args)
            for key in SETTINGS:
                if key in concept.settings:
                    setattr(ns, key, concept.settings[key])
            ns.output = str(root / concept.name)
            namespaces.append(ns)
    else:
        root = Path(args.resume)
        for folder in joint_run_folders(root):
            ns = copy.copy(args)
            ns.resume = str(folder)
            ns.output = str(Path(args.output) / folder.name) if args.output else None
            namespaces.append(ns)
    resolved = [resolve(ns) for ns in namespaces]
    load = resolved[0][0]
    models = {str(Path(lo["model"]).resolve()) for lo, _ in resolved}
    if len(models) > 1:
        raise UserError(f"the concepts in {root} were trained on different models ({', '.join(sorted(models))}): "
                        "resume each concept's folder on its own")
    return load, [config for _, config in resolved], root


def refuse_if_memory_cannot_fit(load: dict, configs: list[TrainConfig]) -> None:
    """Plan --memory auto from the checkpoint's shapes (a meta load reads headers only) before the
    weights go onto the GPU, so that a card even --memory low cannot fit is refused with the
    numbers and what would fit, instead of running out of memory later. One batch holds every
    concept's samples: the plan is for all of them."""
    config = configs[0]
    device = resolve_device(load["device"])
    on_cuda = device.startswith("cuda") and torch.cuda.is_available()
    if config.memory != "auto" or (config.vram is None and not on_cuda) or not Path(load["model"]).exists():
        return
    dtype = load["dtype"] or default_dtype(device)
    meta = minti.load(load["model"], dtype=getattr(torch, dtype), device="meta", prediction=load["prediction"],
                      weights=stored_weights(load.get("weights")))
    budget = int(config.vram * 2**30) if config.vram is not None else torch.cuda.mem_get_info(torch.device(device))[0]
    memory.choose(meta, config.resolution or meta.default_size, sum(c.batch_size for c in configs), budget)


def run(args: argparse.Namespace) -> int:
    several = args.concepts is not None or bool(joint_run_folders(args.resume))
    setup_logging()
    world = distributed.launched()  # under torchrun: this process's rank; rank 0 alone reports
    distributed.quiet_unless_writer(world)
    if several:
        load, configs, root = resolve_many(args)
    else:
        load, config = resolve(args)
        configs, root = [config], config.output
    load["device"] = distributed.device_for_rank(load["device"], world)
    # what can be refused without the model is refused before it loads (minutes for SDXL)
    for config in configs:
        if config.steps < 1:  # in Python, steps=0 returns the starting vectors; here it would save nothing
            raise UserError(f"--steps must be >= 1, got {config.steps}")
        config.validate()
    resolve_device(load["device"])
    for config in configs:
        RunFolder(config.output).check_start(config)
    if args.model is None and args.resume is None:
        announce_demo(load, configs[0])
    started = time.perf_counter()
    refuse_if_memory_cannot_fit(load, configs)
    try:
        sd = load_model(load["model"], load["device"], load["dtype"], load["prediction"], load["weights"])
    except KeyboardInterrupt:  # before training there is nothing to save
        print("minti train: interrupted while loading the model; nothing saved", file=sys.stderr)
        return 130
    progress = Progress()
    try:
        embeddings = train_many(sd, configs, on_step=progress if world.writes else None)
    except KeyboardInterrupt:  # before the loop, or a second Ctrl-C: saves are atomic, the last one stands
        progress.close()
        kept = " (the last save there is intact)" if (Path(root) / "state.pt").exists() else ""
        print(f"minti train: interrupted; nothing more saved in {root}{kept}", file=sys.stderr)
        return 130
    finally:
        progress.close()
    if not world.writes:
        return 0
    if several:
        report_several(configs, embeddings, root, started)
    else:
        report_one(sd, load, configs[0], embeddings[0], progress, started)
    return 0


def announce_demo(load: dict, config: TrainConfig) -> None:
    print(f"minti train: no --model: the demo, {config.token} (init {config.init!r}) on {config.images} with "
          f"{load['model']}, {config.steps} steps, into {config.output}; pass --model to train your own",
          file=sys.stderr)


def report_one(sd, load: dict, config: TrainConfig, emb, progress: Progress, started: float) -> None:
    """The closing lines of a run of one concept: its files, or where it stopped; the demo's grid."""
    out = Path(config.output)
    files = list(RunFolder(out).embedding_files(emb))
    elapsed = duration(time.perf_counter() - started)
    if emb.step < config.steps:
        if emb.step == 0 and not (out / "state.pt").exists():
            print(f"minti train: stopped before the first step; nothing saved", file=sys.stderr)
            return
        print(f"minti train: stopped at step {emb.step}/{config.steps}; saved {files[0]} "
              f"(+ state). Resume with: python -m minti train --resume {out}", file=sys.stderr)
        return
    print(f"minti train: {config.token} trained for {emb.step} steps in {elapsed} (loss {progress.mean_loss():.4f}, "
          f"mean of the last {len(progress.recent)}): {', '.join(str(f) for f in files)}")
    if load["demo"]:
        try:
            demo_report(sd, config, emb)
        except OSError as e:  # the embedding is saved; the grid and summary are extras
            print(f"minti train: warning: could not write the demo's grid and summary ({e}); the embedding is "
                  f"saved: {files[0]}", file=sys.stderr)


def report_several(configs: list[TrainConfig], embeddings: list, root: Path, started: float) -> None:
    """The closing lines of a run of several concepts: each one's file or where it stopped."""
    elapsed = duration(time.perf_counter() - started)
    stopped = False
    for config, emb in zip(configs, embeddings):
        out = Path(config.output)
        if emb.step < config.steps:
            stopped = True
            saved = f"saved {out / f'{emb.name}.safetensors'}" if emb.step > 0 else "nothing saved"
            print(f"minti train: {config.token} stopped at step {emb.step}/{config.steps}; {saved}", file=sys.stderr)
        else:
            print(f"minti train: {config.token} trained for {emb.step} steps: {out / f'{emb.name}.safetensors'}")
    if stopped:
        print(f"minti train: resume all {len(configs)} concepts with: python -m minti train --resume {root}",
              file=sys.stderr)
    else:
        print(f"minti train: {len(configs)} concepts trained together in {elapsed} into {root}")


def demo_report(sd, config: TrainConfig, emb) -> None:
    """After the demo: the init-vs-learned grid, its concept scores and the held-out losses."""
    started = time.perf_counter()
    print(f"minti train: drawing the init-vs-learned grid ({2 * demo.GRID_SEEDS} images, {config.preview_steps} "
          "DDIM steps each)...", file=sys.stderr)
    ev = demo.evidence(sd, config, emb.vectors, Path(config.output))
    out = Path(config.output)
    print(f"minti train: grid {out / demo.GRID_FILE} (top: the concept images; then {ev.init_label!r}; then "
          f"{ev.prompt!r}; {len(ev.seeds)} seeds), summary {out / demo.SUMMARY_FILE} "
          f"({duration(time.perf_counter() - started)})")
    print(f"minti train: concept score vs {config.images} (lower = closer): init {ev.init_score:.3f}, learned "
          f"{ev.learned_score:.3f}; loss on held-out (timestep, noise) pairs: init {ev.heldout_init:.5f}, "
          f"learned {ev.heldout_learned:.5f}")
    print(f"minti train: try it: python -m minti sample --embedding {out / f'{emb.name}.safetensors'} "
          f"--prompt '{ev.prompt}'")
