"""Merge-engine performance, as ratios measured within one run.

1. Whole merge time over the time of running both source models across the
   same calibration images, for PLeaS with least-squares inputs ``merged``
   (the default) and ``ensemble``: both run the fitting sweep once over the
   graph.
2. Peak memory (max RSS of a fresh process) of a merge without a frontier
   (``schedule="recompute"``, every wave recomputed from the inputs) and with
   one under ``--max-memory``, at two calibration sizes; the images are
   generated batch by batch, so the data itself never sits in memory.
3. Least squares: the closed form versus 400 Adam steps on the same Gram
   statistics, layer by layer (time and final objective), on the layers with
   at most ``--adam-max-cols`` input columns (Adam's cost per step is one
   ``W G`` product).

Writes the report (``--out``) with the command that produced it.

    python benchmarks/performance.py [--arch resnet50] [--size 224] [--calib 512] [--device cpu]
        [--memory-calib 256,2048] [--memory-size 64] [--max-memory 2G] [--budget 1.2]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from fxmerge.runtime.memory import keep_freed_memory  # noqa: E402


def models(arch):
    import timm

    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        out.append(timm.create_model(arch, num_classes=10).eval())
    return out


class GeneratedBatches:
    """``n`` generic images in batches, generated when iterated (the same
    images on every pass), so memory does not hold the data set."""

    def __init__(self, n: int, size: int, batch: int = 32, seed: int = 0):
        self.n, self.size, self.batch, self.seed = n, size, batch, seed

    def __iter__(self):
        from fxmerge.runtime.data import generic

        for i, start in enumerate(range(0, self.n, self.batch)):
            yield generic(min(self.batch, self.n - start), self.size, seed=self.seed * 100_003 + i)

    def __len__(self):
        return (self.n + self.batch - 1) // self.batch


def batches(n, size, batch=32, seed=0):
    """The same images, materialised (timings then exclude their generation)."""
    return list(GeneratedBatches(n, size, batch, seed))


def block_mask(sysm, W0, has_bias):
    """1 where a row may read a column (its row block's columns), else 0."""
    from fxmerge.fit.lstsq import weight_columns
    from fxmerge.merging.widening import row_blocks

    mask = torch.ones_like(W0)
    if sysm.groups == 1:
        mask.zero_()
        ncol = W0.shape[-1]
        taps = (ncol - has_bias) // sysm.w_in.size
        for cols, rows in row_blocks(sysm.w_out, sysm.w_in):
            full = torch.as_tensor(weight_columns(cols, taps))
            if has_bias:
                full = torch.cat([full, torch.tensor([ncol - 1])])
            mask[0][torch.as_tensor(rows)[:, None], full[None]] = 1
    return mask


def adam_fit(sysm, weight, bias, ridge, steps=400, lr=1e-2):
    """Adam on the least-squares objective of one layer, with the same row-block
    mask and ridge as the closed form; returns the final data loss."""
    g = sysm.groups
    out = weight.shape[0]
    W0 = weight.detach().double().reshape(g, out // g, -1)
    if bias is not None:
        W0 = torch.cat([W0, bias.detach().double().reshape(g, out // g, 1)], -1)
    mask = block_mask(sysm, W0, bias is not None)
    lam = [ridge * float(torch.diagonal(sysm.gram[j]).sum()) / sysm.gram[j].shape[0] for j in range(g)]
    W = (W0 * mask).clone().requires_grad_(True)
    opt = torch.optim.Adam([W], lr=lr * float(W0.abs().mean() + 1e-8))
    for _ in range(steps):
        opt.zero_grad()
        loss = 0
        for j in range(g):
            Wj = W[j] * mask[j]
            loss = loss + (torch.sum((Wj @ sysm.gram[j]) * Wj) - 2 * torch.sum(Wj.T * sysm.cross[j])
                           + lam[j] * torch.sum((Wj - W0[j]) ** 2))
        loss.backward()
        opt.step()
    with torch.no_grad():
        return sum(objective(sysm.gram[j], sysm.cross[j], sysm.yy[j], W[j] * mask[j], W0[j] * mask[j], lam[j])
                   for j in range(g))


def objective(G, C, yy, W, W0, lam) -> float:
    """The ridge objective both solvers minimise: data loss + lam ||W - W0||^2."""
    from fxmerge.fit.solve import layer_loss

    return layer_loss(G, C, yy, W) + lam * float(torch.sum((W - W0) ** 2))


def closed_objective(sysm, weight, bias, ridge, new_weight, new_bias) -> float:
    """The objective of the closed form's weights, summed over its row blocks
    exactly as ``adam_fit`` masks them (the mask is zero elsewhere)."""
    g = sysm.groups
    out = weight.shape[0]

    def flat(w, b):
        W = w.detach().double().reshape(g, out // g, -1)
        return W if b is None else torch.cat([W, b.detach().double().reshape(g, out // g, 1)], -1)

    return adam_like(sysm, flat(weight, bias), flat(new_weight, new_bias), bias is not None, ridge)


def adam_like(sysm, W0, W, has_bias, ridge) -> float:
    mask = block_mask(sysm, W0, has_bias)
    lam = [ridge * float(torch.diagonal(sysm.gram[j]).sum()) / sysm.gram[j].shape[0] for j in range(sysm.groups)]
    return sum(objective(sysm.gram[j], sysm.cross[j], sysm.yy[j], W[j] * mask[j], W0[j] * mask[j], lam[j])
               for j in range(sysm.groups))


def least_squares_vs_adam(arch, size, calib, budget, max_cols):
    """Collect the Gram systems of one merge, then time both solvers layer by
    layer on the same statistics."""
    import fxmerge
    from fxmerge.fit.solve import solve_layer

    captured = {}
    ridge = fxmerge.constants.DEFAULT_RIDGE

    def capture(sysm, weight, bias):
        gram, cross, yy = sysm.dense()  # the weight's own order, as block_mask reads it
        captured[sysm.node] = (sysm, weight.detach().clone(), None if bias is None else bias.detach().clone(), ridge,
                               gram.clone(), cross.clone(), yy.clone())

    a, b = models(arch)
    fxmerge.merge(a, b, batches(calib, size), budget=budget, method="pleas", ls_inputs="ensemble", ridge=ridge,
                  bn_stats="reset", ls_targets="output", on_least_squares=capture)
    out = {"layers": len(captured), "closed_all_s": 0.0, "subset": 0, "closed_s": 0.0, "adam_s": 0.0,
           "closed_obj": 0.0, "adam_obj": 0.0, "max_cols": max_cols, "largest_cols": 0}
    for sysm, w, bias, ridge, G, C, yy in captured.values():
        sysm.gram, sysm.cross, sysm.yy, sysm.layout = G, C, yy, None
        cols = G.shape[-1]
        out["largest_cols"] = max(out["largest_cols"], cols)
        t = time.perf_counter()
        new_w, new_b = solve_layer(sysm, w, bias, ridge)
        dt = time.perf_counter() - t
        out["closed_all_s"] += dt
        if cols > max_cols:
            continue
        out["subset"] += 1
        out["closed_s"] += dt
        out["closed_obj"] += closed_objective(sysm, w, bias, ridge, new_w, new_b)
        t = time.perf_counter()
        out["adam_obj"] += adam_fit(sysm, w, bias, ridge)
        out["adam_s"] += time.perf_counter() - t
    return out


def merge_vs_forward(arch, size, calib, budget, ls_inputs, device="cpu"):
    import fxmerge

    a, b = (m.to(device) for m in models(arch))
    data = [x.to(device) for x in batches(calib, size)]
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    with torch.no_grad():  # warm-up: the first forward pass allocates, the timed ones do not
        a(data[0])
        b(data[0])
    sync()

    def both_models() -> float:
        t = time.perf_counter()
        with torch.no_grad():
            for x in data:
                a(x)
                b(x)
        sync()
        return time.perf_counter() - t

    before = both_models()
    t = time.perf_counter()
    res = fxmerge.merge(a, b, data, budget=budget, method="pleas", ls_inputs=ls_inputs, device=device)
    sync()
    t_merge = time.perf_counter() - t
    # the machine's speed drifts over a merge's minutes: both models are timed
    # right before and right after it, and the ratio reads their mean
    after = both_models()
    t_fwd = (before + after) / 2
    return {"calib": calib, "ls_inputs": ls_inputs, "forward_both_s": t_fwd, "merge_s": t_merge,
            "forward_both_before_after_s": (before, after),
            "timings": res.report["timings"], "waves": res.report["sweep"].get("waves"),
            "sweep_split": {k: res.report["sweep"].get(f"{k}_seconds", 0.0) for k in ("forward", "frontier", "statistics", "solve")},
            "frontier_peak_mb": res.report["sweep"].get("frontier_peak_bytes", 0) / 2**20,
            "cost_planned": res.report["cost_planned"], "cost_measured": res.report["cost_measured"]}


SPILL_NOTE = ("The frontier's in-memory part is capped at `--max-memory` less the largest wave's statistics and "
              "solve; whatever does not fit spills to disk. A larger calibration set first fills that cap, so the peak grows by "
              "up to the cap's free part, then stays put (the spilled column grows instead).")


def peak_rss_mb() -> float:
    """This process's peak resident memory. On Linux the high-water mark of
    its own address space (VmHWM): ``ru_maxrss`` also counts the parent's
    resident memory at the fork that started this process, which after the
    timing runs is larger than any of the measured merges."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_memory(arch, size, calib, budget, schedule, max_memory):
    import fxmerge

    a, b = models(arch)
    res = fxmerge.merge(a, b, GeneratedBatches(calib, size), budget=budget, method="pleas", schedule=schedule,
                        max_memory=max_memory or None)
    sweep = res.report["sweep"]
    print(json.dumps({"maxrss_mb": peak_rss_mb(),
                      "frontier_peak_mb": sweep.get("frontier_peak_bytes", 0) / 2**20,
                      "frontier_memory_mb": sweep.get("frontier_peak_memory_bytes", 0) / 2**20,
                      "spilled_mb": sweep.get("frontier_spilled_bytes", 0) / 2**20}))


def memory_run(args, schedule, n, max_memory):
    out = subprocess.run([sys.executable, "-m", "benchmarks.performance", "--arch", args.arch, "--memory-size", str(args.memory_size),
                          "--budget", str(args.budget), "--child-memory", str(n), "--child-schedule", schedule,
                          "--child-max-memory", max_memory or ""], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--calib", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.add_argument("--ls-calib", type=int, default=64)
    p.add_argument("--adam-max-cols", type=int, default=320, help="Adam runs on the layers with at most this many "
                   "input columns (its cost per step is rows x columns^2); 0 skips the comparison")
    p.add_argument("--memory-calib", default="256,2048")
    p.add_argument("--memory-size", type=int, default=64)
    p.add_argument("--max-memory", default="2G", help="the frontier's cap in the memory runs")
    p.add_argument("--budget", type=float, default=1.2)
    p.add_argument("--child-memory", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--child-schedule", default="frontier", help=argparse.SUPPRESS)
    p.add_argument("--child-max-memory", default="", help=argparse.SUPPRESS)
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "performance.md"))
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    keep_freed_memory()  # the command line's allocator setting, in every process of the benchmark
    if args.child_memory:
        child_memory(args.arch, args.memory_size, args.child_memory, args.budget, args.child_schedule,
                     args.child_max_memory)
        return
    # every option spelled out, so the command reproduces the run whatever the defaults become
    cmd = "python -m benchmarks.performance " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if not k.startswith("child") and k != "out")
    import fxmerge

    ls = least_squares_vs_adam(args.arch, args.size, args.ls_calib, args.budget, args.adam_max_cols) \
        if args.adam_max_cols else None
    if ls:
        print("least squares:", ls, flush=True)
    sizes = [int(v) for v in args.memory_calib.split(",")] if args.memory_calib else []
    mem = {}
    if sizes:
        mem[("recompute", sizes[0])] = memory_run(args, "recompute", sizes[0], None)
        print("memory recompute", sizes[0], mem[("recompute", sizes[0])], flush=True)
        for n in sizes:
            mem[("frontier", n)] = memory_run(args, "frontier", n, args.max_memory)
            print("memory frontier", n, mem[("frontier", n)], flush=True)
    mfs = {}
    for ls_inputs in ("merged", "ensemble"):
        mfs[ls_inputs] = merge_vs_forward(args.arch, args.size, args.calib, args.budget, ls_inputs, args.device)
        print("merge vs forward:", mfs[ls_inputs], flush=True)
    lines = [
        f"# Merge-engine performance: {args.arch}",
        "",
        f"Produced by `{cmd}` (fxmerge {fxmerge.__version__}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads, {platform.processor() or platform.machine()}, device {args.device}). "
        "Random-init source models (seeds 0 and 1, 10 classes), generic calibration images, budget "
        f"{args.budget}x, every other option at its default; the C allocator set up as the command line sets it (freed memory kept for "
        "reuse: fxmerge/runtime/memory.py). Every figure below is a ratio within this run.",
        "",
    ] + ([] if str(args.device).startswith("cuda") else [
        "CUDA figures: not yet measured (no GPU has been available to this project). On a machine with one, "
        "`make gpu-check` (`benchmarks/gpu_check.sh`) runs the CUDA tests and writes docs/performance-cuda.md and "
        "docs/performance-cuda-vit.md.",
        "",
    ]) + [
        f"## Whole merge vs running both models ({args.size}x{args.size}, {args.calib} images)",
        "",
        "The fitting sweep walks the graph once, wave by wave, keeping the values later waves read (the frontier); "
        "`merged` least-squares inputs fit each layer on the merged model's own inputs, `ensemble` on the permuted "
        "ensemble's (teacher forcing).",
        "",
        "| least-squares inputs | sweep waves | frontier peak (MB) | both models before / after (s) | both models, "
        "mean (s) | PLeaS merge (s) | merge / both |",
        "|---|---|---|---|---|---|---|",
    ] + [f"| {m['ls_inputs']} | {m['waves']} | {m['frontier_peak_mb']:.0f} | "
         f"{m['forward_both_before_after_s'][0]:.1f} / {m['forward_both_before_after_s'][1]:.1f} | "
         f"{m['forward_both_s']:.1f} | {m['merge_s']:.1f} | **{m['merge_s'] / m['forward_both_s']:.2f}x** |"
         for m in mfs.values()] + [
        "",
        "Each row times both models right before and right after its own merge and divides by the mean of the two, "
        "so a row's `merge / both` is a ratio between timings taken under the same load; the machine's speed can "
        "change between rows.",
        "",
        f"`merged` / `ensemble` merge time: **{mfs['merged']['merge_s'] / mfs['ensemble']['merge_s']:.2f}x** "
        f"in seconds; **{(mfs['merged']['merge_s'] / mfs['merged']['forward_both_s']) / (mfs['ensemble']['merge_s'] / mfs['ensemble']['forward_both_s']):.2f}x** "
        "as multiples of each row's own run of both models.",
        "",
    ] + [f"Phases with `{m['ls_inputs']}` inputs (s): " + ", ".join(f"{k} {v:.1f}" for k, v in m["timings"].items())
         + f". Cost planned {m['cost_planned']:.4f}x, measured on the emitted graph {m['cost_measured']:.4f}x. "
         "Inside the fitting sweep (s, and as multiples of running both models): "
         + ", ".join(f"{k} {v:.1f} ({v / m['forward_both_s']:.2f}x)" for k, v in m["sweep_split"].items())
         + " (forward: the three models' nodes; frontier: storing the values later waves read, in memory or "
         "spilled to disk, and reading them back; statistics: sampling rows and adding the Gram and cross products; "
         "solve: the Cholesky solves and the loss report)."
         for m in mfs.values()]
    if mem:
        rec = mem[("recompute", sizes[0])]
        lines += [
            "",
            f"## Peak memory ({args.memory_size}x{args.memory_size} images, fresh processes)",
            "",
            f"`recompute`: no frontier, every wave recomputed from the inputs; `frontier` with `--max-memory "
            f"{args.max_memory}` (the frontier, the statistics and the largest solve; beyond it the frontier spills to disk).",
            "",
            "| schedule | images | peak RSS (MB) | frontier peak (MB) | in memory (MB) | spilled (MB) |",
            "|---|---|---|---|---|---|",
            f"| recompute | {sizes[0]} | {rec['maxrss_mb']:.0f} | 0 | 0 | 0 |",
        ] + [f"| frontier | {n} | {mem[('frontier', n)]['maxrss_mb']:.0f} | {mem[('frontier', n)]['frontier_peak_mb']:.0f} | "
             f"{mem[('frontier', n)]['frontier_memory_mb']:.0f} | {mem[('frontier', n)]['spilled_mb']:.0f} |"
             for n in sizes] + [
            "",
            f"Frontier over recompute at {sizes[0]} images: **{mem[('frontier', sizes[0])]['maxrss_mb'] - rec['maxrss_mb']:+.0f} MB**; "
            f"growth of the frontier run's peak from {sizes[0]} to {sizes[-1]} images: "
            f"**{100 * (mem[('frontier', sizes[-1])]['maxrss_mb'] / mem[('frontier', sizes[0])]['maxrss_mb'] - 1):.1f}%**.",
            "",
            SPILL_NOTE,
        ]
    if ls:
        lines += [
            "",
            f"## Least squares: closed form vs 400 Adam steps ({args.ls_calib} images at {args.size}x{args.size})",
            "",
            f"The statistics of one merge ({ls['layers']} layers; the largest system has {ls['largest_cols']} columns). "
            f"Adam minimises the same ridge objective over the same row blocks; it runs on the {ls['subset']} layers "
            f"with at most {ls['max_cols']} columns.",
            "",
            "| solver | layers | time (s) | objective (data + ridge) |",
            "|---|---|---|---|",
            f"| closed form | {ls['subset']} | {ls['closed_s']:.2f} | {ls['closed_obj']:.6g} |",
            f"| Adam, 400 steps | {ls['subset']} | {ls['adam_s']:.2f} | {ls['adam_obj']:.6g} |",
            f"| closed form | all {ls['layers']} | {ls['closed_all_s']:.2f} | |",
            "",
            f"Speed-up on the same layers: **{ls['adam_s'] / max(ls['closed_s'], 1e-9):.0f}x**; objective ratio "
            f"closed/Adam: **{ls['closed_obj'] / ls['adam_obj']:.4f}** (below 1: the closed form is lower).",
        ]
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, args.out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
