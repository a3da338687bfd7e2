"""`python -m minti train --concepts FILE`: several concepts in one run, and `--resume DIR` of such
a run. Each concept's settings are resolved exactly as `train` resolves one concept's (its table
supplies token, images, init, vectors, template and lr; the command line the rest), into
`<output>/<name>/`; minti.training.trainer.train_many trains them together."""
from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

from minti.errors import UserError
from minti.training import distributed
from minti.training.concepts import SETTINGS, joint_run_folders, read_concepts
from minti.training.config import TrainConfig


def resolve_many(args: argparse.Namespace) -> tuple[dict, list[TrainConfig], Path]:
    """-> (load settings, one TrainConfig per concept, the run's folder)."""
    from minti.cli.train import resolve

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


def run(args: argparse.Namespace) -> int:
    from minti.cli.train import Progress, _duration, load_model, refuse_if_memory_cannot_fit, setup_logging
    from minti.training.trainer import train_many

    setup_logging()
    world = distributed.launched()
    distributed.quiet_unless_writer(world)
    load, configs, root = resolve_many(args)
    load["device"] = distributed.device_for_rank(load["device"], world)
    started = time.perf_counter()
    # one batch holds every concept's samples: the memory check is for all of them
    refuse_if_memory_cannot_fit(load, dataclasses.replace(configs[0], batch_size=sum(c.batch_size for c in configs)))
    try:
        sd = load_model(load["model"], load["device"], load["dtype"], load["prediction"], load["weights"])
    except KeyboardInterrupt:
        print("minti train: interrupted while loading the model; nothing saved", file=sys.stderr)
        return 130
    progress = Progress() if world.writes else None
    try:
        embeddings = train_many(sd, configs, on_step=progress)
    except KeyboardInterrupt:  # a second Ctrl-C: saves are atomic, the last one stands
        print(f"minti train: interrupted; nothing more saved in {root}", file=sys.stderr)
        return 130
    finally:
        if progress is not None:
            progress.close()
    if not world.writes:
        return 0
    elapsed = _duration(time.perf_counter() - started)
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
    return 0
