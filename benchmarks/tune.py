"""Choosing a merge option on the validation split.

Merges the suite's source pairs (seed pair 0/1) with PLeaS at each value of
one option (``--option bn_stats --values sweep,reset,source``, or ridge,
ls_inputs, planner, norm_policy, positions) and each budget, scores every
merged model on the validation digits (carved from the training data; the
sources never saw them) and on the test digits, and picks the value with the
best mean validation score. The test figures are printed beside, never used.
Writes a markdown report with the exact command.

    python benchmarks/tune.py --option bn_stats --values sweep,reset,source --out docs/bn-stats.md
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

from benchmarks import common  # noqa: E402
from benchmarks.common import FAMILIES, log  # noqa: E402

import fxmerge  # noqa: E402

NUMERIC = {"ridge": float, "positions": int}


def run(args) -> dict:
    cast = NUMERIC.get(args.option, str)
    values = [cast(v) for v in args.values.split(",")]
    budgets = [float(b) for b in args.budgets.split(",")]
    fixed = dict(kv.split("=", 1) for kv in args.set.split(",") if kv) if args.set else {}
    fixed = {k: NUMERIC.get(k, str)(v) for k, v in fixed.items()}
    results = {}
    for fam in args.families.split(","):
        for scen in args.scenarios.split(","):
            log(f"{fam} / {scen}")
            a, b = common.source_pair(fam, scen, 0)
            data = common.calibration(scen, args.calib)
            for value in values:
                for budget in budgets:
                    t = time.perf_counter()
                    try:
                        res = fxmerge.merge(a, b, data, budget=budget, method=args.method,
                                            labels=common.labels_of(scen), **{**fixed, args.option: value})
                    except (fxmerge.FxmergeError, RuntimeError) as e:  # a failure is a finding, listed
                        results[(fam, scen, value, budget)] = (float("nan"), float("nan"), str(e).splitlines()[0])
                        log(f"    {args.option}={value} {budget:.1f}x FAILED: {e}")
                        continue
                    val, test = common.val_test(res.model, scen)
                    results[(fam, scen, value, budget)] = (val, test, "")
                    log(f"    {args.option}={value} {budget:.1f}x: val {val:.1f} test {test:.1f} "
                        f"({time.perf_counter() - t:.1f} s)")
    return results


def report(args, argv, results: dict, minutes: float) -> list:
    cast = NUMERIC.get(args.option, str)
    values = [cast(v) for v in args.values.split(",")]
    budgets = [float(b) for b in args.budgets.split(",")]
    rows = sorted({(f, s) for f, s, _, _ in results}, key=lambda r: (FAMILIES.index(r[0]) if r[0] in FAMILIES else 99, r[1]))
    mean_val = {v: np.nanmean([results[(f, s, v, b)][0] for f, s in rows for b in budgets]) for v in values}
    mean_test = {v: np.nanmean([results[(f, s, v, b)][1] for f, s in rows for b in budgets]) for v in values}
    best = max(values, key=lambda v: mean_val[v])
    cmd = "python -m benchmarks.tune " + " ".join(argv if argv is not None else sys.argv[1:])
    fixed = f" with {args.set}" if args.set else ""
    lines = [f"# Choosing `{args.option}` on the validation split", "",
             f"Produced by `{cmd.strip()}` in {minutes:.1f} minutes; {common.environment()}.", "",
             f"Method `{args.method}`{fixed}, the suite's source pairs (seed pair 0/1), {args.calib} calibration "
             "images from the training split. Each cell: headline accuracy on the **validation** split (carved from "
             "the training data, never seen by the sources) / on the **test** split (reported, never used to "
             "choose). Headline: joint accuracy for disjoint label spaces, mean over the two styles for the domain "
             "shift.", "",
             f"**Chosen on validation: `{args.option}={best}`** (mean validation {mean_val[best]:.1f}; test "
             f"{mean_test[best]:.1f}).", "",
             "| value | mean val | mean test |", "|---|---|---|"]
    lines += [f"| {v} | {mean_val[v]:.1f} | {mean_test[v]:.1f} |" for v in values]
    lines += ["", "| family | scenario | " + " | ".join(f"{v} {b:.1f}x" for v in values for b in budgets) + " |",
              "|---|---|" + "---|" * (len(values) * len(budgets))]
    for f, s in rows:
        cells = []
        for v in values:
            for b in budgets:
                val, test, err = results[(f, s, v, b)]
                cells.append(f"failed: {err[:60]}" if err else f"{val:.1f} / {test:.1f}")
        lines.append(f"| {f} | {s} | " + " | ".join(cells) + " |")
    per_row = []
    for f, s in rows:
        win = max(values, key=lambda v: np.nanmean([results[(f, s, v, b)][0] for b in budgets]))
        per_row.append(f"{f}/{s}: {win}")
    lines += ["", "Best value per family and scenario (validation, mean over budgets): " + "; ".join(per_row) + "."]
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--option", required=True, help="the merge option to choose (bn_stats, ridge, ls_inputs, ...)")
    p.add_argument("--values", required=True, help="comma-separated values to compare")
    p.add_argument("--set", default="", help="other options held fixed, as k=v,k=v")
    p.add_argument("--method", default="pleas")
    common.add_pair_arguments(p, budgets="1,1.2,1.5")
    return common.run_and_write(p.parse_args(argv), argv, run, report)


if __name__ == "__main__":
    sys.exit(main())
