"""How much budget PLeaS needs to come near the ensemble.

Merges the suite's source pairs (seed pair 0/1) with PLeaS at a ladder of
budgets and with the ensemble, scores each on the validation digits and on
the test digits, and reports per family and scenario the gap to the
ensemble at every budget and the smallest budget whose validation accuracy
is within ``--within`` points of the ensemble's. Writes a markdown report
with the exact command.

    python benchmarks/budget_curve.py --families mobilenetv3,mbnet,vit --out docs/budget-curve.md
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

from benchmarks import common  # noqa: E402
from benchmarks.common import log  # noqa: E402

import fxmerge  # noqa: E402


def run(args) -> dict:
    budgets = [float(b) for b in args.budgets.split(",")]
    out = {}
    for fam, scen, a, b, data in common.suite_pairs(args):
        labels = common.labels_of(scen)
        row = {"ensemble": common.val_test(fxmerge.merge(a, b, data, method="ensemble", labels=labels).model, scen)}
        for budget in budgets:
            m = fxmerge.merge(a, b, data, budget=budget, method="pleas", labels=labels).model
            row[budget] = common.val_test(m, scen)
            log(f"{fam} / {scen} {budget:.1f}x: val {row[budget][0]:.1f} test {row[budget][1]:.1f} "
                f"(ensemble {row['ensemble'][0]:.1f} / {row['ensemble'][1]:.1f})")
        out[(fam, scen)] = row
    return out


def report(args, argv, results: dict, minutes: float) -> list:
    budgets = [float(b) for b in args.budgets.split(",")]
    cmd = "python -m benchmarks.budget_curve " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = ["# PLeaS against the ensemble across budgets", "",
             f"Produced by `{cmd.strip()}` in {minutes:.1f} minutes; {common.environment()}.", "",
             f"Default options, the suite's source pairs (seed pair 0/1), {args.calib} calibration images from the "
             "training split. Each cell: headline accuracy on the **validation** split / on the **test** split, and "
             "in brackets the validation gap to the ensemble (points; negative: under it). Headline: joint accuracy "
             "for disjoint label spaces, mean over the two styles for the domain shift.", "",
             "| family | scenario | ensemble | " + " | ".join(f"{b:.1f}x" for b in budgets)
             + f" | smallest budget within {args.within:g} points (validation) |",
             "|---|---|---|" + "---|" * len(budgets) + "---|"]
    for (fam, scen), row in results.items():
        ev, et = row["ensemble"]
        cells = [f"{row[b][0]:.1f} / {row[b][1]:.1f} ({row[b][0] - ev:+.1f})" for b in budgets]
        near = next((b for b in budgets if row[b][0] >= ev - args.within), None)
        lines.append(f"| {fam} | {scen} | {ev:.1f} / {et:.1f} | " + " | ".join(cells)
                     + f" | {'%.1fx' % near if near is not None else 'none of these'} |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--within", type=float, default=3.0, help="points of the ensemble counted as near it")
    common.add_pair_arguments(p, budgets="1,1.2,1.5,1.8,2")
    return common.run_and_write(p.parse_args(argv), argv, run, report)


if __name__ == "__main__":
    sys.exit(main())
