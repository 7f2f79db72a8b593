"""Seed spread of the suite's close comparisons.

The suite trains one pair of models per family and scenario; where PLeaS and
ZipIt! or PLeaS and the ensemble are a few points apart, one pair cannot say
which is ahead. This script repeats the suite's two scenarios (same recipes,
same calibration) over several seed pairs (A from seed s, B from seed s+1)
and reports, per family and scenario, the headline metric of PLeaS, ZipIt!
and the ensemble for each pair, their mean and standard deviation, and the
differences that the suite's claims rest on.

Writes docs/seeds.md with the exact command and the library versions.

    python benchmarks/seeds.py [--families resnet18,resnet50,vit] [--seeds 0,2,4]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))

from benchmarks import common  # noqa: E402  (the suite's models, recipes and evaluation)
from benchmarks.common import ROOT  # noqa: E402

import fxmerge  # noqa: E402

BUDGETS = (1.0, 1.2, 1.5)
METHODS = ("pleas", "zipit")


def run(name: str, scenario: str, seed: int, calib: int, log) -> dict:
    a, b = common.source_pair(name, scenario, seed)
    data, labels = common.calibration(scenario, calib), common.labels_of(scenario)
    score = lambda m: common.headline(m, scenario, "test")  # noqa: E731
    out = {("ensemble", 2.0): score(fxmerge.merge(a, b, data, budget=2.0, method="ensemble", labels=labels).model)}
    for method in METHODS:
        for budget in BUDGETS:
            res = fxmerge.merge(a, b, data, budget=budget, method=method, labels=labels)
            out[(method, budget)] = score(res.model)
            log(f"    seed {seed}: {method} {budget:.1f}x {out[(method, budget)]:.1f} "
                f"(cost {res.report['cost_measured']:.2f}x)")
    return out


def _ms(v) -> str:
    return f"{np.mean(v):.1f} ± {np.std(v, ddof=1) if len(v) > 1 else 0.0:.1f}"


def report(results: dict, seeds: list, calib: int, argv, minutes: float) -> list:
    cmd = "python -m benchmarks.seeds " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = ["# Seed spread", "",
             f"Produced by `{cmd.strip()}` in {minutes:.1f} minutes; {common.environment()}.", "",
             f"The suite's scenarios ([benchmarks.md](benchmarks.md)) repeated over {len(seeds)} seed pairs "
             f"(A from seed s, B from seed s+1, s in {', '.join(map(str, seeds))}); {calib} calibration images. "
             "For resnet18 with disjoint labels the suite uses the demo's pair, trained alike but cached apart, so "
             "its s=0 figures differ slightly from the suite's. "
             "Headline metric: joint accuracy (disjoint label spaces) or mean accuracy over the two styles (domain "
             "shift). Columns are seed pairs; the last is mean ± standard deviation over them. "
             "Differences are per pair, then averaged; `min` is the least favourable pair.", ""]
    for fam, scens in results.items():
        lines += [f"## {fam}", ""]
        for scen, per_seed in scens.items():
            lines += [f"### {scen}", "", "| method | budget | " + " | ".join(f"s={s}" for s in seeds) + " | mean ± sd |",
                      "|---|---|" + "---|" * (len(seeds) + 1)]
            keys = [(m, b) for m in METHODS for b in BUDGETS] + [("ensemble", 2.0)]
            for m, b in keys:
                v = [per_seed[s][(m, b)] for s in seeds]
                lines.append(f"| {m} | {b:.1f}x | " + " | ".join(f"{x:.1f}" for x in v) + f" | {_ms(v)} |")
            lines += ["", "| difference | " + " | ".join(f"s={s}" for s in seeds) + " | mean ± sd | min |",
                      "|---|" + "---|" * (len(seeds) + 2)]
            diffs = [(f"pleas − zipit at {b:.1f}x", [per_seed[s][("pleas", b)] - per_seed[s][("zipit", b)] for s in seeds])
                     for b in BUDGETS]
            diffs.append(("ensemble − pleas 1.2x", [per_seed[s][("ensemble", 2.0)] - per_seed[s][("pleas", 1.2)]
                                                    for s in seeds]))
            for label, v in diffs:
                lines.append(f"| {label} | " + " | ".join(f"{x:+.1f}" for x in v) + f" | {np.mean(v):+.1f} ± "
                             f"{np.std(v, ddof=1) if len(v) > 1 else 0.0:.1f} | {min(v):+.1f} |")
            lines.append("")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default="resnet18,resnet50", help="comma-separated suite families")
    p.add_argument("--scenarios", default="disjoint,domain")
    p.add_argument("--seeds", default="0,2,4", help="seed of model A per pair (B uses seed + 1)")
    p.add_argument("--calib", type=int, default=256)
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "seeds.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    seeds = [int(s) for s in args.seeds.split(",")]
    log = lambda s: print(s, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    results: dict = {}
    for fam in args.families.split(","):
        for scen in args.scenarios.split(","):
            log(f"{fam} / {scen}")
            results.setdefault(fam, {})[scen] = {s: run(fam, scen, s, args.calib, log) for s in seeds}
    lines = report(results, seeds, args.calib, argv, (time.perf_counter() - t0) / 60)
    with open(args.out + ".tmp", "w") as f:
        f.write("\n".join(lines))
    os.replace(args.out + ".tmp", args.out)
    log(f"wrote {args.out} ({(time.perf_counter() - t0) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
