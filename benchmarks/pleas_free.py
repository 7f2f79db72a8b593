"""Where PLeaS-free loses accuracy: the BatchNorm statistics.

PLeaS-free calibrates matching and least squares on the procedural `generic`
images instead of task data. With the default BatchNorm reset those images
also set every running mean and variance, although each source model's own
statistics, measured on its task data, are at hand. This script merges the
suite's models (same recipes, cached) with PLeaS on task data and on
`generic` images, each with the reset (`reset_bn=True`) and without it
(`reset_bn=False`: the widened statistics of the sources, A-only and B-only
channels from their model and merged channels the average of both), and
writes docs/pleas-free.md.

    python benchmarks/pleas_free.py [--families resnet18,resnet50,resnetv2,mobilenetv3]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import suite  # noqa: E402  (the suite's models, recipes and evaluation)
from seeds import headline  # noqa: E402
from suite import ROOT  # noqa: E402

import fxmerge  # noqa: E402
from fxmerge.data import digits  # noqa: E402

BUDGETS = (1.0, 1.2)
VARIANTS = (("digits", True), ("digits", False), ("generic", True), ("generic", False))


def run(name: str, scenario: str, calib: int, log) -> dict:
    a, b = suite.source_pair(name, scenario, 0, False, log)
    tr = digits(split="train")
    # the task data to calibrate on (the generic source ignores it)
    task, labels = (tr, "disjoint") if scenario == "disjoint" else (suite.mixed_styles(tr), "shared")
    score = headline(scenario)
    out = {}
    for source, reset in VARIANTS:
        data = suite.calibration(source, calib, task)
        for budget in BUDGETS:
            res = fxmerge.merge(a, b, data, budget=budget, method="pleas", labels=labels, reset_bn=reset)
            out[(source, reset, budget)] = score(res.model)
            log(f"    {source} reset_bn={reset} {budget:.1f}x {out[(source, reset, budget)]:.1f}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default="resnet18,resnet50,resnetv2,mobilenetv3",
                   help="comma-separated suite families (with BatchNorm)")
    p.add_argument("--scenarios", default="disjoint,domain")
    p.add_argument("--calib", type=int, default=256)
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "pleas-free.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    log = lambda s: print(s, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    rows = []
    for fam in args.families.split(","):
        for scen in args.scenarios.split(","):
            log(f"{fam} / {scen}")
            rows.append((fam, scen, run(fam, scen, args.calib, log)))

    cmd = "python benchmarks/pleas_free.py " + " ".join(argv if argv is not None else sys.argv[1:])
    head = " | ".join(f"{src} {'reset' if reset else 'source stats'} {b:.1f}x" for src, reset in VARIANTS for b in BUDGETS)
    lines = ["# PLeaS-free and the BatchNorm statistics", "",
             f"Produced by `{cmd.strip()}` in {(time.perf_counter() - t0) / 60:.1f} minutes on {platform.machine()} "
             f"({os.cpu_count()} CPU threads); {suite.environment()}.",
             "",
             f"Models trained with the suite's recipes (seed pair 0/1; for resnet18 with disjoint labels the suite "
             "itself uses the demo's pair, trained alike but cached apart, so its figures differ slightly) merged "
             f"with PLeaS, {args.calib} calibration images of task data "
             "(`digits`) or of the procedural `generic` source, each with the BatchNorm reset on those images "
             "(`reset`, the default) or keeping the sources' own statistics laid out by the permutation "
             "(`source stats`, `reset_bn=False`). Headline metric as in the suite: joint accuracy for disjoint "
             "label spaces, mean over the two styles for the domain shift.", "",
             f"| family | scenario | {head} |", "|---|---|" + "---|" * (len(VARIANTS) * len(BUDGETS))]
    for fam, scen, out in rows:
        lines.append(f"| {fam} | {scen} | " + " | ".join(f"{out[(s, r, b)]:.1f}" for s, r in VARIANTS for b in BUDGETS)
                     + " |")
    gaps = {(r, b): [out[("digits", True, b)] - out[("generic", r, b)] for _, _, out in rows] for r in (True, False)
            for b in BUDGETS}
    lines += ["", "Loss of PLeaS-free against PLeaS with task data and the reset, mean over the rows (min, max):", ""]
    for (reset, b), v in gaps.items():
        lines.append(f"- generic, {'reset' if reset else 'source stats'}, {b:.1f}x: {np.mean(v):.1f} points "
                     f"({min(v):.1f}, {max(v):.1f})")
    with open(args.out + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(args.out + ".tmp", args.out)
    log(f"wrote {args.out} ({(time.perf_counter() - t0) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
