"""How far the learned demo token beats the init word, over training seeds: the evidence for
tests/test_demo.py's MARGIN.

    python bench/demo_margin.py [--seeds 0 1 2 3 4] [--out runs/demo-margin] [--json] [TRAIN FLAGS...]

Runs the no-argument demo (`python -m minti train`, its real settings: the shipped tiny model,
400 steps, the fixed grid seeds) once per training seed, which changes only the trainer's
(timestep, noise) draws and image order, and prints per seed the concept scores of the init row
and the learned row, their gap (init - learned; > 0 means closer to the concept), and the
held-out losses and their relative drop. The test's two thresholds are derived from the
smallest gap and the smallest drop seen here. CPU, about 75 s a seed on 2 cores. Other flags
go to `minti train` (e.g. `--steps 40` to see what an undertrained token scores).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minti.cli import main as minti_main  # noqa: E402
from minti.demo import demo  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--out", default="runs/demo-margin")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args, train_flags = p.parse_known_args(argv)
    if (why := demo.missing()) is not None:
        print(why, file=sys.stderr)
        return 1
    rows = []
    for seed in args.seeds:
        out = Path(args.out) / f"seed-{seed}"
        t0 = time.perf_counter()
        if minti_main(["train", *train_flags, "--seed", str(seed), "--output", str(out)]) != 0:
            return 1
        s = json.loads((out / demo.SUMMARY_FILE).read_text())
        rows.append({"seed": seed, "init_score": s["init_score"], "learned_score": s["learned_score"],
                     "gap": s["init_score"] - s["learned_score"], "heldout_init": s["heldout_init"],
                     "heldout_learned": s["heldout_learned"], "drop": 1.0 - s["heldout_learned"] / s["heldout_init"],
                     "seconds": round(time.perf_counter() - t0, 1)})
    print(f"\n{'seed':>4} {'init':>7} {'learned':>8} {'gap':>7} {'held-out init':>14} {'learned':>9} {'drop':>6} {'s':>6}")
    for r in rows:
        print(f"{r['seed']:>4} {r['init_score']:7.3f} {r['learned_score']:8.3f} {r['gap']:7.3f} "
              f"{r['heldout_init']:14.5f} {r['heldout_learned']:9.5f} {100 * r['drop']:5.1f}% {r['seconds']:6.1f}")
    gaps, drops = [r["gap"] for r in rows], [r["drop"] for r in rows]
    summary = {"seeds": args.seeds, "min_gap": min(gaps), "mean_gap": statistics.mean(gaps),
               "min_drop": min(drops), "mean_drop": statistics.mean(drops), "runs": rows}
    print(f"gap min {min(gaps):.3f}, mean {summary['mean_gap']:.3f}; held-out drop min {100 * min(drops):.1f}%, "
          f"mean {100 * summary['mean_drop']:.1f}%")
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
