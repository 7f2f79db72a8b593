"""Coverage of the analysis and of merging over the timm zoo and the
torchvision classifiers.

For the smallest model of every timm family (fewest parameters among its
registered names, counted on the meta device) and a fixed torchvision list,
random initialisation, eval mode:

* analysis: traced?, groups, share of conv/linear weights in a permutable
  group, pinned op kinds, every group verified sound (float64);
* export: the groups' JSON, applied by the reference applier
  (``fxmerge.analysis.apply``) with random permutations, leaves the output unchanged;
* merging (``--merge``): weights initialised to zero are re-drawn first (so
  no comparison is of all-zero outputs); a permuted copy merged back at 1.5x
  (permutation only, the sources' statistics; activation matching from 8
  images, else weight matching, else activation matching from 32) is the
  same function; two
  random inits merged at 1.5x with PLeaS give a finite model whose measured
  cost is within 1% of 1.5x or the merge says why; at 2.0x the ensemble (or
  the budget is reported out of reach, naming the op); the largest
  reachable cost.

Writes docs/coverage.md and docs/coverage-models.json (the models and input
sizes, which tests/test_export.py reads).

    python benchmarks/coverage.py [--families resnet,vision_transformer] [--merge] [--out docs/coverage.md]
"""
from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import json
import os
import platform
import signal
import sys
import time
import warnings

import numpy as np
import torch

import fxmerge  # noqa: E402
from benchmarks.provenance import SOURCE_COMMIT, STATED  # noqa: E402
from fxmerge.runtime import models  # noqa: E402
from fxmerge.analysis.apply import apply_to_model  # noqa: E402
from fxmerge.analysis.tracing import without_fast_path  # noqa: E402

warnings.filterwarnings("ignore")
TORCHVISION = ["resnet18", "resnet50", "vit_b_16", "convnext_tiny", "mobilenet_v3_small",
               "efficientnet_b0", "regnet_y_400mf", "swin_t"]
MAX_SIDE = 448  # larger default inputs are rebuilt at 224 where the model allows it
MAX_PARAMS = 200e6  # larger models do not fit a float64 verification on this machine
# three merges of a larger model (least squares over 2x-wide layers) take minutes each on 2 CPU cores
MERGE_MAX_PARAMS = 30e6
MERGE_ANYWAY: set = set()
SELF_TOLERANCE = 1e-3  # relative max-abs change: a merge that should give back the function  # models merged whatever their size (--merge-anyway)
HERE = os.path.dirname(os.path.abspath(__file__))
CACHE_DIR = os.path.join(HERE, "..", ".cache")
DEFAULT_OUT = os.path.abspath(os.path.join(HERE, "..", "docs", "coverage.md"))


COMMIT = SOURCE_COMMIT
COMMAND = "python -m benchmarks.coverage"


def rows_cache(out: str) -> str:
    """Where the sweep that writes report ``out`` keeps its rows for
    ``--rerun``: one file per report, so a trial sweep written elsewhere never
    replaces the rows of the page it does not write."""
    key = hashlib.sha1(os.path.abspath(out).encode()).hexdigest()[:12]
    return os.path.join(CACHE_DIR, f"coverage-rows-{key}.json")


class Timeout(Exception):
    pass


class Skip(Exception):
    pass


def _alarm(signum, frame):
    raise Timeout()


def smallest_model(module: str):
    import timm

    best = None
    for name in timm.list_models(module=module):
        try:
            with torch.device("meta"):
                m = timm.create_model(name, pretrained=False)
            n = sum(p.numel() for p in m.parameters())
        except Exception:
            continue
        if best is None or n < best[1]:
            best = (name, n)
    return best


def build_model(source: str, name: str, **kw):
    """A random-init model whose all-zero weight matrices (zero-initialised
    classifier heads, as torchvision's ViT has) are re-drawn: with a zero
    head every output is zero and every check below would pass vacuously."""
    import timm
    import torchvision

    if source == "torchvision":
        model = torchvision.models.get_model(name, weights=None, **kw)
    else:
        model = timm.create_model(name, pretrained=False, **kw)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2 and p.numel() > 1 and not bool(p.any()):
                p.normal_(0.0, 0.02)
    return model


def prepare(source: str, name: str) -> tuple:
    """The model (seed 0) and its input size, rebuilt at 224 where its
    default input is too large for this machine."""
    torch.manual_seed(0)
    model = build_model(source, name).eval()
    size = models.default_input_size(model)
    kw = {}
    if max(size[1:]) > MAX_SIDE:
        try:
            kw = {"img_size": 224}
            model = build_model(source, name, **kw).eval()
            size = (size[0], 224, 224)
        except Exception:
            raise Skip(f"default input {list(size)} is too large for this machine")
    n_params = sum(p.numel() for p in model.parameters())
    if n_params > MAX_PARAMS:
        raise Skip(f"{n_params / 1e6:.0f}M parameters: too large for this machine")
    return model, tuple(size), kw


def applier_keeps_function(model, x, groups) -> float:
    """Relative output change after applying random permutations from the
    exported JSON with the reference applier (float64)."""
    base = copy.deepcopy(model).double().eval()
    other = apply_to_model(copy.deepcopy(base), json.loads(groups.to_json()), seed=7)
    xd = x.double()
    with torch.no_grad(), without_fast_path():
        y0, y1 = base(xd), other(xd)
    y0 = y0[0] if isinstance(y0, (tuple, list)) else y0
    y1 = y1[0] if isinstance(y1, (tuple, list)) else y1
    return float((y0 - y1).abs().max() / (y0.abs().max() + 1e-12))


def at_merge_size(source, name, kw, model, size, side):
    """The model and input size the merge checks run at: ``side`` x ``side``
    where the model takes it (as built, or rebuilt with ``img_size``), else
    its default size. Merging runs least squares over every layer, so a small
    input keeps a sweep over the zoo within the hour."""
    if side is None or max(size[1:]) <= side:
        return model, size, kw
    small = (size[0], side, side)
    try:
        with torch.no_grad(), without_fast_path():
            model(torch.randn(1, *small))
        return model, small, kw
    except Exception:
        pass
    try:
        torch.manual_seed(0)
        kw2 = dict(kw, **{"img_size" if source == "timm" else "image_size": side})
        rebuilt = build_model(source, name, **kw2).eval()
        with torch.no_grad(), without_fast_path():
            rebuilt(torch.randn(1, *small))
        return rebuilt, small, kw2
    except Exception:
        return model, size, kw


def redraw_zero_init(model: torch.nn.Module, seed: int) -> int:
    """Re-draw the weights a model initialises to zero (timm's classifier
    heads, the last norm scale of residual branches): with them every
    output, or every branch, is 0 and any comparison of merged outputs is
    exact whatever the merge did. Norm scales (1-D) become 1 + noise, other
    weights small noise; zero biases stay. Returns how many tensors."""
    g = torch.Generator().manual_seed(seed)
    redrawn = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.is_floating_point() or p.numel() == 0 or name.endswith("bias") or bool(p.any()):
                continue
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            p.copy_(1 + 0.1 * noise if p.ndim == 1 else 0.02 * noise)
            redrawn += 1
    return redrawn


def _first(v):
    return v[0] if isinstance(v, (tuple, list)) else v


def _relative(y, want) -> float:
    return float((y - want).abs().max() / (want.abs().max() + 1e-12))


def merge_checks(source, name, kw, model, size, groups, side=None) -> dict:
    """The merge columns (see the module docstring)."""
    out = {}
    small_model, size, kw = at_merge_size(source, name, kw, model, size, side)
    model = copy.deepcopy(small_model)
    out["redrawn"] = redraw_zero_init(model, seed=0)
    groups = fxmerge.analyze(model, torch.randn(1, *size))
    out["merge_size"] = list(size)
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(4, *size, generator=g) for _ in range(2)]
    x = torch.randn(2, *size, generator=g)
    opts = dict(positions=16, max_memory="4G")
    with torch.no_grad(), without_fast_path():
        want = _first(model(x))
    out["output_scale"] = float(want.abs().max())
    # a permuted copy, merged back at 1.5x: the widened model is the model once the permutation is found.
    # Activation matching from 8 generic images can pair units that no image tells apart (dead on them, alive
    # on the test input), weight matching (coordinate descent) can stop short of the permutation: the check
    # reads activation matching, and weight matching where that falls short, then activation matching from
    # 32 images at 64 positions each (the matching used is recorded)
    b = groups.permuted_copy(model, groups.sampler(np.random.default_rng(3)))
    more = [torch.randn(4, *size, generator=g) for _ in range(8)]
    for matching, calib, extra in (("activation", data, {}), ("weight", data, {}),
                                   ("activation-32", more, {"positions": 64})):
        res = fxmerge.merge(model, b, calib, budget=1.5, method="perm", matching=matching.split("-")[0],
                            bn_stats="source", **{**opts, **extra})
        with torch.no_grad(), without_fast_path():
            error = _relative(_first(res.model(x)), want)
        if "self" not in out or error < out["self"]:
            out["self"], out["self_matching"] = error, matching
        if error < SELF_TOLERANCE:
            break
    # two inits at 1.5x (PLeaS) and 2x (the ensemble)
    torch.manual_seed(1)
    other = build_model(source, name, **kw).eval()
    redraw_zero_init(other, seed=1)
    res = fxmerge.merge(model, other, data, budget=1.5, method="pleas", **opts)
    with torch.no_grad(), without_fast_path():
        y = _first(res.model(x))
    r = res.report
    out["finite"] = bool(torch.isfinite(y).all())
    out["cost_15"] = r["cost_measured"]
    out["planned_15"] = r["cost_planned"]
    out["reachable"] = r["cost_feasible"][1]
    out["warned_15"] = "; ".join(w for w in r["warnings"] if "costs" in w or "out of reach" in w)[:200]
    res = fxmerge.merge(model, other, data, budget=2.0, method="perm", bn_stats="source", **opts)
    with torch.no_grad(), without_fast_path():
        y, ya, yb = _first(res.model(x)), want, _first(other(x))
    out["two_x"] = _relative(y, (ya + yb) / 2)
    # the ensemble is expected where 2x is reachable and no op keeps features merged
    out["two_x_reachable"] = r["cost_feasible"][1] >= 2.0 - 1e-6 and not res.report["kept_merged"]
    out["blocked"] = "; ".join(k["reason"] for k in res.report["kept_merged"][:2]) or "; ".join(
        w.split("kept from widening by: ")[-1] for w in res.report["warnings"] if "out of reach" in w)
    out["per_view"] = len(res.report["per_model_views"])
    return out


def run_one(source, family, name, timeout, merge, merge_side=None):
    row = {"family": family, "model": name, "source": source, "traced": False, "groups": 0, "covered": 0.0,
           "pinned": "", "verified": None, "unsound": 0, "applier": None, "time": 0.0, "error": "", "size": None,
           "kw": {}}
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    try:
        model, size, kw = prepare(source, name)
        row["size"], row["kw"] = list(size), kw
        x = torch.randn(1, *size)
        t0 = time.perf_counter()
        groups = fxmerge.analyze(model, x)
        row["time"] = time.perf_counter() - t0
        row["traced"] = True
        row["groups"] = len(groups)
        row["covered"] = groups.covered_fraction()
        row["pinned"] = ", ".join(f"{p.kind.split(':', 1)[1]} x{p.count}" for p in groups.pinned)
        report = fxmerge.verify(model, x, groups)
        row["verified"] = report.ok
        row["unsound"] = len(report.failing)
        row["applier"] = applier_keeps_function(model, x, groups)
        n_params = sum(p.numel() for p in model.parameters())
        if merge and n_params > MERGE_MAX_PARAMS and name not in MERGE_ANYWAY:
            row["merge_skipped"] = f"{n_params / 1e6:.0f}M parameters: merges not run on this machine"
        elif merge:
            row.update(merge_checks(source, name, kw, model, size, groups, merge_side))
    except Timeout:
        row["error"] = f"timeout after {timeout}s"
    except Skip as e:
        row["error"] = f"skipped: {e}"
        row["skipped"] = True
    except fxmerge.TraceError as e:
        row["error"] = "trace: " + str(e).splitlines()[0][:160]
    except Exception as e:  # report, never crash the sweep
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    finally:
        signal.alarm(0)
    return row


def merges_ok(r) -> bool:
    """The merge properties: the permuted self-merge at 1.5x is the same
    function, the 1.5x merge is finite and lands within 1% of the budget or
    says why, 2x is the ensemble where it is reachable."""
    if "self" not in r:
        return False
    on_budget = abs(r["cost_15"] - 1.5) <= 0.01 * 1.5 or bool(r.get("warned_15"))
    ok = r["self"] < SELF_TOLERANCE and r["finite"] and on_budget
    return ok and (not r["two_x_reachable"] or r["two_x"] < SELF_TOLERANCE)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", help="comma-separated timm module names (default: all)")
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--timeout", type=int, default=600)
    ap.add_argument("--merge", action="store_true", help="also merge (a few minutes per model)")
    ap.add_argument("--no-torchvision", action="store_true")
    ap.add_argument("--rerun", help="comma-separated families or torchvision models: re-run them in the last "
                    "sweep's results (kept under .cache) and rewrite the report")
    ap.add_argument("--merge-anyway", default="", help="comma-separated models merged even above 30M parameters")
    ap.add_argument("--merge-size", type=int, default=64,
                    help="input side the merge checks run at where the model takes it (default 64)")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    import timm

    MERGE_ANYWAY.update(m for m in args.merge_anyway.split(",") if m)
    if args.rerun:
        return rerun(args, args.rerun.split(","))
    families = args.families.split(",") if args.families else sorted(timm.list_modules())
    rows = []
    t_start = time.perf_counter()
    for fam in families:
        best = smallest_model(fam)
        if best is None:
            rows.append({"family": fam, "model": "-", "source": "timm", "traced": False, "groups": 0, "covered": 0.0,
                         "pinned": "", "verified": None, "unsound": 0, "applier": None, "time": 0.0,
                         "error": "no model builds"})
            continue
        row = run_one("timm", fam, best[0], args.timeout, args.merge, args.merge_size)
        gc.collect()
        rows.append(row)
        print(_line(row), flush=True)
    tv_rows = []
    if not args.no_torchvision:
        for name in TORCHVISION:
            row = run_one("torchvision", "torchvision", name, args.timeout, args.merge, args.merge_size)
            tv_rows.append(row)
            print(_line(row), flush=True)
    minutes = (time.perf_counter() - t_start) / 60
    os.makedirs(CACHE_DIR, exist_ok=True)
    with open(rows_cache(args.out), "w") as f:
        json.dump({"argv": sys.argv[1:], "rows": rows, "tv_rows": tv_rows, "minutes": minutes, "commit": COMMIT}, f)
    write_report(args, rows, tv_rows, minutes)


def rerun(args, names):
    """Re-run the named timm families / torchvision models of the last sweep
    (after a fix) and rewrite the report; the report names them."""
    cache = rows_cache(args.out)
    if not os.path.exists(cache):
        raise SystemExit(f"no saved sweep for {args.out}: run the sweep that writes it first (without --rerun)")
    with open(cache) as f:
        saved = json.load(f)
    t_start = time.perf_counter()
    for key in ("rows", "tv_rows"):
        for i, r in enumerate(saved[key]):
            if r["family"] in names or r["model"] in names:
                row = run_one(r["source"], r["family"], r["model"], args.timeout, args.merge, args.merge_size)
                saved[key][i] = row
                print(_line(row), flush=True)
    flags = (" --merge" if args.merge else "") + (f" --merge-anyway {args.merge_anyway}" if args.merge_anyway else "")
    flags += f" --out {args.out}" if os.path.abspath(args.out) != DEFAULT_OUT else ""
    if "commit" not in saved:  # a sweep saved before its rows carried their commit: the page's
        with open(args.out) as f:
            stated = STATED.search(f.read())
        saved["commit"] = stated.group(0)[len("at commit "):] if stated else "unknown"
    saved.setdefault("reruns", []).append(",".join(names) + flags)
    saved.setdefault("rerun_commits", [saved["commit"]] * (len(saved["reruns"]) - 1)).append(COMMIT)
    saved["minutes"] += (time.perf_counter() - t_start) / 60
    with open(cache, "w") as f:
        json.dump(saved, f)
    args.original = " ".join([COMMAND] + saved["argv"])
    write_report(args, saved["rows"], saved["tv_rows"], saved["minutes"], saved["reruns"],
                 commits=(saved["commit"], saved["rerun_commits"]))


def _line(r):
    v = {True: "sound", False: f"UNSOUND({r['unsound']})", None: "-"}[r["verified"]]
    m = f" merge={'ok' if merges_ok(r) else 'FAIL'} self={r['self']:.1e} 1.5x={r['cost_15']:.3f}/{r['planned_15']:.3f} " \
        f"2x={r['two_x']:.1e} max={r['reachable']:.2f}" if "self" in r else ""
    applier = "-" if r["applier"] is None else f"{r['applier']:.1e}"
    return (f"{r['family']:24s} {r['model']:40s} groups={r['groups']:4d} cov={r['covered']:.2f} {v} "
            f"applier={applier} {r['time']:.2f}s{m} {r['error']}")


def write_report(args, rows, tv_rows, minutes, reruns=(), commits=None):
    """The page. ``commits``: the sweep's commit and each re-run's (the page
    states the sweep's: rows it did not re-run describe that code)."""
    import timm
    import torchvision

    all_rows = rows + tv_rows
    skipped = [r for r in rows if r.get("skipped")]
    rows_run = [r for r in rows if not r.get("skipped")]
    traced = [r for r in rows if r["traced"]]
    good = [r for r in rows_run if r["verified"] and r["covered"] >= 0.5]
    unsound = [r for r in all_rows if r["verified"] is False]
    applied = [r for r in all_rows if r["applier"] is not None]
    applier_ok = [r for r in applied if r["applier"] < 1e-6]
    cmd = getattr(args, "original", " ".join([COMMAND] + sys.argv[1:]))  # the command as it was run
    sweep_commit, rerun_commits = commits or (COMMIT, [COMMIT] * len(reruns))
    if reruns:
        cmd += "`, then " + ", ".join(f"`{COMMAND} --rerun {r}` (at {c})" for r, c in zip(reruns, rerun_commits))
        cmd += " (those rows are from the re-runs)"
    else:
        cmd += "`"
    lines = [
        "# Coverage over the model zoo",
        "",
        f"Produced by `{cmd} in {minutes:.0f} minutes; torch {torch.__version__}, torchvision "
        f"{torchvision.__version__}, timm {timm.__version__}, fxmerge {fxmerge.__version__}, the sweep at commit "
        f"{sweep_commit}, python "
        f"{platform.python_version()}, {os.cpu_count()} CPU threads; random initialisation, eval mode, each "
        "model's default input size (rebuilt at 224 when larger than 448).",
        "",
        "For every timm family (module) the model with the fewest parameters. `covered`: the share of conv/linear "
        "weight elements with at least one axis in a permutable group; `verified`: every group permuted at once "
        "(float64), output unchanged; `applier`: the relative output change after the exported groups' JSON is "
        "applied by the reference applier `fxmerge.analysis.apply` with random permutations (float64); `time`: trace, "
        "check and analysis.",
        "",
        "## Summary",
        "",
        f"- timm families: {len(rows)}; skipped as too large for this machine: {len(skipped)}; traced: {len(traced)}",
        f"- every group verified and >= 50% of conv/linear parameters covered: {len(good)} of {len(rows_run)} "
        f"families run ({100 * len(good) / max(len(rows_run), 1):.0f}%)",
        f"- models with an unsound group: {len(unsound)}" + (" (" + ", ".join(r['model'] for r in unsound) + ")" if unsound else ""),
        f"- the exported groups applied without fxmerge leave the function unchanged: {len(applier_ok)} of "
        f"{len(applied)} models",
        f"- torchvision: {sum(1 for r in tv_rows if r['verified'])} of {len(tv_rows)} verified",
    ]
    if args.merge:
        too_large = [r for r in rows + tv_rows if r.get("merge_skipped")]
        traced_rows = [r for r in rows if r["traced"] and not r.get("merge_skipped")]
        merged = [r for r in traced_rows if merges_ok(r)]
        tv_rows_run = [r for r in tv_rows if not r.get("merge_skipped")]
        tv_merged = [r for r in tv_rows_run if merges_ok(r)]
        short = [r for r in traced_rows + tv_rows if "reachable" in r and r["reachable"] < 1.999]
        lines += [
            f"- merging (8 generic images at {args.merge_size}x{args.merge_size} where the model takes it, else its "
            f"input size; 16 positions per image): "
            f"{len(merged)} of {len(traced_rows)} traced timm families merged "
            f"({100 * len(merged) / max(len(traced_rows), 1):.0f}%) and {len(tv_merged)} of {len(tv_rows_run)} torchvision "
            "models pass every merge check (weights initialised to zero re-drawn first): a permuted copy merged back "
            f"at 1.5x (activation matching from 8 images, else weight matching, else activation matching from 32) is the same function (relative change < {SELF_TOLERANCE:.0e}), two inits at 1.5x with PLeaS give "
            "a finite model whose measured cost is within 1% of 1.5x or the merge warns why, 2x is the ensemble "
            f"(relative change < {SELF_TOLERANCE:.0e}) where reachable with nothing kept merged",
            f"- not merged, over {MERGE_MAX_PARAMS / 1e6:.0f}M parameters (three merges of such a model take "
            f"too long for a sweep over the zoo on this machine): {len(too_large)} ("
            + ", ".join(r["model"] for r in too_large) + ")",
            f"- models whose largest reachable cost is below 2x (an op keeps channels merged or pinned, named in "
            f"the table): {len(short)}",
        ]
    lines += ["", "Lowest coverage among traced families: " + ", ".join(
        f"{r['family']} ({r['covered']:.2f})" for r in sorted(traced, key=lambda r: r["covered"])[:8]), ""]
    if args.merge:
        failed = [r for r in traced_rows + tv_rows_run if not merges_ok(r)]
        if failed:
            lines += ["## Merge shortfalls", ""] + [f"- {r['family']} / {r['model']}: {_why(r)}" for r in failed] + [""]
    lines += ["## timm", ""] + _table(rows, args.merge) + ["", "## torchvision", ""] + _table(tv_rows, args.merge)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(os.path.dirname(args.out), "coverage-models.json"), "w") as f:
        json.dump([{"source": r["source"], "family": r["family"], "model": r["model"], "size": r["size"],
                    "kw": r["kw"], "merge_size": r.get("merge_size"),
                    "applier_ok": r["applier"] is not None and r["applier"] < 1e-6}
                   for r in all_rows if r["traced"]], f, indent=1)
    print(f"wrote {args.out}")


def _why(r) -> str:
    if "self" not in r:
        return r["error"] or "not merged"
    parts = []
    if r["self"] >= SELF_TOLERANCE:
        parts.append(f"self-merge changes the output by {r['self']:.1e} (best of activation matching from 8 and 32 images and weight matching)"
                     if r.get("self_matching") else f"self-merge changes the output by {r['self']:.1e}")
    if not r["finite"]:
        parts.append("non-finite outputs at 1.5x")
    if abs(r["cost_15"] - 1.5) > 0.01 * 1.5 and not r.get("warned_15"):
        parts.append(f"1.5x measured {r['cost_15']:.3f}x without a warning")
    if r["two_x_reachable"] and r["two_x"] >= SELF_TOLERANCE:
        parts.append(f"2x differs from the ensemble by {r['two_x']:.1e}")
    return "; ".join(parts)


def _table(rows, merge):
    head = "| family | model | traced | groups | covered | verified | applier | time (s) |"
    sep = "|---|---|---|---|---|---|---|---|"
    if merge:
        head += " merge input | self-merge at 1.5x | 1.5x measured | 2x vs ensemble | max cost |"
        sep += "---|---|---|---|---|"
    out = [head + " pinned op kinds / error |", sep + "---|"]
    for r in rows:
        v = {True: "yes", False: f"NO ({r['unsound']} groups)", None: "-"}[r["verified"]]
        note = r["error"] or r["pinned"] or ""
        app = "-" if r["applier"] is None else f"{r['applier']:.0e}"
        cells = (f"| {r['family']} | {r['model']} | {'yes' if r['traced'] else 'no'} | {r['groups']} | "
                 f"{r['covered']:.2f} | {v} | {app} | {r['time']:.2f} |")
        if merge:
            if "self" in r:
                two = f"{r['two_x']:.0e}" if r["two_x_reachable"] else f"out of reach ({r['blocked'][:90]})"
                warned = " (warned: " + r["warned_15"][:80].replace("|", "/") + ")" if r.get("warned_15") else ""
                cells += (f" {'x'.join(map(str, r['merge_size'][1:]))} | {r['self']:.0e} | {r['cost_15']:.3f}{warned} | "
                          f"{two} | {r['reachable']:.2f} |")
            elif r.get("merge_skipped"):
                cells += " not run (" + r["merge_skipped"].split(":")[0] + ") | - | - | - | - |"
            else:
                cells += " - | - | - | - | - |"
        out.append(cells + f" {note.replace('|', '/')} |")
    return out


if __name__ == "__main__":
    main()
