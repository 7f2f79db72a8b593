"""Data-parallel merging over torch.distributed on this machine's CPUs.

Merges the suite's resnet18 pair (half-width ResNet-18, digits 0-4 and 5-9,
both heads kept; ``benchmarks/common.py``) on ``--calib`` training digits,
once in one process and once under ``torchrun --standalone --nproc_per_node
2`` (gloo), and reports:

* the merged weights of two ranks against one process (max relative
  difference per method: pleas, perm, zipit, regmean), with the single
  process at one BLAS thread (as each rank) and at two;
* wall time of the PLeaS merge: 2 ranks x 1 thread against 1 rank x 2
  threads;
* what the ranks all-reduce (bytes) and each rank's peak memory.

Writes docs/scaling.md with the exact command.

    python benchmarks/scaling.py [--calib 512] [--nproc 2]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

from benchmarks import common  # noqa: E402
from benchmarks.common import ROOT, log  # noqa: E402

METHODS = (("pleas", 1.2), ("perm", 1.2), ("zipit", 1.2), ("regmean", 1.0))


def worker(out_dir: str, calib: int, threads: int) -> None:
    """One rank (or the single process): merge with every method, save the
    weights (rank 0) and this rank's measurements."""
    import fxmerge
    from fxmerge.runtime import distributed

    torch.set_num_threads(threads)
    distributed.init_from_env("cpu")
    a, b = common.source_pair("resnet18", "disjoint", 0)
    data = common.calibration("disjoint", calib)
    weights, times, reduced = {}, {}, {}
    for method, budget in METHODS:
        t = time.perf_counter()
        res = fxmerge.merge(a, b, data, budget=budget, method=method, labels="disjoint")
        times[method] = time.perf_counter() - t
        weights[method] = {k: v.clone() for k, v in res.model.state_dict().items()}
        reduced[method] = res.report["bytes_reduced"]
        per_rank = res.report["images_per_rank"]
    world, rank = distributed.world_size(), distributed.rank()
    tag = f"{world}x{threads}"
    if rank == 0:
        torch.save(weights, os.path.join(out_dir, f"weights-{tag}.pt"))
    with open(os.path.join(out_dir, f"rank-{tag}-{rank}.json"), "w") as f:
        json.dump({"times": times, "reduced_bytes": reduced["pleas"], "images_per_rank": per_rank,
                   "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, f)
    distributed.shutdown()


def run(cmd: list, env: dict) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, env={**os.environ, **env, "PYTHONPATH": ROOT}, check=True, cwd=ROOT)
    return time.perf_counter() - t


def max_rel(w1: dict, w2: dict) -> float:
    worst = 0.0
    for k, v in w1.items():
        if v.is_floating_point():
            worst = max(worst, float((v - w2[k]).abs().max() / (v.abs().max() + 1e-12)))
    return worst


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calib", type=int, default=512)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "scaling.md"))
    p.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), int(args.worker[2]))
        return 0
    import tempfile

    common.source_pair("resnet18", "disjoint", 0)  # trained and cached before anything is timed
    # the workers' weights and reports: removed on success, error and Ctrl-C
    with tempfile.TemporaryDirectory(prefix="fxmerge-scaling-") as out_dir:
        return _measure(args, argv, out_dir)


def _measure(args, argv, out_dir: str) -> int:
    me = ["-m", "benchmarks.scaling"]
    n = args.nproc
    log("one process, 2 threads")
    run([sys.executable, *me, "--worker", out_dir, str(args.calib), "2"], {"OMP_NUM_THREADS": "2"})
    log("one process, 1 thread")
    run([sys.executable, *me, "--worker", out_dir, str(args.calib), "1"], {"OMP_NUM_THREADS": "1"})
    log(f"torchrun, {n} ranks x 1 thread")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    run([torchrun, "--standalone", f"--nproc_per_node={n}", *me, "--worker", out_dir, str(args.calib), "1"],
        {"OMP_NUM_THREADS": "1"})
    w = {tag: torch.load(os.path.join(out_dir, f"weights-{tag}.pt"), weights_only=True)
         for tag in ("1x2", "1x1", f"{n}x1")}
    ranks = [json.load(open(os.path.join(out_dir, f"rank-{n}x1-{r}.json"))) for r in range(n)]
    single2 = json.load(open(os.path.join(out_dir, "rank-1x2-0.json")))
    single1 = json.load(open(os.path.join(out_dir, "rank-1x1-0.json")))
    cmd = "python -m benchmarks.scaling " + " ".join(argv if argv is not None else sys.argv[1:])
    t_dist = max(r["times"]["pleas"] for r in ranks)
    lines = ["# Merging on several processes", "",
             f"Produced by `{cmd.strip()}`; {common.environment()}.", "",
             "## How to run it", "",
             "On one machine with N GPUs (each rank takes its local GPU; nccl):", "",
             "```",
             "torchrun --standalone --nproc_per_node N -m fxmerge.cli merge --arch resnet50 --a a.pth --b b.pth \\",
             "    --data /path/to/images --calib 4096 --budget 1.2 --device cuda -o merged.pt",
             "```", "",
             "On M machines (the same command on every machine; the rendezvous on the first):", "",
             "```",
             "torchrun --nnodes M --nproc_per_node N --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\",
             "    -m fxmerge.cli merge ... --device cuda -o merged.pt",
             "```", "",
             "On CPUs, `--device cpu` (gloo) with `OMP_NUM_THREADS` threads per rank. From Python, initialise the "
             "process group (`torch.distributed.init_process_group`) and call `fxmerge.merge` on every rank with the "
             "same data: each rank keeps its own shard (batch i goes to rank i mod N; `shard=False` when the caller "
             "gives each rank its own).", "",
             "## What is exchanged", "",
             "Every rank reads only its batches and runs every pass on them; before anything is solved the ranks "
             "sum their statistics with all-reduce: the matching correlations (per site, the cross-product and "
             "moments of A's and B's features; ZipIt!'s pooled ones), each layer's least-squares Gram matrix, "
             "cross-products and counts, the BatchNorm moments, the image counts. Every rank then solves the same "
             "systems the same way, so all ranks hold the same merged model; rank 0 writes it. The frontier of the "
             "fitting sweep stays on each rank. A rank that fails makes every rank fail with the same one-line "
             "error (ranks meet at a checkpoint before each collective), and every collective times out "
             "(FXMERGE_DIST_TIMEOUT seconds, default 600) instead of hanging.", "",
             f"All-reduced by the PLeaS merge of this run: **{ranks[0]['reduced_bytes'] / 2**20:.0f} MB** per rank "
             "(statistics in float64; their size depends on the model's widths, not on the number of images). "
             f"Peak memory per rank: {', '.join('%.0f MB' % r['maxrss_mb'] for r in ranks)} (one process: "
             f"{single2['maxrss_mb']:.0f} MB).", "",
             "## Measured on this machine", "",
             f"The suite's resnet18 pair, {args.calib} calibration images, images per rank "
             f"{ranks[0]['images_per_rank']}.", "",
             "| method | max relative weight difference, 2 ranks vs 1 process (1 thread) | vs 1 process (2 threads) |",
             "|---|---|---|"]
    for method, _ in METHODS:
        lines.append(f"| {method} | {max_rel(w['1x1'][method], w[f'{n}x1'][method]):.1e} | "
                     f"{max_rel(w['1x2'][method], w[f'{n}x1'][method]):.1e} |")
    lines += ["",
              "With the same number of BLAS threads per process the ranks' sums give the single process's "
              "statistics up to float64 rounding. The per-batch products are float32 and their rounding depends on "
              "the BLAS thread count; least squares amplifies that in the few layers whose systems are nearly "
              "singular (more columns than calibration samples), hence the larger figure against two threads.", "",
              "| PLeaS merge | wall time (s) |", "|---|---|",
              f"| 1 process x 2 threads | {single2['times']['pleas']:.1f} |",
              f"| 1 process x 1 thread | {single1['times']['pleas']:.1f} |",
              f"| {n} ranks x 1 thread | {t_dist:.1f} |", "",
              f"{n} ranks x 1 thread over 1 process x 2 threads: **{t_dist / single2['times']['pleas']:.2f}x** the time "
              f"({single2['times']['pleas'] / t_dist:.2f}x the speed); over 1 process x 1 thread: "
              f"**{single1['times']['pleas'] / t_dist:.2f}x** faster.", ""]
    common.write(args.out, lines)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
