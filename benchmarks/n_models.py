"""Merging N models: PLeaS and the N-model baselines on the digits split
into N tasks and N domains, N = 2, 3, 4, per model family.

Scenarios (sources trained from seeds 0..N-1 on the training split):

* ``tasks``: the ten digits split into N tasks (``TASKS[N]``), one model
  per task, every model's classifier kept (``labels="disjoint"``); every
  head has the largest task's width (merged models share one architecture),
  a smaller task's spare logits trained as never right; headline: joint
  accuracy (argmax over all the models' logits, each model's logits standing
  for its own digits, a spare logit for none).
* ``domains``: every model learns all ten digits, model ``k`` on style
  ``DOMAINS[N][k]`` (clean, inverted, edges, noisy); one shared head;
  headline: mean accuracy over the N styles.

Every merge calibrates on training images of all tasks or styles; each row
gives the validation split's headline (where choices are made) and the
test split's (the tables' figure, seen by no choice). The cost of a merge
is also given as a multiple of running the N sources over its calibration
data once.

    python -m benchmarks.n_models [--families resnet18,vit,mbnet] [--n 2,3,4] --out docs/n-models.md
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

from benchmarks import common
from benchmarks.common import log

import fxmerge
from fxmerge.runtime.data import digit_task, digits, styled

TASKS = {2: ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9)),
         3: ((0, 1, 2), (3, 4, 5), (6, 7, 8, 9)),
         4: ((0, 1), (2, 3, 4), (5, 6), (7, 8, 9))}
DOMAINS = {2: ("clean", "edges"), 3: ("clean", "inverted", "edges"), 4: ("clean", "inverted", "edges", "noisy")}
SCENARIOS = ("tasks", "domains")
FAMILIES = ("resnet18", "vit", "mbnet")


def sources(family: str, scenario: str, n: int) -> list:
    """The N source models of one scenario (cached by ``common.cached``)."""
    cfg = common.train_config(family)
    tr = digits(split="train")
    if scenario == "tasks":
        return [common.cached(family, "task" + "".join(map(str, t)), padded(t, n), digit_task(tr, t), k, cfg)
                for k, t in enumerate(TASKS[n])]
    classes = tuple(range(10))
    return [common.cached(family, f"all-{s}", classes, styled(tr, s), k, cfg) for k, s in enumerate(DOMAINS[n])]


def padded(task: tuple, n: int) -> tuple:
    """A task's logits: its digits, then spare ones (-1) up to the largest task's width."""
    width = max(len(t) for t in TASKS[n])
    return tuple(task) + (-1,) * (width - len(task))


def calibration(scenario: str, n: int, images: int) -> list:
    """Training images of every task, or of every style in turn."""
    tr = digits(split="train").subset(images, seed=0)
    if scenario == "domains":
        styles = DOMAINS[n]
        x = torch.cat([styled(tr, styles[i % n]).x[i:i + 1] for i in range(len(tr.y))])
        tr = type(tr)(x, tr.y)
    return tr.batches(64, with_targets=False)


@torch.no_grad()
def headline(model, scenario: str, n: int, split: str) -> float:
    """Joint accuracy over the N tasks, or mean accuracy over the N styles."""
    data = digits(split=split)
    model.eval()
    if scenario == "domains":
        return float(np.mean([common.accuracy(model, styled(data, s)) for s in DOMAINS[n]]))
    logits = torch.cat([model(x) for x, _ in data.batches(256)])
    order = torch.tensor([d for t in TASKS[n] for d in padded(t, n)])  # logit column -> digit (-1: none)
    return 100 * float((order[logits.argmax(1)] == data.y).float().mean())


@torch.no_grad()
def source_headline(model, k: int, scenario: str, n: int, split: str) -> float:
    """One source alone: its own task's digits as the joint prediction, or its
    mean accuracy over all styles."""
    if scenario == "domains":
        return headline(model, scenario, n, split)
    data = digits(split=split)
    logits = torch.cat([model(x) for x, _ in data.batches(256)])
    task = torch.tensor(padded(TASKS[n][k], n))
    return 100 * float((task[logits.argmax(1)] == data.y).float().mean())


def runs(n: int, quick: bool) -> list:
    """``(row label, method, budget, options)`` per row; for more than two
    models PLeaS also aligned to A's order only (the shared order's variants,
    compared on the validation split)."""
    budgets = sorted({1.0, 1.5, 2.0, float(n)}) if not quick else [1.0, 2.0]
    rows = [(m, m, b, {}) for m in ("pleas", "perm") for b in budgets if b < n]
    if n > 2:
        rows += [("pleas (reference)", "pleas", b, {"universe": "reference"}) for b in (1.0, 1.5)]
    rows += [("zipit", "zipit", b, {}) for b in budgets if b < n]
    rows += [(m, m, 1.0, {}) for m in ("cca", "rebasin", "regmean", "avg")]
    rows += [("ensemble", "ensemble", float(n), {})]
    return rows


@torch.no_grad()
def forward_seconds(models: list, data: list) -> float:
    """Seconds to run every source over the calibration data once."""
    t = time.perf_counter()
    for m in models:
        for x in data:
            m(x)
    return time.perf_counter() - t


def run_one(family: str, scenario: str, n: int, args) -> list:
    models = sources(family, scenario, n)
    data = calibration(scenario, n, args.calib)
    labels = "disjoint" if scenario == "tasks" else "shared"
    base = forward_seconds(models, data)
    rows = []
    for k, m in enumerate(models):
        rows.append({"method": f"source {k}", "budget": None, "cost": 1.0,
                     "val": source_headline(m, k, scenario, n, "val"),
                     "test": source_headline(m, k, scenario, n, "test"), "seconds": None, "relative": None})
    for label, method, budget, extra in runs(n, args.quick):
        t = time.perf_counter()
        try:
            r = fxmerge.merge(models, data, budget=budget, method=method, labels=labels, **extra)
        except Exception as e:  # noqa: BLE001 - the report lists it
            log(f"    FAILED {label} {budget}: {type(e).__name__}: {e}")
            rows.append({"method": label, "budget": budget, "failed": f"{type(e).__name__}: {e}"})
            continue
        sec = time.perf_counter() - t
        rows.append({"method": label, "budget": budget, "cost": r.report["cost_measured"],
                     "val": headline(r.model, scenario, n, "val"), "test": headline(r.model, scenario, n, "test"),
                     "seconds": sec, "relative": sec / base if base else None,
                     "rounds": r.report.get("universe", {}).get("rounds")})
        row = rows[-1]
        log(f"    {label:17s} {budget:.1f}x  cost {row['cost']:.3f}  val {row['val']:.1f}  test {row['test']:.1f}  "
            f"{sec:.1f}s ({row['relative']:.0f}x the sources' pass)")
    return rows


def table(rows: list) -> list:
    out = ["| method | budget | cost | val | test | merge s | x sources' pass |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "failed" in r:
            out.append(f"| {r['method']} | {r['budget']:.1f}x | failed: {r['failed']} | | | | |")
            continue
        b = "-" if r["budget"] is None else f"{r['budget']:.1f}x"
        s = "-" if r["seconds"] is None else f"{r['seconds']:.1f}"
        rel = "-" if r["relative"] is None else f"{r['relative']:.0f}"
        out.append(f"| {r['method']} | {b} | {r['cost']:.2f}x | {r['val']:.1f} | {r['test']:.1f} | {s} | {rel} |")
    return out


def best(rows: list, method: str, budget: float) -> float:
    vals = [r["test"] for r in rows if r["method"] == method and r.get("budget") == budget and "failed" not in r]
    return vals[0] if vals else float("nan")


def claims(results: dict) -> list:
    """The figures the N-model merge is judged by, per family and scenario at N = 3."""
    out = ["| family | scenario | PLeaS 1.0x | best of ZipIt!, CCA Merge, MergeMany (1.0x) | margin | PLeaS 2.0x | "
           "ensemble (3x) | gap |",
           "|---|---|---|---|---|---|---|---|"]
    for (fam, scen, n), rows in results.items():
        if n != 3:
            continue
        p1, p2, ens = best(rows, "pleas", 1.0), best(rows, "pleas", 2.0), best(rows, "ensemble", 3.0)
        base = max((best(rows, m, 1.0) for m in ("zipit", "cca", "rebasin")), default=float("nan"))
        out.append(f"| {fam} | {scen} | {p1:.1f} | {base:.1f} | {p1 - base:+.1f} | {p2:.1f} | {ens:.1f} | "
                   f"{p2 - ens:+.1f} |")
    return out


def universe_choice(results: dict) -> list:
    """The shared order's two variants on the validation split: PLeaS at
    1.0x and 1.5x, per family, scenario and N > 2."""
    out = ["| family | scenario | N | budget | mean (val) | reference (val) |", "|---|---|---|---|---|---|"]
    diffs = []
    for (fam, scen, n), rows in results.items():
        if n < 3:
            continue
        for b in (1.0, 1.5):
            mean = [r["val"] for r in rows if r["method"] == "pleas" and r.get("budget") == b and "failed" not in r]
            ref = [r["val"] for r in rows if r["method"] == "pleas (reference)" and r.get("budget") == b
                   and "failed" not in r]
            if mean and ref:
                out.append(f"| {fam} | {scen} | {n} | {b:.1f}x | {mean[0]:.1f} | {ref[0]:.1f} |")
                diffs.append(mean[0] - ref[0])
    if diffs:
        out += ["", f"Mean over these rows, `mean` minus `reference`: {np.mean(diffs):+.2f} points on the validation "
                f"split (`mean` ahead in {sum(d > 0 for d in diffs)} of {len(diffs)} rows)."]
    return out


def plot(results: dict, out_dir: str) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for fam in sorted({k[0] for k in results}):
        keys = [k for k in results if k[0] == fam]
        scens = sorted({k[1] for k in keys})
        fig, axes = plt.subplots(1, len(scens), figsize=(6 * len(scens), 4), squeeze=False)
        for ax, scen in zip(axes[0], scens):
            for n in sorted({k[2] for k in keys if k[1] == scen}):
                rows = [r for r in results[(fam, scen, n)] if r.get("budget") and "failed" not in r]
                for method, marker in (("pleas", "o-"), ("perm", "s--"), ("zipit", "^:")):
                    pts = sorted((r["cost"], r["test"]) for r in rows if r["method"] == method)
                    if pts:
                        ax.plot(*zip(*pts), marker, label=f"{method} N={n}")
                for r in rows:
                    if r["method"] not in ("pleas", "perm", "zipit", "pleas (reference)"):
                        ax.scatter(r["cost"], r["test"], marker="x")
                        ax.annotate(f"{r['method']} N={n}", (r["cost"], r["test"]), fontsize=6)
            ax.set_title(f"{fam}, {scen}")
            ax.set_xlabel("measured cost (x one source)")
            ax.set_ylabel("test accuracy (%)")
            ax.legend(fontsize=6)
        path = os.path.join(out_dir, f"n-models-{fam}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)
        files.append(os.path.basename(path))
    return files


def report(args, argv, results, minutes) -> list:
    lines = ["# Merging N models", "",
             f"Produced by `python -m benchmarks.n_models {' '.join(argv)}` in {minutes:.1f} "
             f"minutes; {common.environment()}.", "",
             "Digits split into N tasks (each model keeps its classifier; joint accuracy over all digits) or "
             "learned in N styles (one shared head; mean accuracy over the styles); sources trained from seeds "
             f"0..N-1; {args.calib} calibration images of every task or style. `val` is the validation split "
             "(where choices are made), `test` the test split. `cost` is measured (multiply-accumulates, x one "
             "source). The merge's time is also given as a multiple of running the N sources over the "
             "calibration data once. More than two models are matched into one shared order "
             "(`fxmerge.merging.universe`); `rebasin` is Git Re-Basin's MergeMany there, `zipit` ZipIt! N-way "
             "(partial zipping above 1x), `cca` CCA Merge (docs/algorithm.md).", "",
             "## At N = 3", ""]
    lines += claims(results) + ["", "## The shared order, on the validation split", "",
                                "`mean` (the default) re-aligns every model to the mean of all until nothing moves; "
                                "`reference` keeps model A's order (`universe=`).", ""]
    lines += universe_choice(results) + [""]
    for fam in sorted({k[0] for k in results}):
        lines += [f"## {fam}", ""]
        for (f, scen, n), rows in results.items():
            if f != fam:
                continue
            lines += [f"### {scen}, N = {n}", ""] + table(rows) + [""]
    for name in plot(results, os.path.dirname(os.path.abspath(args.out))):
        lines += [f"![accuracy against cost]({name})", ""]
    return lines


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--n", default="2,3,4")
    p.add_argument("--calib", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    def run(args) -> dict:
        results = {}
        for fam in args.families.split(","):
            for scen in args.scenarios.split(","):
                for n in (int(v) for v in args.n.split(",")):
                    log(f"{fam} {scen} N={n}")
                    results[(fam, scen, n)] = run_one(fam, scen, n, args)
        return results

    return common.run_and_write(args, argv, run, report)


if __name__ == "__main__":
    raise SystemExit(main())
