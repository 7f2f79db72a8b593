"""Digests of merged weights: the sha1 of every merged state dict of the
demo's pairs (ResNet and ViT) for every method, budgeted methods at 1.0,
1.5 and 2.0x, the others at their only cost. A restructuring that must not
change any result is checked by writing the digests before it and comparing
after it:

    python -m benchmarks.digest --out before.json          # at the old commit
    python -m benchmarks.digest --compare before.json      # at the new one: exit 1 on any difference
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import warnings

import torch

import fxmerge
from fxmerge.methods import METHODS
from fxmerge.training import cached_pair, calibration

BUDGETS = (1.0, 1.5, 2.0)


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha1()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def run(archs, calib: int, cache_dir: str) -> dict:
    out = {}
    runs = [(m.name, b) for m in METHODS.values() if m.budgeted for b in BUDGETS]
    runs += [(m.name, m.fixed_budget) for m in METHODS.values() if not m.budgeted]
    for arch in archs:
        a, b = cached_pair(arch, cache_dir=cache_dir, log=None)
        batches = calibration("digits", calib)
        for method, budget in runs:
            t = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = fxmerge.merge(a, b, batches, budget=budget, method=method, labels="disjoint")
            out[f"{arch}/{method}/{budget}"] = digest(res.model)
            print(f"{arch} {method} {budget}: {out[f'{arch}/{method}/{budget}']} ({time.perf_counter() - t:.1f} s)",
                  flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", default="resnet,vit", help="demo architectures (default resnet,vit)")
    p.add_argument("--calib", type=int, default=128, help="calibration images (default 128)")
    p.add_argument("--threads", type=int, default=2, help="torch threads, the same on both sides (default 2)")
    p.add_argument("--cache-dir", default=".cache/fxmerge-demo", help="where the trained demo pairs are kept")
    p.add_argument("--out", help="write the digests to this JSON file")
    p.add_argument("--compare", help="compare with the digests in this JSON file (exit 1 on a difference)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    got = run(args.archs.split(","), args.calib, args.cache_dir)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(got, f, indent=1)
    if args.compare:
        with open(args.compare) as f:
            want = json.load(f)
        differ = sorted(k for k in want if got.get(k) != want[k])
        print(f"{len(want) - len(differ)} of {len(want)} digests identical" + (f"; differ: {differ}" if differ else ""))
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
