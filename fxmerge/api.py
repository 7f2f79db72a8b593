"""``merge``: the pipeline of passes a method's record lists.

``merge`` checks its options once (``fxmerge.options``), checks the models
and reads the calibration data (``fxmerge.runtime.validate``), builds the
``MergeState`` and runs the passes of the method's record
(``fxmerge.methods``) through the pass registry
(``fxmerge.merging.pipeline``); the result is the merged GraphModule, its
plan and its report (``fxmerge.report``).
"""
from __future__ import annotations

import copy
import time
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.nn as nn

from fxmerge import constants as C
from fxmerge.errors import FxmergeError, InputError
import fxmerge.fit.passes  # noqa: F401  (registers the fitting passes)
import fxmerge.merging.passes  # noqa: F401  (registers the merging passes)
import fxmerge.merging.zip_passes  # noqa: F401  (registers ZipIt!'s passes)
from fxmerge.merging.pipeline import MergeOptions, MergeState, run_passes
from fxmerge.methods import get_method
from fxmerge.options import merge_options
from fxmerge.report import MergePlan, MergeResult, build_report, describe_plan
from fxmerge.runtime import distributed as dist
from fxmerge.runtime.inputs import as_inputs, calibration_inputs, forward_inputs
from fxmerge.runtime.validate import (check_finite_state, check_same_architecture, count_images, example_from,
                                      model_name, reiterable)

__all__ = ["merge", "MergeResult", "MergePlan"]


def merge(
    model_a: nn.Module | Sequence[nn.Module],
    model_b: nn.Module | Iterable,
    data: Optional[Iterable] = None,
    *,
    budget: float = 1.0,
    method: str = C.DEFAULT_METHOD,
    labels: str = "shared",
    example_inputs: Any = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    matching: Optional[str] = None,
    ridge: float = C.DEFAULT_RIDGE,
    positions: int = C.DEFAULT_POSITIONS,
    bn_stats: Optional[str] = None,
    reset_bn: Optional[bool] = None,
    norm_policy: str = C.DEFAULT_NORM_POLICY,
    ls_inputs: str = C.DEFAULT_LS_INPUTS,
    max_memory: Any = None,
    frontier_dtype: str = "float32",
    schedule: str = "frontier",
    spill_dir: Optional[str] = None,
    planner: str = C.DEFAULT_PLANNER,
    ls_targets: str = C.DEFAULT_LS_TARGETS,
    strict: bool = False,
    shard: bool = True,
    zip_heads: str = "align",
    universe: str = C.DEFAULT_UNIVERSE,
    batch_inputs: Optional[Callable] = None,
    progress: bool = False,
    on_least_squares: Optional[Callable] = None,
) -> MergeResult:
    """Merge two models of one architecture (``merge([m1, m2, m3, ...], data)``:
    N of them, ``budget`` in [1, N], aligned to A's order or, ``universe="mean"``,
    re-aligned to the mean of all) into one of ``budget`` x the cost of
    model A (multiply-accumulates, counted at ``example_inputs``; default:
    the first calibration batch; give inputs of the size the merged model
    will run at when calibrating at another: layers after a global pooling
    cost the same at every size, the rest grows with the image).

    ``data`` yields the calibration inputs: tensors, ``(inputs, targets)``
    pairs, tuples or dicts of inputs (see ``fxmerge.runtime.inputs``; a DataLoader
    works), or anything ``batch_inputs(item)`` turns into a tensor, tuple or
    dict of inputs. ``labels="disjoint"`` keeps both classifiers: the merged
    model outputs ``cat([logits_A, logits_B], -1)``. ``matching`` is
    ``"activation"`` or ``"weight"`` (default: activation for pleas and perm,
    weight for rebasin). ``norm_policy`` says what happens to features that a
    LayerNorm normalises (a transformer's residual stream): ``"split"``
    widens them like any other group and gives each such LayerNorm per-model
    statistics (exact at 2x); ``"merged"`` keeps them fully merged and spends
    the budget elsewhere (heads, MLP width). ``ls_inputs`` picks the inputs
    least squares fits on: the merged model's own (``"merged"``) or the
    permuted ensemble's (``"ensemble"``, teacher forcing). ``bn_stats``:
    ``"sweep"`` re-estimates each BatchNorm on the merged model's own
    activations inside the fitting sweep, ``"reset"`` once after fitting,
    ``"source"`` keeps the sources' statistics (``reset_bn=False`` is the
    same); the default is the method's (``fxmerge.methods``). ``ridge`` pulls
    each least-squares solution toward the permuted weights. ``max_memory``
    (bytes or ``"2G"``; default a quarter of the available memory) caps the
    sweep's frontier, statistics and solves: beyond it the frontier spills
    to a temporary directory (``spill_dir``), stored as ``frontier_dtype``. ``planner``: what the budget planner counts when it
    un-merges a pair (``"pairs"``: its disagreement; ``"reach"``: its
    disagreement times the layers reading its root; ``"residual"``: the
    residual streams first; ``"auto"``: residual streams first where a
    LayerNorm normalises them, disagreement elsewhere). When the budget cannot
    be reached or most weights cannot be permuted the merge warns
    (``BudgetWarning``, ``report["warnings"]``) and goes on at the nearest
    cost; ``strict=True`` raises ``BudgetError`` instead.
    ``zip_heads="average"`` (ZipIt!, CCA Merge) averages heads and groups
    index by index instead of aligning them first. Under an initialised
    ``torch.distributed`` process group every rank reads its own shard of
    ``data`` (``shard=False``: the caller gives each rank its own),
    statistics are summed across ranks and every rank gets the same merged
    model. ``on_least_squares(system, weight, bias)`` sees every layer's
    system before it is solved. The source models are never modified.
    """
    t_start = time.perf_counter()
    models, data = source_models(model_a, model_b, data)
    opts = merge_options(method=method, budget=budget, labels=labels, matching=matching, ridge=ridge,
                         positions=positions, bn_stats=bn_stats, reset_bn=reset_bn, norm_policy=norm_policy,
                         ls_inputs=ls_inputs, ls_targets=ls_targets, planner=planner, device=device,
                         max_memory=max_memory, frontier_dtype=frontier_dtype, schedule=schedule, spill_dir=spill_dir,
                         zip_heads=zip_heads, strict=strict, seed=seed, progress=progress,
                         on_least_squares=on_least_squares, n_models=len(models), universe=universe)
    for i, model in enumerate(models):
        if i:
            check_same_architecture(models[0], model, model_name(i))
        check_finite_state(model.state_dict(), model_name(i))
    names = forward_inputs(models[0])
    data, per_rank, example = calibration_set(data, names, opts, batch_inputs, shard, example_inputs)
    st = MergeState(opts, get_method(opts.method), [copy.deepcopy(m).to(opts.device).eval() for m in models],
                    data, example, sum(per_rank), input_names=names, batch_inputs=batch_inputs,
                    images_per_rank=per_rank)
    reduced = dist.bytes_reduced()
    run_passes(st, st.method.passes)
    dist.sync()
    st.bytes_reduced = dist.bytes_reduced() - reduced
    st.merged.eval()
    st.timings["total"] = time.perf_counter() - t_start
    return MergeResult(st.merged, describe_plan(st), build_report(st), st.pg)


def source_models(model_a, model_b, data) -> tuple:
    """``(models, data)`` from ``merge(a, b, data)`` or ``merge([a, b, ...], data)``."""
    if isinstance(model_a, nn.Module):
        if not isinstance(model_b, nn.Module):
            raise InputError("merge(model_a, model_b, data) takes two models, or merge([m1, m2, ...], data) a "
                             f"sequence of them; got a {type(model_b).__name__} as model_b")
        if data is None:
            raise InputError("merge() needs calibration data: merge(model_a, model_b, data)")
        return [model_a, model_b], data
    if not isinstance(model_a, (list, tuple)) or not all(isinstance(m, nn.Module) for m in model_a):
        raise InputError(f"merge() takes nn.Modules or a sequence of them, got {type(model_a).__name__}")
    if data is not None:
        raise InputError("merge([m1, m2, ...], data) takes the data second: no third positional argument")
    if len(model_a) < 2:
        raise InputError(f"merging needs at least two models, got {len(model_a)}")
    if len(model_a) > C.MAX_MODELS:
        raise InputError(f"fxmerge merges at most {C.MAX_MODELS} models at once, got {len(model_a)}")
    return list(model_a), model_b


def calibration_set(data: Iterable, names: list, opts: MergeOptions, batch_inputs: Optional[Callable], shard: bool,
                    example_inputs: Any) -> tuple:
    """This rank's calibration data (its shard under ``torch.distributed``),
    the number of inputs on every rank, and the example inputs the budget is
    counted at (default: the first two calibration inputs)."""
    data = reiterable(data)
    if shard and dist.world_size() > 1:
        data = dist.shard(data)
    batches = lambda: calibration_inputs(data, names, opts.device, batch_inputs)  # noqa: E731
    error, local = None, 0
    try:
        local = count_images(batches())
        if local < 1 and dist.world_size() > 1:
            raise InputError(f"the calibration data has no inputs for rank {dist.rank()} of {dist.world_size()}: "
                             f"give at least {dist.world_size()} batches")
    except FxmergeError as e:
        error = e
    dist.agree(error)
    per_rank = dist.gather_objects(local)
    if sum(per_rank) < 2:
        raise InputError(f"the calibration data has {sum(per_rank)} input(s): give at least two "
                         "(a few hundred for least squares)")
    example = example_from(batches()) if example_inputs is None else as_inputs(example_inputs).to(opts.device)
    return data, per_rank, example
