"""What the benchmark scripts share: the model families, their training
recipes and cache, the two scenarios, calibration data and evaluation.

Data: scikit-learn's digits at 32x32, split once into ``train`` (training
the sources, calibration), ``val`` (every tuned choice) and ``test`` (the
reported figures, seen by no choice): ``fxmerge.runtime.data.digits``.

Scenarios:

* ``disjoint``: model A learns digits 0-4 (seed s), model B digits 5-9
  (seed s+1); both heads are kept (``labels="disjoint"``); headline metric:
  joint accuracy (argmax over all 10 logits).
* ``domain``: both learn all 10 digits (shared head), A on clean digits
  (seed s), B on their edge maps (seed s+1); headline: mean accuracy over
  the two styles.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time

import numpy as np
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import fxmerge  # noqa: E402
from benchmarks.provenance import SOURCE_COMMIT  # noqa: E402
from fxmerge.runtime.data import digit_task, digits, generic, styled  # noqa: E402
from fxmerge.training import TASK_A, TASK_B, TRAIN, demo_model, evaluate, train  # noqa: E402

CACHE = os.path.join(ROOT, ".cache", "fxmerge-bench")
FAMILIES = ("resnet18", "resnet50", "resnetv2", "mobilenetv3", "mbnet", "vit")
SCENARIOS = ("disjoint", "domain")
STYLE_A, STYLE_B = "clean", "edges"
DATA_VERSION = "train/val/test 1006/251/540"  # part of every cache key: the sources never saw val or test


def log(s: str) -> None:
    print(s, flush=True)


class InvertedResidual(nn.Module):
    """MobileNetV3's block, written with torch.nn: 1x1 expansion, depthwise
    3x3, squeeze-excitation with a hard-sigmoid gate, 1x1 projection, a
    residual when the shape allows."""

    def __init__(self, cin: int, hidden: int, cout: int, stride: int):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                                nn.BatchNorm2d(hidden), nn.Hardswish())
        squeeze = max(8, hidden // 4)
        self.se_reduce, self.se_expand = nn.Conv2d(hidden, squeeze, 1), nn.Conv2d(squeeze, hidden, 1)
        self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        h = self.dw(self.expand(x))
        h = h * torch.nn.functional.hardsigmoid(self.se_expand(torch.relu(self.se_reduce(h.mean((2, 3), keepdim=True)))))
        y = self.project(h)
        return x + y if self.residual else y


class MBNet(nn.Module):
    """A MobileNet-style network of fxmerge's own (not timm's): depthwise
    convolutions, squeeze-excitation, hard-swish, BatchNorm."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        cfg = [(16, 48, 24, 2), (24, 72, 24, 1), (24, 96, 40, 2), (40, 120, 40, 1), (40, 160, 64, 1)]
        self.blocks = nn.Sequential(*[InvertedResidual(*c) for c in cfg])
        self.head = nn.Sequential(nn.Conv2d(64, 128, 1, bias=False), nn.BatchNorm2d(128), nn.Hardswish())
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x):
        return self.fc(self.head(self.blocks(self.stem(x))).mean((2, 3)))


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
    if name == "mbnet":
        return MBNet(num_classes)
    if name == "vit":
        return demo_model("vit", num_classes)
    raise SystemExit(f"unknown family '{name}'")


def train_config(name: str, quick: bool = False) -> dict:
    if name == "vit":
        cfg = dict(TRAIN["vit"])
    elif name in ("mobilenetv3", "mbnet"):
        cfg = {"epochs": 30, "lr": 0.05, "batch": 64, "weight_decay": 5e-4}
    else:
        cfg = dict(TRAIN["resnet"])
    if quick:
        cfg["epochs"] = max(5, cfg["epochs"] // 2)
    return cfg


def cached(name: str, tag: str, classes, split, seed: int, cfg: dict, builder=None) -> nn.Module:
    """A trained model from the cache, or trained now and cached."""
    key = hashlib.sha1(json.dumps([name, tag, list(classes), seed, cfg, DATA_VERSION], sort_keys=True).encode()
                       ).hexdigest()[:10]
    path = os.path.join(CACHE, f"{name}-{tag}-{key}.pt")
    model = (builder or family_model)(name, len(classes))
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    log(f"  training {name} {tag} seed {seed} ({cfg['epochs']} epochs) ...")
    train(model, split, seed=seed, **cfg)
    os.makedirs(CACHE, exist_ok=True)
    torch.save(model.state_dict(), path + ".tmp")
    os.replace(path + ".tmp", path)
    return model.eval()


def source_pair(name: str, scenario: str, seed: int = 0, quick: bool = False) -> tuple:
    """The source models of one scenario, A from ``seed`` and B from ``seed + 1``."""
    cfg = train_config(name, quick)
    tr = digits(split="train")
    if scenario == "disjoint":
        return (cached(name, "a04", TASK_A, digit_task(tr, TASK_A), seed, cfg),
                cached(name, "b59", TASK_B, digit_task(tr, TASK_B), seed + 1, cfg))
    classes = tuple(range(10))
    return (cached(name, f"all-{STYLE_A}", classes, styled(tr, STYLE_A), seed, cfg),
            cached(name, f"all-{STYLE_B}", classes, styled(tr, STYLE_B), seed + 1, cfg))


def mixed_styles(split):
    """The domain shift's data: half of the images in each style."""
    return type(split)(torch.cat([styled(split, STYLE_A).x[::2], styled(split, STYLE_B).x[1::2]]), split.y)


def labels_of(scenario: str) -> str:
    return "disjoint" if scenario == "disjoint" else "shared"


def calibration(scenario: str, n: int, source: str = "digits", seed: int = 0) -> list:
    """Calibration batches: ``n`` training images of the scenario's tasks
    (both styles for the domain shift), or ``n`` procedural ``generic``
    images (PLeaS-free)."""
    if source == "generic":
        x = generic(n, 32, seed=seed)
        return [x[i:i + 64] for i in range(0, n, 64)]
    tr = digits(split="train")
    task = tr if scenario == "disjoint" else mixed_styles(tr)
    return task.subset(n, seed=seed).batches(64, with_targets=False)


@torch.no_grad()
def accuracy(model, split) -> float:
    model.eval()
    pred = torch.cat([model(x).argmax(1) for x, _ in split.batches(256)])
    return 100 * float((pred == split.y).float().mean())


def scores(model, scenario: str, split: str = "test") -> dict:
    """The scenario's metrics on one split: joint, task A, task B (disjoint)
    or per style and their mean (domain); ``headline`` names the main one."""
    data = digits(split=split)
    if scenario == "disjoint":
        r = evaluate(model, data)
        return {**r, "headline": r["joint"]}
    acc = {s: accuracy(model, styled(data, s)) for s in (STYLE_A, STYLE_B)}
    acc["mean"] = float(np.mean(list(acc.values())))
    return {**acc, "headline": acc["mean"]}


def headline(model, scenario: str, split: str = "test") -> float:
    return scores(model, scenario, split)["headline"]


def val_test(model, scenario: str) -> tuple:
    """The headline on the validation split and on the test split."""
    return headline(model, scenario, "val"), headline(model, scenario, "test")


def suite_pairs(args):
    """The suite's source pairs (seed pair 0/1) of ``args.families`` x
    ``args.scenarios`` with ``args.calib`` calibration images each:
    ``(family, scenario, model A, model B, calibration batches)``."""
    for fam in args.families.split(","):
        for scen in args.scenarios.split(","):
            a, b = source_pair(fam, scen, 0)
            yield fam, scen, a, b, calibration(scen, args.calib)


def environment() -> str:
    """The library versions and the commit a report was produced with."""
    import scipy
    import timm
    import torchvision

    return (f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, "
            f"scipy {scipy.__version__}, numpy {np.__version__}, fxmerge {fxmerge.__version__} at commit {SOURCE_COMMIT}; "
            f"{platform.machine()}, {os.cpu_count()} CPU threads")


def add_pair_arguments(p, budgets: str) -> None:
    """The options of a script that merges the suite's source pairs at a list
    of budgets and writes one markdown report."""
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--budgets", default=budgets)
    p.add_argument("--calib", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True)


def run_and_write(args, argv, run, report) -> int:
    """``report(args, argv, run(args), minutes)`` written to ``args.out``,
    on ``args.threads`` BLAS threads."""
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    results = run(args)
    write(args.out, report(args, argv, results, (time.perf_counter() - t0) / 60))
    log(f"wrote {args.out}")
    return 0


def write(path: str, lines: list) -> None:
    """Write a report atomically."""
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    os.replace(path + ".tmp", path)
