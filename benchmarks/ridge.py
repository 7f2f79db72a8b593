"""How the least-squares ridge affects PLeaS, on the demo's models.

The ridge pulls each layer's solution toward its permuted weights
(``lam = ridge * tr(G_SS) / |S|``). Too little and the systems of layers
whose inputs are nearly collinear (dead ReLUs, few samples per column)
over-fit the calibration data; too much and least squares degenerates to
``perm``. This script merges the demo's cached pairs (``fxmerge demo``
trains them) at each ridge and budget and writes docs/ridge.md.

    python benchmarks/ridge.py [--archs resnet,vit] [--ridges 0,1e-4,1e-3,1e-2,1e-1] [--budgets 1,1.2]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import fxmerge  # noqa: E402
from fxmerge.data import digits  # noqa: E402
from fxmerge.demo import cached_pair, calibration, evaluate  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", default="resnet,vit")
    p.add_argument("--ridges", default="0,1e-4,1e-3,1e-2,1e-1")
    p.add_argument("--budgets", default="1,1.2")
    p.add_argument("--calib", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "ridge.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ridges = [float(r) for r in args.ridges.split(",")]
    budgets = [float(b) for b in args.budgets.split(",")]
    command = (f"python benchmarks/ridge.py --archs {args.archs} --ridges {args.ridges} --budgets {args.budgets} "
               f"--calib {args.calib} --threads {args.threads}")
    test = digits(split="test")
    batches = calibration("digits", args.calib)
    lines = ["# Least-squares ridge", "",
             "PLeaS on the demo's models (digits 0-4 vs 5-9, different seeds, both heads kept) at each",
             "ridge; accuracy in percent (joint / task A / task B). Produced by:", "",
             f"    {command}", "",
             f"torch {torch.__version__}, {platform.machine()}, {args.threads} threads.", ""]
    for arch in args.archs.split(","):
        a, b = cached_pair(arch, log=print)
        lines += [f"## {arch}", "", "| ridge | " + " | ".join(f"{b:.1f}x" for b in budgets) + " |",
                  "|---|" + "---|" * len(budgets)]
        for ridge in ridges:
            cells = []
            for budget in budgets:
                t = time.perf_counter()
                try:
                    res = fxmerge.merge(a, b, batches, budget=budget, method="pleas", labels="disjoint", ridge=ridge)
                except (ValueError, RuntimeError) as e:  # a singular system without ridge is a finding, not a crash
                    cells.append(f"failed: {str(e).splitlines()[0][:80]}")
                    print(f"{arch} ridge {ridge:g} {budget:.1f}x failed: {e}", flush=True)
                    continue
                r = evaluate(res.model, test)
                cells.append(f"{r['joint']:.1f} / {r['task_a']:.1f} / {r['task_b']:.1f}")
                print(f"{arch} ridge {ridge:g} {budget:.1f}x: {cells[-1]} ({time.perf_counter() - t:.1f} s)", flush=True)
            lines.append(f"| {ridge:g} | " + " | ".join(cells) + " |")
        lines.append("")
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
