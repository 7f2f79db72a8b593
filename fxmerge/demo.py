"""The demo: two models trained from different seeds on different digits,
merged with every method at several budgets.

Model A learns digits 0-4, model B digits 5-9 (each its own 5-way head, from
its own random initialisation). Merging keeps both heads
(``labels="disjoint"``): the merged model outputs 10 logits. Reported per
row: joint accuracy (argmax over all 10 classes on the whole test set), task
accuracy (argmax over each model's own 5 logits on its own classes), cost
(multiply-accumulates relative to one source model), parameters and merge
time. Trained models are cached under ``.cache/fxmerge-demo``.
"""
from __future__ import annotations

import time
from typing import Optional, Sequence

from fxmerge.methods import METHODS
from fxmerge.runtime.data import digits
from fxmerge.training import cached_pair, calibration, evaluate

DEFAULT_BUDGETS = (1.0, 1.2, 1.5, 2.0)


def default_runs(budgets: Sequence[float], methods: Optional[Sequence[str]] = None) -> list:
    """(method, budget) rows: budgeted methods at every budget, the others at
    their only cost."""
    methods = tuple(METHODS) if methods is None else methods
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method '{unknown[0]}': choose from {', '.join(METHODS)}")
    runs = [(m, b) for m in methods if METHODS[m].budgeted for b in budgets]
    return runs + [(m, METHODS[m].fixed_budget) for m in methods if not METHODS[m].budgeted]


def run_demo(arch: str = "resnet", *, budgets: Sequence[float] = DEFAULT_BUDGETS, device="cpu", calib: int = 512,
             data: str = "digits", runs: Optional[list] = None, norm_policy: str = "split", bn_stats: Optional[str] = None,
             log=print, progress: bool = False) -> list:
    from fxmerge.api import merge

    a, b = cached_pair(arch, device=device, log=log)
    test = digits(split="test")
    batches = calibration(data, calib)
    rows = []
    for name, model, which in (("model A (0-4)", a, "a"), ("model B (5-9)", b, "b")):
        r = evaluate(model, test, device=device, which=which)
        rows.append({"method": name, "budget": None, **r, "cost": 1.0,
                     "params": sum(p.numel() for p in model.parameters()), "seconds": None})
    for method, budget in runs or default_runs(budgets):
        t = time.perf_counter()
        res = merge(a, b, batches, budget=budget, method=method, labels="disjoint", device=device,
                    norm_policy=norm_policy, bn_stats=bn_stats, progress=progress)
        seconds = time.perf_counter() - t
        r = evaluate(res.model, test, device=device)
        rows.append({"method": method, "budget": budget, **r, "cost": res.report["cost_measured"],
                     "params": res.report["params_merged"], "seconds": seconds})
        if log:
            log(format_row(rows[-1]))
    return rows


HEADER = f"{'method':<14} {'budget':>6} {'joint':>6} {'task A':>7} {'task B':>7} {'cost':>6} {'params':>8} {'time s':>7}"


def format_row(r: dict) -> str:
    def pct(v):
        return "   -" if v != v else f"{v:5.1f}"

    budget = "-" if r["budget"] is None else f"{r['budget']:.1f}x"
    secs = "-" if r["seconds"] is None else f"{r['seconds']:.1f}"
    return (f"{r['method']:<14} {budget:>6} {pct(r['joint']):>6} {pct(r['task_a']):>7} {pct(r['task_b']):>7} "
            f"{r['cost']:5.2f}x {r['params'] / 1e6:7.2f}M {secs:>7}")


def format_table(rows: list) -> str:
    lines = [HEADER, "-" * len(HEADER)] + [format_row(r) for r in rows]
    return "\n".join(lines)
