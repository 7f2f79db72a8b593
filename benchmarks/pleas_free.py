"""PLeaS-free in the paper's setting: calibration on the data the sources'
backbones were pretrained on.

In the paper, both source models start from backbones pretrained on
ImageNet and are fine-tuned on their own tasks; PLeaS-free then calibrates
matching and least squares on unlabelled ImageNet images instead of task
data. Here:

* pretraining distribution: the training digits drawn in four other styles
  (inverted, edge maps, noisy, rotated), all ten classes: 4024 images;
* two backbones pretrained on it from different seeds (s and s+1);
* fine-tuning: backbone s on clean digits 0-4, backbone s+1 on clean digits
  5-9 (a new head each, every layer trained);
* merging (both heads kept): PLeaS calibrated on task data (clean training
  digits), PLeaS-free calibrated on unlabelled pretraining images, and, as
  the harsher setting, PLeaS-free on procedurally generated ``generic``
  images.

Scores are joint accuracy on the test digits (clean). Writes
docs/pleas-free.md with the exact command.

    python benchmarks/pleas_free.py [--families resnet18,resnet50] [--seeds 0,2]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))

from benchmarks import common  # noqa: E402
from benchmarks.common import ROOT, log  # noqa: E402

import fxmerge  # noqa: E402
from fxmerge.runtime.data import Split, digit_task, digits, generic, styled  # noqa: E402
from fxmerge.training import TASK_A, TASK_B, evaluate  # noqa: E402

PRETRAIN_STYLES = ("inverted", "edges", "noisy", "rotated")
BUDGETS = (1.0, 1.2)
SOURCES = ("task", "pretraining", "generic")


def pretraining_split() -> Split:
    tr = digits(split="train")
    parts = [styled(tr, s, seed=i) for i, s in enumerate(PRETRAIN_STYLES)]
    return Split(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]))


def finetune_config(name: str) -> dict:
    cfg = dict(common.train_config(name))
    cfg["epochs"] = max(5, cfg["epochs"] // 2)
    cfg["lr"] = cfg["lr"] / 5
    return cfg


def pretrained_and_finetuned(name: str, seed: int, classes) -> torch.nn.Module:
    """Backbone ``seed`` pretrained on the styled digits, fine-tuned on the
    clean digits of ``classes`` (both cached)."""
    pre = common.cached(name, "pretrain-styled", tuple(range(10)), pretraining_split(), seed, common.train_config(name))
    tag = f"finetune-{classes[0]}{classes[-1]}-from-{seed}"

    def from_backbone(fam, n_classes):
        model = common.family_model(fam, n_classes)
        state = {k: v for k, v in pre.state_dict().items() if model.state_dict()[k].shape == v.shape}
        model.load_state_dict(state, strict=False)  # the new head keeps its fresh initialisation
        return model

    return common.cached(name, tag, classes, digit_task(digits(split="train"), classes), seed, finetune_config(name),
                         builder=from_backbone)


def calibration(source: str, n: int) -> list:
    if source == "task":
        return common.calibration("disjoint", n)
    if source == "pretraining":
        return pretraining_split().subset(n, seed=0).batches(64, with_targets=False)
    x = generic(n, 32, seed=0)
    return [x[i:i + 64] for i in range(0, n, 64)]


def run(name: str, seed: int, calib: int) -> dict:
    a = pretrained_and_finetuned(name, seed, TASK_A)
    b = pretrained_and_finetuned(name, seed + 1, TASK_B)
    te = digits(split="test")
    out = {"model A": evaluate(a, te, which="a")["task_a"], "model B": evaluate(b, te, which="b")["task_b"]}
    out["ensemble"] = evaluate(fxmerge.merge(a, b, calibration("task", calib), method="ensemble",
                                             labels="disjoint").model, te)["joint"]
    for source in SOURCES:
        for budget in BUDGETS:
            res = fxmerge.merge(a, b, calibration(source, calib), budget=budget, method="pleas", labels="disjoint")
            out[(source, budget)] = evaluate(res.model, te)["joint"]
            log(f"    {name} seeds {seed}/{seed + 1}: {source} {budget:.1f}x {out[(source, budget)]:.1f}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default="resnet18,resnet50")
    p.add_argument("--seeds", default="0,2", help="seed of model A's backbone per pair (B's is seed + 1)")
    p.add_argument("--calib", type=int, default=256)
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "pleas-free.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.perf_counter()
    results = {}
    for fam in args.families.split(","):
        for seed in seeds:
            log(f"{fam} seeds {seed}/{seed + 1}")
            results[(fam, seed)] = run(fam, seed, args.calib)
    cmd = "python -m benchmarks.pleas_free " + " ".join(argv if argv is not None else sys.argv[1:])
    cols = " | ".join(f"{s} {b:.1f}x" for s in SOURCES for b in BUDGETS)
    lines = ["# PLeaS-free", "",
             f"Produced by `{cmd.strip()}` in {(time.perf_counter() - t0) / 60:.1f} minutes; {common.environment()}.", "",
             "The paper's setting, on digits: two backbones pretrained from different seeds on the training digits "
             f"drawn in four other styles ({', '.join(PRETRAIN_STYLES)}; 4024 images, ten classes), each fine-tuned "
             "on clean digits of its own task (A: 0-4, B: 5-9; a new head, every layer trained), merged with both "
             f"heads kept. PLeaS calibrates on {args.calib} images of task data (clean training digits); PLeaS-free "
             f"on {args.calib} unlabelled images of the pretraining distribution (`pretraining`), as the paper does "
             "with ImageNet, or, the harsher setting, on procedurally generated images (`generic`). Default options "
             "(the sources' BatchNorm statistics are kept, the paper's recommendation for foreign data). Joint "
             "accuracy on the clean test digits; the sources' columns are their own task accuracy.", "",
             f"| family | seeds | model A | model B | ensemble | {cols} |",
             "|---|---|---|---|---|" + "---|" * (len(SOURCES) * len(BUDGETS))]
    for (fam, seed), out in results.items():
        lines.append(f"| {fam} | {seed}/{seed + 1} | {out['model A']:.1f} | {out['model B']:.1f} | {out['ensemble']:.1f} | "
                     + " | ".join(f"{out[(s, b)]:.1f}" for s in SOURCES for b in BUDGETS) + " |")
    lines += ["", "Loss of PLeaS-free against PLeaS on task data (points of joint accuracy; mean over the rows, "
              "min and max):", ""]
    for source in SOURCES[1:]:
        for b in BUDGETS:
            gaps = [out[("task", b)] - out[(source, b)] for out in results.values()]
            lines.append(f"- `{source}` calibration, {b:.1f}x: {np.mean(gaps):+.1f} ({min(gaps):+.1f}, {max(gaps):+.1f})")
    common.write(args.out, lines)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
