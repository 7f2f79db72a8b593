"""The fitting stage's passes: the merged model's least-squares weights and
its BatchNorm statistics, in one sweep over the graph.

    least_squares     PLeaS's layer systems (inputs: ``ls_inputs``)   -> the sweep's points
    regmean           RegMean's (each model's inputs, stacked)         -> the sweep's points
    batch_norm_sweep  under ``bn_stats="sweep"``: the BatchNorm points -> the sweep's points
    sweep             one walk over the graph and the data             -> weights, statistics
    batch_norm_reset  under ``bn_stats="reset"``: one train-mode pass  -> BatchNorm statistics

The point-gathering passes only add to ``st.fit_points``: the sweep pass
runs every point in one walk.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch

from fxmerge.errors import BudgetWarning, InputError, MemoryWarning
from fxmerge.merging.pipeline import MergeState, merge_pass, with_progress
from fxmerge.merging.rewrite import module_row_blocks
from fxmerge.runtime.tensors import owner_of, set_tensor

from .batchnorm import batch_norm_points, reset_batch_norm
from .lstsq import LeastSquaresPoint, conv_weight, following_batch_norm, from_conv_weight, layer_systems
from .solve import regmean_layer, solve_layer
from .sweep import Sweep, slotted, wave_bytes

REGMEAN_ALPHA = 0.9  # off-diagonal scaling of RegMean's Gram matrices (its authors' default)


@merge_pass("least_squares", "fit")
def pass_least_squares(st: MergeState) -> None:
    """PLeaS: every widened layer refitted to the permuted ensemble's outputs
    on the inputs ``ls_inputs`` names (the merged model's own by default)."""
    add_least_squares(st, st.opts.ls_inputs)


@merge_pass("regmean", "fit")
def pass_regmean(st: MergeState) -> None:
    """RegMean: every layer's closed form over both models' own inputs."""
    add_least_squares(st, "stacked")


def add_least_squares(st: MergeState, inputs: str) -> None:
    """The least-squares points of every layer (those within ``max_memory``)
    for the sweep, and the report's least-squares entry."""
    o = st.opts
    unfit: list = []
    systems, _ = layer_systems(st.pg, st.merged, st.gm_a, st.widener, stacked=inputs == "stacked", unfit=unfit)
    if unfit:
        names = ", ".join(f"'{k}'" for k in unfit[:3]) + (f" (+{len(unfit) - 3} more)" if len(unfit) > 3 else "")
        message = (f"least squares skipped for {len(unfit)} layer(s) applied along an axis other than their channels "
                   f"while the channels widen: {names}; they keep their permuted weights")
        warnings.warn(message, BudgetWarning, stacklevel=5)
        st.warnings.append(message)
        st.skipped_layers += list(unfit)
    per_layer: dict = {}
    models = slotted(st.sources, st.merged)
    solve = solver(st, per_layer)
    normalized = o.ls_targets == "normalized" and o.bn_stats == "source" and inputs != "stacked"
    points = [LeastSquaresPoint(key, sysm, models, inputs, o.positions, o.seed, solve,
                                norm=following_batch_norm(st.merged, sysm.node) if normalized and sysm.taps is None
                                else None)
              for key, sysm in systems.items()]
    points = within_memory(points, st)
    st.fit_points += points
    st.least_squares = {"layers": len(points), "ridge": o.ridge, "inputs": inputs, "passes": 1, "per_layer": per_layer}


@merge_pass("batch_norm_sweep", "fit")
def pass_batch_norm_sweep(st: MergeState) -> None:
    """Under ``bn_stats="sweep"``: each BatchNorm re-estimated on the merged
    model's own activations, inside the sweep."""
    if st.opts.bn_stats == "sweep":
        st.fit_points += batch_norm_points(st.merged)


@merge_pass("sweep", "fit")
def pass_sweep(st: MergeState) -> None:
    """One walk over the graph and the calibration data that completes every
    point gathered (least squares solved, statistics written)."""
    o = st.opts
    if not st.fit_points:
        return
    models = slotted(st.sources, st.merged)
    sweep = Sweep(models, st.fit_points, schedule=o.schedule, max_memory=o.max_memory,
                  frontier_dtype=getattr(torch, o.frontier_dtype), spill_dir=o.spill_dir, progress=o.progress,
                  desc="fit", row_blocks={target: (kind, ins, outs) for target, kind, ins, outs, _ in
                                          module_row_blocks(st.merged, st.pg, st.widener) if kind is not None})
    st.sweep = sweep.run(st.batches)
    if st.least_squares and o.schedule == "recompute":
        st.least_squares["passes"] = st.sweep["waves"]


def solver(st: MergeState, per_layer: dict) -> Callable:
    """What a least-squares point does when its statistics are complete:
    solve (PLeaS's ridge toward the permuted weights, or RegMean's) and
    write the weights into the merged model."""
    o = st.opts

    def solve(point) -> None:
        sysm = point.sysm
        merged = st.merged
        module = owner_of(merged, sysm.weight) if sysm.taps is None else None
        as_conv = (lambda w: conv_weight(module, w)) if module is not None else (lambda w: w)
        weight = as_conv(merged.get_parameter(sysm.weight))
        bias = merged.get_parameter(sysm.bias) if sysm.bias is not None else None
        if o.on_least_squares is not None:
            o.on_least_squares(sysm, weight, bias)
        if point.inputs == "stacked":
            src = [(as_conv(gm.get_parameter(sysm.weight)), gm.get_parameter(sysm.bias) if sysm.bias else None)
                   for gm in st.sources]
            w_new, bias = regmean_layer(sysm, [w for w, _ in src], [b for _, b in src], REGMEAN_ALPHA, o.ridge)
        else:
            w_new, bias = solve_layer(sysm, weight, bias, o.ridge)
        if module is not None:
            w_new = from_conv_weight(module, w_new)
        if not torch.isfinite(w_new).all():
            raise InputError(f"least squares for '{point.key}' produced non-finite weights: give more calibration data "
                             "or a larger ridge")
        set_tensor(merged, sysm.weight, w_new)
        if bias is not None:
            set_tensor(merged, sysm.bias, bias)
        per_layer[point.key] = {"samples": sysm.n, "loss_init": sysm.loss_init, "loss_fit": sysm.loss_fit}

    return solve


def within_memory(points: list, st: MergeState) -> list:
    """Least-squares points whose statistics fit in ``max_memory``; the
    others keep their initial weights, with a warning."""
    keep, skipped = [], []
    for p in points:
        (keep if wave_bytes([p]) <= st.opts.max_memory else skipped).append(p)
    if skipped:
        names = ", ".join(f"'{p.key}' ({wave_bytes([p]) / 2**30:.1f} GiB)" for p in skipped[:3])
        warnings.warn(f"least squares skipped for {len(skipped)} layer(s) whose statistics and solve exceed max_memory "
                      f"({st.opts.max_memory / 2**30:.1f} GiB): {names}; they keep their permuted weights",
                      MemoryWarning, stacklevel=6)
        st.skipped_layers = [p.key for p in skipped]
    return keep


@merge_pass("batch_norm_reset", "batchnorm_reset")
def pass_batch_norm_reset(st: MergeState) -> None:
    """Under ``bn_stats="reset"``: BatchNorm statistics recomputed in one
    train-mode pass over the calibration data, after fitting."""
    if st.opts.bn_stats == "reset":
        reset_batch_norm(st.merged, with_progress(st.batches(), st.opts.progress, "batchnorm reset"))
