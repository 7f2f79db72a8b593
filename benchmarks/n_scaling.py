"""How a merge's time and memory grow with the number of models N.

For N = 2, 3, 4 random-init source models (seeds 0..N-1) of one
architecture, each N in a fresh process: the time of running the N sources
over the calibration images (before and after the merge; their mean), the
PLeaS merge's time and its phases, and the process's peak resident memory.
Ratios are read within each process (merge / running the sources) and
across N (each N against N = 2).

    python -m benchmarks.n_scaling [--arch resnet18] [--size 224] [--calib 256] [--n 2,3,4]
        --out docs/performance-n-models.md
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from benchmarks.common import ROOT, environment, log, write
from benchmarks.performance import GeneratedBatches, peak_rss_mb


def child(arch: str, n: int, size: int, calib: int, budget: float) -> dict:
    import timm

    import fxmerge
    from fxmerge.runtime.memory import keep_freed_memory

    keep_freed_memory()
    models = []
    for seed in range(n):
        torch.manual_seed(seed)
        models.append(timm.create_model(arch, num_classes=10).eval())
    data = GeneratedBatches(calib, size)

    def sources() -> float:
        t = time.perf_counter()
        with torch.no_grad():
            for x in data:
                for m in models:
                    m(x)
        return time.perf_counter() - t

    before = sources()
    t = time.perf_counter()
    res = fxmerge.merge(models, data, budget=budget, method="pleas")
    merge_s = time.perf_counter() - t
    after = sources()
    r = res.report
    return {"n": n, "load": os.getloadavg()[0], "sources_s": (before + after) / 2, "sources_before_after_s": (before, after), "merge_s": merge_s,
            "timings": r["timings"], "peak_rss_mb": peak_rss_mb(),
            "frontier_peak_mb": r["sweep"].get("frontier_peak_bytes", 0) / 2**20,
            "cost_measured": r["cost_measured"], "rounds": r.get("universe", {}).get("rounds")}


def run_child(args, n: int) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.n_scaling", "--child", str(n), "--arch", args.arch, "--size",
           str(args.size), "--calib", str(args.calib), "--budget", str(args.budget), "--threads", str(args.threads),
           "--out", args.out]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(args, argv, rows: list, minutes: float) -> list:
    base = rows[0]
    lines = [f"# Merging N models: time and memory against N ({args.arch})", "",
             f"Produced by `python -m benchmarks.n_scaling {' '.join(argv)}` in {minutes:.1f} "
             f"minutes; {environment()}.", "",
             f"Random-init {args.arch} source models (seeds 0..N-1, 10 classes), {args.calib} generic "
             f"{args.size}x{args.size} calibration images generated batch by batch, PLeaS at budget {args.budget}x "
             "with every other option at its default; each N in a fresh process. `sources` is the time of running "
             "the N sources over the calibration images (the mean of a run before and one after the merge).", "",
             "| N | sources (s) | merge (s) | merge / sources | merge / merge at N=2 | N / 2 | peak RSS (MB) | "
             "RSS / RSS at N=2 | frontier peak (MB) | universe rounds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n']} | {r['sources_s']:.1f} | {r['merge_s']:.1f} | {r['merge_s'] / r['sources_s']:.2f}x | "
                     f"{r['merge_s'] / base['merge_s']:.2f}x | {r['n'] / base['n']:.2f}x | {r['peak_rss_mb']:.0f} | "
                     f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x | {r['frontier_peak_mb']:.0f} | "
                     f"{r['rounds'] if r['rounds'] is not None else '-'} |")
    lines += ["", "The machine's load (1-minute average) when each process ended: "
              + ", ".join(f"N = {r['n']}: {r['load']:.1f}" for r in rows) + f" on {os.cpu_count()} CPU threads; "
              "each row's ratios compare timings taken under that load.", "", "Phases (s):", ""]
    for r in rows:
        t = r["timings"]
        lines.append(f"- N = {r['n']}: " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))
    lines += ["", "Matching runs one lockstep pass of the N models per alignment round (two models: one pass), "
              "then one pass for the per-pair agreement at equal positions; the fitting sweep runs the N sources "
              "and the merged model once. The statistics held at once are N universe correlations per site and "
              "N(N-1)/2 vectors, so they grow linearly with N."]
    return lines


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--calib", type=int, default=256)
    p.add_argument("--budget", type=float, default=1.5)
    p.add_argument("--n", default="2,3,4")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", type=int, default=0)
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "performance-n-models.md"))
    args = p.parse_args(argv)
    if args.child:
        torch.set_num_threads(args.threads)
        print(json.dumps(child(args.arch, args.child, args.size, args.calib, args.budget)))
        return 0
    t0 = time.perf_counter()
    rows = []
    for n in (int(v) for v in args.n.split(",")):
        log(f"N = {n} ...")
        rows.append(run_child(args, n))
        log(f"  merge {rows[-1]['merge_s']:.1f}s, sources {rows[-1]['sources_s']:.1f}s, "
            f"peak {rows[-1]['peak_rss_mb']:.0f} MB")
    write(args.out, report(args, argv, rows, (time.perf_counter() - t0) / 60))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
