"""The benchmark suite: every method and budget, per model family, on
scikit-learn's handwritten digits and domain-shifted copies of them.

Scenarios (models trained in-process, cached under .cache/fxmerge-bench):

* ``disjoint``: model A learns digits 0-4 (seed 0), model B digits 5-9
  (seed 1); both heads are kept (``labels="disjoint"``). Joint accuracy
  (argmax over all 10 logits), per-task accuracy, and a linear probe: a
  logistic regression fitted on the merged model's penultimate features of
  the training digits, scored on the test digits (all 10 classes).
* ``domain``: both models learn all 10 digits (shared head), A on clean
  digits (seed 0), B on their edge maps (seed 1). Accuracy on each style and
  their mean.
* ``pleas-free`` rows: PLeaS calibrated on the ``generic`` procedural images
  instead of digits.

Writes docs/benchmarks.md (one table per family and scenario, the command,
the library versions) and an accuracy-versus-budget plot per family.

    python benchmarks/suite.py [--quick] [--families resnet18,resnet50,resnetv2,mobilenetv3,vit]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time

import numpy as np
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import fxmerge  # noqa: E402
from fxmerge.data import digit_task, digits, generic, styled  # noqa: E402
from fxmerge.demo import TASK_A, TASK_B, TRAIN, cached_pair, demo_model, evaluate, train  # noqa: E402

CACHE = os.path.join(ROOT, ".cache", "fxmerge-bench")
BUDGETS = (1.0, 1.2, 1.5, 2.0)
STYLE_A, STYLE_B = "clean", "edges"


def family_model(name: str, num_classes: int) -> nn.Module:
    """The families at widths that train on this machine's CPU."""
    if name == "resnet18":
        return demo_model("resnet", num_classes)
    if name == "resnet50":
        from timm.models.resnet import Bottleneck, ResNet

        return ResNet(Bottleneck, (1, 1, 1, 1), channels=(16, 32, 64, 128), stem_width=16, num_classes=num_classes)
    if name == "resnetv2":
        # pre-activation bottlenecks with BatchNorm and plain convolutions, as
        # timm's resnetv2_50 (the BiT variants' GroupNorm + weight
        # standardisation needs widths divisible by 32 groups)
        from timm.layers import BatchNormAct2d, create_conv2d
        from timm.models.resnetv2 import ResNetV2

        return ResNetV2((1, 1, 1, 1), channels=(64, 128, 256, 512), stem_chs=16, conv_layer=create_conv2d,
                        norm_layer=BatchNormAct2d, num_classes=num_classes)
    if name == "mobilenetv3":
        import timm

        return timm.create_model("mobilenetv3_small_050", num_classes=num_classes)
    if name == "vit":
        return demo_model("vit", num_classes)
    raise SystemExit(f"unknown family '{name}'")


DEMO_ARCH = {"resnet18": "resnet", "vit": "vit"}  # families that are the demo's models


def train_config(name: str, quick: bool) -> dict:
    if name == "vit":
        cfg = dict(TRAIN["vit"])
    elif name == "mobilenetv3":
        cfg = {"epochs": 30, "lr": 0.05, "batch": 64, "weight_decay": 5e-4}
    else:
        cfg = dict(TRAIN["resnet"])
    if quick:
        cfg["epochs"] = max(5, cfg["epochs"] // 2)
    return cfg


def cached(name: str, tag: str, classes, split, seed: int, cfg: dict, log) -> nn.Module:
    key = hashlib.sha1(json.dumps([name, tag, list(classes), seed, cfg], sort_keys=True).encode()).hexdigest()[:10]
    path = os.path.join(CACHE, f"{name}-{tag}-{key}.pt")
    model = family_model(name, len(classes))
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    log(f"  training {name} {tag} ({cfg['epochs']} epochs) ...")
    train(model, split, seed=seed, **cfg)
    os.makedirs(CACHE, exist_ok=True)
    torch.save(model.state_dict(), path + ".tmp")
    os.replace(path + ".tmp", path)
    return model.eval()


def source_pair(name: str, scenario: str, seed: int, quick: bool, log) -> tuple:
    """The source models of one scenario, A from ``seed`` and B from ``seed + 1``:
    digits 0-4 and 5-9 (``disjoint``) or clean and edge-map digits (``domain``)."""
    cfg = train_config(name, quick)
    tr = digits(split="train")
    if scenario == "disjoint":
        return (cached(name, "a04", TASK_A, digit_task(tr, TASK_A), seed, cfg, log),
                cached(name, "b59", TASK_B, digit_task(tr, TASK_B), seed + 1, cfg, log))
    classes = tuple(range(10))
    return (cached(name, f"all-{STYLE_A}", classes, styled(tr, STYLE_A), seed, cfg, log),
            cached(name, f"all-{STYLE_B}", classes, styled(tr, STYLE_B), seed + 1, cfg, log))


def mixed_styles(split):
    """The domain shift's calibration images: half in each style."""
    return type(split)(torch.cat([styled(split, STYLE_A).x[::2], styled(split, STYLE_B).x[1::2]]), split.y)


def environment() -> str:
    """The library versions a report was produced with."""
    import scipy
    import timm
    import torchvision

    return (f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, "
            f"scipy {scipy.__version__}, numpy {np.__version__}, fxmerge {fxmerge.__version__}")


# ----------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def penultimate(model: nn.Module, split, batch: int = 256) -> np.ndarray:
    """Inputs of the classifier (the last linear or 1x1-convolution layer, as
    in timm's conv heads; a widened layer counts as one, not as its parts)."""
    from fxmerge.layers import PartialConv, PartialLinear

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


@torch.no_grad()
def accuracy(model, split) -> float:
    model.eval()
    pred = torch.cat([model(x).argmax(1) for x, _ in split.batches(256)])
    return 100 * float((pred == split.y).float().mean())


# ----------------------------------------------------------------------------
# runs


def method_runs(quick: bool) -> list:
    """(method, budget, calibration source). At 2.0x nothing is merged, so
    pleas, perm and zipit all compute the ensemble (a tested property): the
    ensemble row stands for them there."""
    budgets = (1.0, 1.5) if quick else BUDGETS[:-1]
    runs = [(m, b, "digits") for m in ("pleas", "perm", "zipit") for b in budgets]
    runs += [("rebasin", 1.0, "digits"), ("regmean", 1.0, "digits"), ("avg", 1.0, "digits"), ("ensemble", 2.0, "digits")]
    runs += [("pleas", b, "generic") for b in budgets[:2]]
    return runs


def calibration(source: str, n: int, train_split) -> list:
    if source == "digits":
        return train_split.subset(n, seed=0).batches(64, with_targets=False)
    x = generic(n, 32, seed=0)
    return [x[i:i + 64] for i in range(0, n, 64)]


FAILURES: list = []  # (family/scenario, method, budget, error): reported, never hidden


def attempt(merge, method, budget, log):
    """One merge; a failure is logged and listed in the report instead of
    ending the whole suite."""
    try:
        return merge()
    except Exception as e:  # noqa: BLE001 - the report lists it
        FAILURES.append((CURRENT[0], method, budget, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
        log(f"    FAILED {method} {budget}x: {FAILURES[-1][-1]}")
        return None


CURRENT = [""]


def run_disjoint(name, args, log) -> list:
    tr, te = digits(split="train"), digits(split="test")
    if name in DEMO_ARCH and not args.quick:
        # the demo's models (same recipe), trained once for both
        a, b = cached_pair(DEMO_ARCH[name], cache_dir=os.path.join(ROOT, ".cache", "fxmerge-demo"), log=log)
    else:
        a, b = source_pair(name, "disjoint", 0, args.quick, log)
    rows = []
    for label, m, which in (("model A", a, "a"), ("model B", b, "b")):
        r = evaluate(m, te, which=which)
        rows.append({"method": label, "budget": None, "calib": "-", **r, "probe": linear_probe(m, tr, te),
                     "cost": 1.0, "params": sum(p.numel() for p in m.parameters()), "seconds": None})
    for method, budget, source in method_runs(args.quick):
        t = time.perf_counter()
        res = attempt(lambda: fxmerge.merge(a, b, calibration(source, args.calib, tr), budget=budget, method=method,
                                            labels="disjoint"), method, budget, log)
        if res is None:
            continue
        sec = time.perf_counter() - t
        r = evaluate(res.model, te)
        rows.append({"method": method if source == "digits" else "pleas-free", "budget": budget, "calib": source, **r,
                     "probe": linear_probe(res.model, tr, te), "cost": res.report["cost_measured"],
                     "params": res.report["params_merged"], "seconds": sec})
        log("    " + fmt_disjoint(rows[-1]))
    return rows


def run_domain(name, args, log) -> list:
    tr, te = digits(split="train"), digits(split="test")
    a, b = source_pair(name, "domain", 0, args.quick, log)
    tests = {s: styled(te, s) for s in (STYLE_A, STYLE_B)}
    mixed = mixed_styles(tr)  # the generic source ignores the split
    rows = []

    def scores(m):
        acc = {s: accuracy(m, t) for s, t in tests.items()}
        acc["mean"] = float(np.mean(list(acc.values())))
        return acc

    for label, m in (("model A", a), ("model B", b)):
        rows.append({"method": label, "budget": None, "calib": "-", **scores(m), "cost": 1.0,
                     "params": sum(p.numel() for p in m.parameters()), "seconds": None})
    for method, budget, source in method_runs(args.quick):
        data = calibration(source, args.calib, mixed)
        t = time.perf_counter()
        res = attempt(lambda: fxmerge.merge(a, b, data, budget=budget, method=method, labels="shared"), method, budget, log)
        if res is None:
            continue
        sec = time.perf_counter() - t
        rows.append({"method": method if source == "digits" else "pleas-free", "budget": budget, "calib": source,
                     **scores(res.model), "cost": res.report["cost_measured"], "params": res.report["params_merged"],
                     "seconds": sec})
        log("    " + fmt_domain(rows[-1]))
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
    p.add_argument("--families", default=None, help="comma-separated (default resnet18,resnet50,resnetv2,mobilenetv3,vit)")
    p.add_argument("--scenarios", default="disjoint,domain")
    p.add_argument("--calib", type=int, default=256, help="calibration images per merge (default 256)")
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmarks.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    families = (args.families or ("resnet18" if args.quick else "resnet18,resnet50,resnetv2,mobilenetv3,vit")).split(",")
    scenarios = args.scenarios.split(",")
    log = lambda s: print(s, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    results: dict = {}
    for fam in families:
        results[fam] = {}
        for scen in scenarios:
            log(f"{fam} / {scen}")
            CURRENT[0] = f"{fam} / {scen}"
            results[fam][scen] = (run_disjoint if scen == "disjoint" else run_domain)(fam, args, log)
        # the report so far, so an interrupted run still leaves its finished families
        write_report(results, args, argv, time.perf_counter() - t0, done=fam == families[-1])
    log(f"wrote {args.out} ({(time.perf_counter() - t0) / 60:.1f} min)")
    return 0


def write_report(results, args, argv, total, done) -> None:
    out_dir = os.path.dirname(args.out)
    pngs = plot(results, out_dir)
    cmd = "python benchmarks/suite.py " + " ".join(argv if argv is not None else sys.argv[1:])
    state = "" if done else " (interrupted: the families below are the ones finished)"
    lines = ["# Benchmarks", "",
             f"Produced by `{cmd.strip()}` in {total / 60:.1f} minutes{state} on {platform.machine()} "
             f"({os.cpu_count()} CPU threads); {environment()}.", "",
             "Data: scikit-learn's handwritten digits at 32x32 (1257 train / 540 test). Models are trained here from "
             f"scratch; calibration is {args.calib} training images (or as many procedural `generic` images for pleas-free). "
             "At 2.0x nothing is merged: pleas, perm and zipit all compute the ensemble (a tested property), so the "
             "ensemble row stands for them there. "
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
