"""The benchmark suite: every method and budget, per model family, on
scikit-learn's handwritten digits and domain-shifted copies of them.

Scenarios, data splits, families and training recipes are in
``benchmarks/common.py``: sources are trained on the training split, every
merge calibrates on training images, and the tables report the test split
(no choice of fxmerge's defaults has seen it: those were made on the
validation split, docs/algorithm.md). Per family and scenario: the sources,
PLeaS, permutation alone, ZipIt! (heads aligned as units; on the ViT also
without), Git Re-Basin, RegMean, averaging and the ensemble, and PLeaS-free
on procedural ``generic`` images (the harsh setting; docs/pleas-free.md has
the paper's). Models are cached under .cache/fxmerge-bench.

Writes docs/benchmarks.md (tables, the claims checked, the command, the
versions) and an accuracy-versus-cost plot per family.

    python benchmarks/suite.py [--quick] [--families resnet18,resnet50,resnetv2,mobilenetv3,mbnet,vit]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))

from benchmarks import common  # noqa: E402
from benchmarks.common import FAMILIES, ROOT, STYLE_A, STYLE_B, log  # noqa: E402

import fxmerge  # noqa: E402
from fxmerge.runtime.data import digits  # noqa: E402
from fxmerge.training import evaluate  # noqa: E402

BUDGETS = (1.0, 1.2, 1.5, 2.0)


# ----------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def penultimate(model: nn.Module, split, batch: int = 256) -> np.ndarray:
    """Inputs of the classifier (the last linear or 1x1-convolution layer, as
    in timm's conv heads; a widened layer counts as one, not as its parts)."""
    from fxmerge.runtime.layers import PartialConv, PartialLinear

    widened = (PartialLinear, PartialConv)
    inside: set = set()
    layers = []
    for name, m in model.named_modules():
        if any(name.startswith(w + ".") for w in inside):
            continue
        if isinstance(m, widened):
            inside.add(name)
        if isinstance(m, widened + (nn.Linear, nn.Conv2d)):
            layers.append(m)
    last = layers[-1]
    feats = []
    hook = last.register_forward_hook(lambda m, inp, out: feats.append(inp[0].flatten(1).cpu()))
    try:
        for x, _ in split.batches(batch):
            model(x)
    finally:
        hook.remove()
    return torch.cat(feats).numpy()


def linear_probe(model, train_split, test_split) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    f_train, f_test = penultimate(model, train_split), penultimate(model, test_split)
    scaler = StandardScaler().fit(f_train)
    clf = LogisticRegression(max_iter=2000, C=0.5).fit(scaler.transform(f_train), train_split.y.numpy())
    return 100 * float((clf.predict(scaler.transform(f_test)) == test_split.y.numpy()).mean())


# ----------------------------------------------------------------------------
# runs


def method_runs(name: str, quick: bool) -> list:
    """(row label, method, budget, calibration source, extra options). At
    2.0x nothing is merged: PLeaS (the sources' BatchNorm statistics)
    computes the ensemble, so the ensemble row stands for it there; perm and
    zipit, which reset the statistics, are not run at 2.0x."""
    budgets = (1.0, 1.5) if quick else BUDGETS[:-1]
    runs = [(m, m, b, "digits", {}) for m in ("pleas", "perm", "zipit") for b in budgets]
    if name == "vit":  # ZipIt! as its paper: heads averaged index by index
        runs += [("zipit-avg-heads", "zipit", b, "digits", {"zip_heads": "average"}) for b in budgets]
    runs += [(m, m, 1.0, "digits", {}) for m in ("rebasin", "regmean", "avg")]
    runs += [("ensemble", "ensemble", 2.0, "digits", {})]
    runs += [("pleas-free", "pleas", b, "generic", {}) for b in budgets[:2]]
    return runs


FAILURES: list = []  # (family/scenario, method, budget, error): reported, never hidden
CURRENT = [""]


def attempt(merge, method, budget):
    """One merge; a failure is logged and listed in the report instead of
    ending the whole suite."""
    try:
        return merge()
    except Exception as e:  # noqa: BLE001 - the report lists it
        FAILURES.append((CURRENT[0], method, budget, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
        log(f"    FAILED {method} {budget}x: {FAILURES[-1][-1]}")
        return None


def run(name: str, scenario: str, args) -> list:
    """Every row of one family and scenario, scored on the test split."""
    tr, te = digits(split="train"), digits(split="test")
    a, b = common.source_pair(name, scenario, 0, args.quick)
    rows = []
    for label, m, which in (("model A", a, "a"), ("model B", b, "b")):
        if scenario == "disjoint":
            r = {**evaluate(m, te, which=which), "probe": linear_probe(m, tr, te)}
        else:
            r = common.scores(m, scenario, "test")
        rows.append({"method": label, "budget": None, "calib": "-", **r, "cost": 1.0,
                     "params": sum(p.numel() for p in m.parameters()), "seconds": None})
    for label, method, budget, source, extra in method_runs(name, args.quick):
        data = common.calibration(scenario, args.calib, source)
        t = time.perf_counter()
        res = attempt(lambda: fxmerge.merge(a, b, data, budget=budget, method=method,
                                            labels=common.labels_of(scenario), **extra), label, budget)
        if res is None:
            continue
        sec = time.perf_counter() - t
        r = common.scores(res.model, scenario, "test")
        if scenario == "disjoint":
            r["probe"] = linear_probe(res.model, tr, te)
        rows.append({"method": label, "budget": budget, "calib": source, **r, "cost": res.report["cost_measured"],
                     "params": res.report["params_merged"], "seconds": sec})
        log("    " + (fmt_disjoint if scenario == "disjoint" else fmt_domain)(rows[-1]))
    return rows


# ----------------------------------------------------------------------------
# formatting


def _b(r):
    return "-" if r["budget"] is None else f"{r['budget']:.1f}x"


def _s(r):
    return "-" if r["seconds"] is None else f"{r['seconds']:.1f}"


def _p(v):
    return "-" if v != v else f"{v:.1f}"


def fmt_disjoint(r) -> str:
    return (f"| {r['method']} | {_b(r)} | {_p(r['joint'])} | {_p(r['task_a'])} | {_p(r['task_b'])} | {_p(r['probe'])} | "
            f"{r['cost']:.2f}x | {r['params'] / 1e6:.2f}M | {_s(r)} |")


def fmt_domain(r) -> str:
    return (f"| {r['method']} | {_b(r)} | {_p(r[STYLE_A])} | {_p(r[STYLE_B])} | {_p(r['mean'])} | "
            f"{r['cost']:.2f}x | {r['params'] / 1e6:.2f}M | {_s(r)} |")


HEAD_DISJOINT = ("| method | budget | joint | task A | task B | linear probe | cost | params | merge s |\n"
                 "|---|---|---|---|---|---|---|---|---|")
HEAD_DOMAIN = (f"| method | budget | {STYLE_A} | {STYLE_B} | mean | cost | params | merge s |\n"
               "|---|---|---|---|---|---|---|---|")


def claims(results: dict) -> list:
    """The paper's qualitative claims, checked per family and scenario on the
    headline metric (joint accuracy for disjoint labels, mean accuracy over
    the styles for the domain shift)."""
    out = []
    for fam, scens in results.items():
        for scen, rows in scens.items():
            metric = "joint" if scen == "disjoint" else "mean"
            get = {(r["method"], r["budget"]): r[metric] for r in rows}
            tag = f"{fam} / {scen}"
            p1 = get.get(("pleas", 1.0))
            if p1 is None:
                continue
            pairs = [(m, 1.0, get[(m, 1.0)]) for m in ("rebasin", "regmean", "avg", "zipit") if (m, 1.0) in get]
            pairs += [("zipit", b, get[("zipit", b)]) for b in BUDGETS[1:] if ("zipit", b) in get and ("pleas", b) in get]
            beaten = [(m, b, v) for m, b, v in pairs if get[("pleas", b)] > v]
            verdict = "confirmed" if len(beaten) == len(pairs) else f"not confirmed ({len(pairs) - len(beaten)} of {len(pairs)} lost)"
            out.append(f"- {tag}: PLeaS beats the baselines at equal cost: {verdict}: "
                       + ", ".join(f"{m} {b:.1f}x {v:.1f} vs PLeaS {get[('pleas', b)]:.1f}" for m, b, v in pairs))
            gains = [(b, get[("pleas", b)] - get[("perm", b)]) for b in BUDGETS if ("pleas", b) in get and ("perm", b) in get]
            if gains:
                out.append(f"- {tag}: least squares over permutation alone: " + ", ".join(f"{b:.1f}x {g:+.1f}" for b, g in gains)
                           + f" ({'confirmed' if all(g > 0 for _, g in gains) else 'not confirmed'} at every budget)")
            curve = [get[("pleas", b)] for b in BUDGETS[:-1] if ("pleas", b) in get]
            if len(curve) > 1:
                rises = all(y >= x - 1.0 for x, y in zip(curve, curve[1:]))
                out.append(f"- {tag}: PLeaS accuracy against budget: " + " -> ".join(f"{v:.1f}" for v in curve)
                           + f" ({'rises' if rises else 'does not rise'}, within 1 point of noise)")
            ens = get.get(("ensemble", 2.0))
            if ("pleas", 1.2) in get and ens is not None:
                gap = ens - get[("pleas", 1.2)]
                out.append(f"- {tag}: PLeaS 1.2x is {gap:+.1f} points from the ensemble ({ens:.1f}; within 5: "
                           f"{'confirmed' if gap <= 5 else 'not confirmed'})")
            free = [(b, get[("pleas", b)] - get[("pleas-free", b)]) for b in BUDGETS
                    if ("pleas", b) in get and ("pleas-free", b) in get]
            if free:
                out.append(f"- {tag}: PLeaS-free loses " + ", ".join(f"{b:.1f}x {g:+.1f}" for b, g in free)
                           + " points against PLeaS with task data")
    return out


def plot(results: dict, out_dir: str) -> list:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    files = []
    for fam, scen in results.items():
        rows = scen.get("disjoint")
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ensemble = [(r["cost"], r["joint"]) for r in rows if r["method"] == "ensemble"]
        for method in ("pleas", "perm", "zipit", "pleas-free"):
            # 2.0x of every budgeted method is the ensemble
            pts = sorted([(r["cost"], r["joint"]) for r in rows if r["method"] == method] + ensemble)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method)
        for method, style in (("ensemble", "--"), ("rebasin", ":"), ("regmean", "-."), ("avg", ":")):
            v = [r["joint"] for r in rows if r["method"] == method]
            if v:
                ax.axhline(v[0], linestyle=style, linewidth=1, label=method, color="gray" if method != "ensemble" else "black")
        ax.set_xlabel("cost (x one source model, MACs)")
        ax.set_ylabel("joint accuracy (%)")
        ax.set_title(f"{fam}: digits 0-4 + 5-9")
        ax.legend(fontsize=7)
        fig.tight_layout()
        name = f"bench-{fam}.png"
        fig.savefig(os.path.join(out_dir, name), dpi=100)
        plt.close(fig)
        files.append(name)
    return files


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer epochs, budgets and families: a few minutes")
    p.add_argument("--families", default=None, help=f"comma-separated (default {','.join(FAMILIES)})")
    p.add_argument("--scenarios", default="disjoint,domain")
    p.add_argument("--calib", type=int, default=256, help="calibration images per merge (default 256)")
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmarks.md"))
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="BLAS threads (default: every CPU)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    families = (args.families or ("resnet18" if args.quick else ",".join(FAMILIES))).split(",")
    scenarios = args.scenarios.split(",")
    t0 = time.perf_counter()
    results: dict = {}
    for fam in families:
        results[fam] = {}
        for scen in scenarios:
            log(f"{fam} / {scen}")
            CURRENT[0] = f"{fam} / {scen}"
            results[fam][scen] = run(fam, scen, args)
        # the report so far, so an interrupted run still leaves its finished families
        write_report(results, args, argv, time.perf_counter() - t0, done=fam == families[-1])
    log(f"wrote {args.out} ({(time.perf_counter() - t0) / 60:.1f} min)")
    return 0


def write_report(results, args, argv, total, done) -> None:
    out_dir = os.path.dirname(args.out)
    pngs = plot(results, out_dir)
    cmd = "python -m benchmarks.suite " + " ".join(argv if argv is not None else sys.argv[1:])
    state = "" if done else " (interrupted: the families below are the ones finished)"
    lines = ["# Benchmarks", "",
             f"Produced by `{cmd.strip()}` in {total / 60:.1f} minutes{state}; {common.environment()}.", "",
             "Data: scikit-learn's handwritten digits at 32x32, split into train (1006), validation (251) and test "
             "(540). Models are trained here from scratch on the train split; calibration is "
             f"{args.calib} training images (or as many procedural `generic` images for pleas-free); every accuracy "
             "below is on the **test** split, which no default of fxmerge was chosen on (those were chosen on the "
             "validation split: [algorithm.md](algorithm.md#defaults-chosen-on-the-validation-split)). "
             "At 2.0x nothing is merged: PLeaS, with its default (the sources' BatchNorm statistics), computes the "
             "ensemble (a tested property), so the ensemble row stands for it there; perm and zipit reset the "
             "statistics on the calibration data, as their papers do, which moves their 2.0x models off the "
             "ensemble (not run here). "
             "Cost is the measured multiply-accumulates of the merged model over one source model.", ""]
    lines += ["## Claims", ""] + claims(results) + [""]
    if FAILURES:
        lines += ["## Failed runs", ""] + [f"- {w}: {m} {b}x: {e}" for w, m, b, e in FAILURES] + [""]
    for fam, scen in results.items():
        lines += [f"## {fam}", ""]
        if "disjoint" in scen:
            lines += ["Different label spaces (A: digits 0-4, seed 0; B: 5-9, seed 1; both heads kept).", "", HEAD_DISJOINT]
            lines += [fmt_disjoint(r) for r in scen["disjoint"]] + [""]
            if f"bench-{fam}.png" in pngs:
                lines += [f"![{fam}](bench-{fam}.png)", ""]
        if "domain" in scen:
            lines += [f"Shared labels, domain shift (A: {STYLE_A} digits, seed 0; B: {STYLE_B}, seed 1; calibration half "
                      f"of each style).", "", HEAD_DOMAIN]
            lines += [fmt_domain(r) for r in scen["domain"]] + [""]
    with open(args.out + ".tmp", "w") as f:
        f.write("\n".join(lines))
    os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    sys.exit(main())
