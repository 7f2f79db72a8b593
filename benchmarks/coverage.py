"""Coverage of the analysis over the timm zoo and torchvision classifiers.

For the smallest model of every timm family (fewest parameters among its
registered names, counted on the meta device) and a fixed torchvision list:
traced?, groups, share of conv/linear weights in a permutable group, pinned op
kinds, verified sound?, analysis time. Writes docs/coverage.md.

    python benchmarks/coverage.py [--families resnet,vision_transformer] [--out docs/coverage.md]
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import signal
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import fxmerge  # noqa: E402
from fxmerge import models  # noqa: E402

warnings.filterwarnings("ignore")
TORCHVISION = ["resnet18", "resnet50", "vit_b_16", "convnext_tiny", "mobilenet_v3_small",
               "efficientnet_b0", "regnet_y_400mf", "swin_t"]
MAX_SIDE = 448  # larger default inputs are rebuilt at 224 where the model allows it
MAX_PARAMS = 200e6  # larger models do not fit a float64 verification on this machine


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


def run_one(label, build, timeout):
    row = {"family": label[0], "model": label[1], "traced": False, "groups": 0, "covered": 0.0,
           "pinned": "", "verified": None, "unsound": 0, "time": 0.0, "error": ""}
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    try:
        model = build().eval()
        size = models.default_input_size(model)
        if max(size[1:]) > MAX_SIDE:
            try:
                model = build(img_size=224).eval()
                size = (size[0], 224, 224)
            except Exception:
                raise Skip(f"default input {list(size)} is too large for this machine")
        n_params = sum(p.numel() for p in model.parameters())
        if n_params > MAX_PARAMS:
            raise Skip(f"{n_params / 1e6:.0f}M parameters: too large for this machine")
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", help="comma-separated timm module names (default: all)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs", "coverage.md"))
    ap.add_argument("--timeout", type=int, default=240)
    ap.add_argument("--no-torchvision", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    import timm
    import torchvision

    families = args.families.split(",") if args.families else sorted(timm.list_modules())
    rows = []
    for fam in families:
        best = smallest_model(fam)
        if best is None:
            rows.append({"family": fam, "model": "-", "traced": False, "groups": 0, "covered": 0.0, "pinned": "",
                         "verified": None, "unsound": 0, "time": 0.0, "error": "no model builds"})
            continue
        name = best[0]
        row = run_one((fam, name), lambda **kw: timm.create_model(name, pretrained=False, **kw), args.timeout)
        gc.collect()
        rows.append(row)
        print(_line(row), flush=True)
    tv_rows = []
    if not args.no_torchvision:
        for name in TORCHVISION:
            row = run_one(("torchvision", name), lambda **kw: torchvision.models.get_model(name, weights=None, **kw),
                          args.timeout)
            tv_rows.append(row)
            print(_line(row), flush=True)
    write_report(args, rows, tv_rows)


def _line(r):
    v = {True: "sound", False: f"UNSOUND({r['unsound']})", None: "-"}[r["verified"]]
    return f"{r['family']:24s} {r['model']:40s} groups={r['groups']:4d} cov={r['covered']:.2f} {v} {r['time']:.2f}s {r['error']}"


def write_report(args, rows, tv_rows):
    import timm
    import torchvision

    all_rows = rows + tv_rows
    skipped = [r for r in rows if r.get("skipped")]
    rows_run = [r for r in rows if not r.get("skipped")]
    traced = [r for r in rows if r["traced"]]
    good = [r for r in rows_run if r["verified"] and r["covered"] >= 0.5]
    unsound = [r for r in all_rows if r["verified"] is False]
    lines = [
        "# Analysis coverage over the model zoo",
        "",
        "Produced by:",
        "",
        "```",
        "python benchmarks/coverage.py" + (f" --families {args.families}" if args.families else ""),
        "```",
        "",
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, "
        f"python {platform.python_version()}, {os.cpu_count()} CPU threads; random initialisation, eval mode, batch 1 "
        "at each model's default input size.",
        "",
        "For every timm family (module) the model with the fewest parameters; `covered` is the share of conv/linear "
        "weight elements with at least one axis in a permutable group; `verified` permutes every group at once "
        "(float64) and checks the output is unchanged; `time` is trace + check + analysis.",
        "",
        "## Summary",
        "",
        f"- timm families: {len(rows)}; skipped as too large for this machine: {len(skipped)}; traced: {len(traced)}",
        f"- every group verified and >= 50% of conv/linear parameters covered: {len(good)} of {len(rows_run)} "
        f"families run ({100 * len(good) / max(len(rows_run), 1):.0f}%)",
        f"- models with an unsound group: {len(unsound)}" + (" (" + ", ".join(r['model'] for r in unsound) + ")" if unsound else ""),
        f"- torchvision: {sum(1 for r in tv_rows if r['verified'])} of {len(tv_rows)} verified",
        "",
        "Lowest coverage among traced families: " + ", ".join(
            f"{r['family']} ({r['covered']:.2f})" for r in sorted(traced, key=lambda r: r["covered"])[:8]),
        "",
        "## timm",
        "",
    ]
    lines += _table(rows)
    lines += ["", "## torchvision", ""]
    lines += _table(tv_rows)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


def _table(rows):
    out = ["| family | model | traced | groups | covered | verified | time (s) | pinned op kinds / error |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        v = {True: "yes", False: f"NO ({r['unsound']} groups)", None: "-"}[r["verified"]]
        note = r["error"] or r["pinned"] or ""
        out.append(f"| {r['family']} | {r['model']} | {'yes' if r['traced'] else 'no'} | {r['groups']} | "
                   f"{r['covered']:.2f} | {v} | {r['time']:.2f} | {note.replace('|', '/')} |")
    return out


if __name__ == "__main__":
    main()
