"""Merge-engine performance, as ratios measured within one run.

1. Least squares: the closed form over every layer of the model versus 400
   Adam steps on the same Gram statistics (time and final loss).
2. Whole merge time over the time of running both source models across the
   calibration data.
3. Peak memory (max RSS of a fresh process) of a merge at two calibration sizes.

Writes docs/performance.md with the command that produced it.

    python benchmarks/performance.py [--arch resnet50] [--size 224] [--calib 512]
        [--memory-calib 256,2048] [--memory-size 64] [--budget 1.2]
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def models(arch):
    import timm

    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        out.append(timm.create_model(arch, num_classes=10).eval())
    return out


def batches(n, size, batch=32, seed=0):
    from fxmerge.data import generic

    x = generic(n, size, seed=seed)
    return [x[i:i + batch] for i in range(0, n, batch)]


def adam_fit(sysm, weight, bias, ridge, steps=400, lr=1e-2):
    """Adam on the least-squares objective of one layer, with the same row-block
    mask and ridge as the closed form; returns the final data loss."""
    from fxmerge.lstsq import layer_loss
    from fxmerge.rewrite import row_blocks

    g = sysm.groups
    out = weight.shape[0]
    W0 = weight.detach().double().reshape(g, out // g, -1)
    if bias is not None:
        W0 = torch.cat([W0, bias.detach().double().reshape(g, out // g, 1)], -1)
    mask = torch.ones_like(W0)
    if g == 1:
        mask.zero_()
        ncol = W0.shape[-1]
        taps = (ncol - (bias is not None)) // sysm.w_in.size
        for cols, rows in row_blocks(sysm.w_out, sysm.w_in):
            full = (torch.as_tensor(cols)[:, None] * taps + torch.arange(taps)[None]).reshape(-1)
            if bias is not None:
                full = torch.cat([full, torch.tensor([ncol - 1])])
            mask[0][torch.as_tensor(rows)[:, None], full[None]] = 1
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
        return sum(layer_loss(sysm.gram[j], sysm.cross[j], sysm.yy[j], W[j] * mask[j]) for j in range(g))


def least_squares_vs_adam(arch, size, calib, budget):
    """Collect the Gram systems of one merge, then time both solvers."""
    import fxmerge.engine as engine
    from fxmerge.lstsq import solve_layer

    captured = {}
    original = engine.solve_layer

    def capture(sysm, weight, bias, ridge):
        captured[sysm.node] = (sysm, weight.detach().clone(), None if bias is None else bias.detach().clone(), ridge,
                               sysm.gram.clone(), sysm.cross.clone(), sysm.yy.clone())
        return original(sysm, weight, bias, ridge)

    engine.solve_layer = capture
    try:
        a, b = models(arch)
        engine.merge(a, b, batches(calib, size), budget=budget, method="pleas")
    finally:
        engine.solve_layer = original
    t = time.perf_counter()
    closed = 0.0
    for sysm, w, bias, ridge, G, C, yy in captured.values():
        sysm.gram, sysm.cross, sysm.yy = G, C, yy
        solve_layer(sysm, w, bias, ridge)
        closed += sysm.loss_fit
    t_closed = time.perf_counter() - t
    t = time.perf_counter()
    adam = 0.0
    for sysm, w, bias, ridge, G, C, yy in captured.values():
        sysm.gram, sysm.cross, sysm.yy = G, C, yy
        adam += adam_fit(sysm, w, bias, ridge)
    t_adam = time.perf_counter() - t
    return {"layers": len(captured), "closed_s": t_closed, "adam_s": t_adam, "closed_loss": closed, "adam_loss": adam}


def merge_vs_forward(arch, size, calib, budget):
    import fxmerge

    a, b = models(arch)
    data = batches(calib, size)
    t = time.perf_counter()
    with torch.no_grad():
        for x in data:
            a(x)
            b(x)
    t_fwd = time.perf_counter() - t
    t = time.perf_counter()
    res = fxmerge.merge(a, b, data, budget=budget, method="pleas")
    t_merge = time.perf_counter() - t
    return {"forward_both_s": t_fwd, "merge_s": t_merge, "timings": res.report["timings"],
            "cost_planned": res.report["cost_planned"], "cost_measured": res.report["cost_measured"]}


def child_memory(arch, size, calib, budget):
    import fxmerge

    a, b = models(arch)
    fxmerge.merge(a, b, batches(calib, size), budget=budget, method="pleas")
    print(json.dumps({"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--calib", type=int, default=512)
    p.add_argument("--ls-calib", type=int, default=64)
    p.add_argument("--memory-calib", default="256,2048")
    p.add_argument("--memory-size", type=int, default=64)
    p.add_argument("--budget", type=float, default=1.2)
    p.add_argument("--child-memory", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "performance.md"))
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if args.child_memory:
        child_memory(args.arch, args.memory_size, args.child_memory, args.budget)
        return
    cmd = "python benchmarks/performance.py " + " ".join(sys.argv[1:])
    ls = least_squares_vs_adam(args.arch, args.size, args.ls_calib, args.budget)
    print("least squares:", ls, flush=True)
    mf = merge_vs_forward(args.arch, args.size, args.calib, args.budget)
    print("merge vs forward:", mf, flush=True)
    mem = {}
    for n in [int(v) for v in args.memory_calib.split(",")]:
        out = subprocess.run([sys.executable, __file__, "--arch", args.arch, "--memory-size", str(args.memory_size),
                              "--budget", str(args.budget), "--child-memory", str(n)],
                             capture_output=True, text=True, check=True)
        mem[n] = json.loads(out.stdout.strip().splitlines()[-1])["maxrss_mb"]
        print("memory", n, mem[n], flush=True)
    sizes = sorted(mem)
    lines = [
        "# Merge-engine performance",
        "",
        f"Produced by `{cmd}` (torch {torch.__version__}, {os.cpu_count()} CPU threads). "
        "Random-init source models (seeds 0 and 1), generic calibration images. All figures are ratios within this run.",
        "",
        f"## Least squares: closed form vs 400 Adam steps ({args.arch}, {args.size}x{args.size}, {args.ls_calib} images, budget {args.budget}x)",
        "",
        "| solver | time (s) | summed layer loss |",
        "|---|---|---|",
        f"| closed form ({ls['layers']} layers) | {ls['closed_s']:.2f} | {ls['closed_loss']:.6g} |",
        f"| Adam, 400 steps | {ls['adam_s']:.2f} | {ls['adam_loss']:.6g} |",
        "",
        f"Speed-up: **{ls['adam_s'] / ls['closed_s']:.1f}x**; loss ratio closed/Adam: {ls['closed_loss'] / ls['adam_loss']:.4f}.",
        "",
        f"## Whole merge vs running both models ({args.arch}, {args.size}x{args.size}, {args.calib} images, budget {args.budget}x)",
        "",
        f"Both source models over the data: {mf['forward_both_s']:.1f} s. PLeaS merge: {mf['merge_s']:.1f} s. "
        f"Ratio: **{mf['merge_s'] / mf['forward_both_s']:.2f}x**.",
        "",
        "Phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in mf["timings"].items()),
        "",
        f"Cost planned {mf['cost_planned']:.4f}x, measured on the emitted graph {mf['cost_measured']:.4f}x.",
        "",
        f"## Peak memory vs calibration size ({args.arch}, {args.memory_size}x{args.memory_size}, budget {args.budget}x)",
        "",
        "| calibration images | max RSS (MB) |",
        "|---|---|",
    ] + [f"| {n} | {mem[n]:.0f} |" for n in sizes] + [
        "",
        f"Growth from {sizes[0]} to {sizes[-1]} images: **{100 * (mem[sizes[-1]] / mem[sizes[0]] - 1):.1f}%**.",
        "",
    ]
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
