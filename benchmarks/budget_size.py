"""Where the budget is counted: at the calibration images' size, or at the
size the merged model will run at.

A budget is multiply-accumulates of the merged model over those of one
source model, counted at ``example_inputs`` (default: the first calibration
batch). Layers after a global pooling cost the same at every input size, the
rest grows with the image's area, so the share of each group in the budget,
and with it the plan, depends on the size the compute is counted at. The
suite's models run at 32x32, where MobileNetV3's head convolution (after
the pooling) is a third of the model; at 224x224 it is about one percent.

This script merges the suite's source pairs (seed pair 0/1) with PLeaS,
counting the budget at the calibration size (the default) and at
``--count-size`` (``example_inputs`` of that size; calibration and
evaluation stay at 32x32), scores both on the validation and test digits,
reports each merge's cost counted at both sizes, and lists the groups whose
separation costs the most at either size. Writes a markdown report with the
exact command.

    python benchmarks/budget_size.py --out docs/budget-size.md
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))

from benchmarks import common  # noqa: E402
from benchmarks.common import log  # noqa: E402

import fxmerge  # noqa: E402
from fxmerge.merging.cost import CostModel  # noqa: E402
from fxmerge.merging.cost import measure_macs  # noqa: E402

CALIB_SIZE = 32  # the suite's digits


def zeros(size: int) -> torch.Tensor:
    return torch.zeros(1, 3, size, size)


def separation_costs(result, source_macs: float) -> dict:
    """Per group (id, kind, width, first member): the cost, x one source
    model, of keeping only that group's features apart (everything else
    merged), counted at the size the merge was analysed at
    (``source_macs``: the source model's there)."""
    pg = result.groups
    cm = CostModel.from_groups(pg, source_macs=source_macs)
    outputs = pg.output_roots
    full = cm.k_full()
    for i, u in enumerate(cm.uids):
        if u in outputs:
            full[i] = 0
    base = cm.cost(full)
    out = {}
    for g in pg.all_groups:
        idx = [cm.uids.index(r.uid) for r in g.roots if r.uid in cm.uids and r.uid not in outputs]
        if not idx:
            continue
        k = full.copy()
        k[idx] = 0
        out[(g.id, g.kind, g.size, g.members[0][0] if g.members else "")] = (cm.cost(k) - base) / cm.source_cost()
    return out


def run(args) -> dict:
    budgets = [float(b) for b in args.budgets.split(",")]
    sizes = (CALIB_SIZE, args.count_size)
    out = {}
    for fam, scen, a, b, data in common.suite_pairs(args):
        labels = common.labels_of(scen)
        source_macs = {s: measure_macs(a, zeros(s)) for s in sizes}
        row = {"ensemble": common.val_test(fxmerge.merge(a, b, data, method="ensemble", labels=labels).model, scen),
               "groups": {}}
        for budget in budgets:
            for counted in sizes:
                r = fxmerge.merge(a, b, data, budget=budget, method="pleas", labels=labels,
                                  example_inputs=zeros(counted))
                cell = row[(budget, counted)] = {
                    "acc": common.val_test(r.model, scen),
                    "cost": {s: measure_macs(r.model, zeros(s)) / source_macs[s] for s in sizes},
                    "widest_apart": _widest_apart(r),
                }
                if counted not in row["groups"]:
                    row["groups"][counted] = separation_costs(r, source_macs[counted])
                log(f"{fam} / {scen} {budget:.1f}x counted at {counted}: val {cell['acc'][0]:.1f} "
                    f"test {cell['acc'][1]:.1f} (ensemble {row['ensemble'][0]:.1f})")
        out[(fam, scen)] = row
    return out


def _widest_apart(result) -> str:
    """How many of the widest group's features stay apart (the plan's widest
    group is the head convolution in the MobileNets)."""
    g = max(result.plan.groups, key=lambda g: (g["size"], g["id"]))
    return f"{g['size'] - g['merged']}/{g['size']}"


def report(args, argv, results: dict, minutes: float) -> list:
    budgets = [float(b) for b in args.budgets.split(",")]
    s, c = CALIB_SIZE, args.count_size
    cmd = "python -m benchmarks.budget_size " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = ["# Where the budget is counted", "",
             f"Produced by `{cmd.strip()}` in {minutes:.1f} minutes; {common.environment()}.", "",
             f"PLeaS with default options on the suite's source pairs (seed pair 0/1), {args.calib} calibration "
             f"images from the training split at {s}x{s}. The budget is multiply-accumulates of the merged model over "
             f"one source model's, counted at `example_inputs` (default: the first calibration batch). Each pair is "
             f"merged twice per budget: counted at {s}x{s} (the default here) and at {c}x{c} "
             f"(`example_inputs=torch.zeros(1, 3, {c}, {c})`; calibration and evaluation stay at {s}x{s}). "
             "Accuracy cells: headline accuracy on the **validation** split / on the **test** split; headline: joint "
             "accuracy for disjoint label spaces, mean over the two styles for the domain shift. Cost cells: the "
             f"emitted model's cost, x one source model, counted at {s}x{s} / at {c}x{c}. `widest apart`: features "
             "of the widest group kept apart (in the MobileNets the head convolution after the global pooling).", "",
             "| family | scenario | ensemble | budget | counted at | accuracy | gap to ensemble (val / test) "
             "| cost | widest apart |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (fam, scen), row in results.items():
        ev, et = row["ensemble"]
        for b in budgets:
            for counted in (s, c):
                cell = row[(b, counted)]
                v, t = cell["acc"]
                lines.append(f"| {fam} | {scen} | {ev:.1f} / {et:.1f} | {b:.1f}x | {counted}x{counted} | {v:.1f} / "
                             f"{t:.1f} | {v - ev:+.1f} / {t - et:+.1f} | {cell['cost'][s]:.2f}x / "
                             f"{cell['cost'][c]:.2f}x | {cell['widest_apart']} |")
    lines += ["", "## The groups that cost the most to keep apart", "",
              "Per family (from its first scenario's analysis): the cost, x one source model, of keeping only that "
              f"group's features apart with every other group merged, counted at {s}x{s} and at {c}x{c}; the "
              f"{args.top} most expensive at either size.", "",
              "| family | group | kind | width | first member | apart at " + f"{s}x{s} | apart at {c}x{c} |",
              "|---|---|---|---|---|---|---|"]
    seen = set()
    for (fam, scen), row in results.items():
        if fam in seen:
            continue
        seen.add(fam)
        small, large = row["groups"][s], row["groups"][c]
        top = sorted(set(sorted(small, key=lambda g: -small[g])[:args.top])
                     | set(sorted(large, key=lambda g: -large[g])[:args.top]), key=lambda g: g[0])
        for g in top:
            gid, kind, width, member = g
            lines.append(f"| {fam} | {gid} | {kind} | {width} | `{member}` | +{small[g]:.3f}x | +{large.get(g, np.nan):.3f}x |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count-size", type=int, default=224, help="the image size the budget is also counted at")
    p.add_argument("--top", type=int, default=3, help="groups listed per family and size")
    common.add_pair_arguments(p, budgets="1.2,1.5")
    p.set_defaults(families="mobilenetv3,mbnet,resnet18")
    return common.run_and_write(p.parse_args(argv), argv, run, report)


if __name__ == "__main__":
    sys.exit(main())
