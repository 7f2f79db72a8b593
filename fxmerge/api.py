"""One entry point for every merging method: a pipeline of passes.

``merge`` checks its inputs, builds a ``MergeState`` and runs the passes that
``METHOD_PASSES`` lists for the method, each a function of the state:

    analyze      trace + ChannelAnalysis                  -> PermutationGroups
    match        A and B in lockstep (or weights)         -> Matching
    zip_match    pooled statistics (ZipIt!)               -> pairs within and across models
    align        permute B's weights                      -> B opposite A
    plan         CostModel + plan_budget                  -> Plan: merged pairs per root
    plan_full    every root merged (1x)                   -> Plan
    plan_zip     heads aligned, features zipped, the cut  -> Plan, zip_cut
    widen        WidenGraph                               -> widened GraphModule, W0
    zip_weights  ZipIt!'s merge/unmerge matrices          -> zipped weights
    row_blocks   split_contractions                       -> no structural zeros computed
    zip_cut      everything after the cut separate        -> partially zipped GraphModule
    fit          the fitting sweep (sweep.py)             -> least-squares weights (PLeaS, RegMean),
                                                             BatchNorm statistics under bn_stats="sweep"
    batch_norm   reset_batch_norm under bn_stats="reset"  -> BatchNorm statistics

Methods (``constants.METHODS``): ``pleas`` (activation matching, partial
merging at the budget, least squares on the merged model's own inputs, the
sources' BatchNorm statistics), ``perm`` (the same without least squares),
``zipit`` (ZipIt!: heads aligned as units, features zipped within and across
models, partial zipping by a graph cut), ``rebasin`` (Git Re-Basin: weight
matching, full merge at 1x), ``regmean`` (RegMean, 1x), ``avg`` (no
permutation, 1x) and ``ensemble`` (no merging: both models side by side at
2x, the reference).
"""
from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from fxmerge import constants as C
from fxmerge.analysis.channels import analyze
from fxmerge.merging.plan import CostModel, Plan, merged_only_roots, normalized_roots, plan_budget
from fxmerge.fit.batchnorm import batch_norm_points, reset_batch_norm
from fxmerge.runtime import distributed as dist
from fxmerge.errors import BudgetError, BudgetWarning, FxmergeError, InputError, MemoryWarning
from fxmerge.analysis.groups import PermutationGroups
from fxmerge.runtime.inputs import Inputs, as_inputs, calibration_inputs, forward_inputs
from fxmerge.fit.lstsq import (LeastSquaresPoint, conv_weight, following_batch_norm, from_conv_weight, layer_systems,
                    regmean_layer, solve_layer)
from fxmerge.merging.matching import ActivationCollector, Matching, activation_matching, check_finite_state, weight_matching
from fxmerge.analysis.permute import permute_tensor
from fxmerge.merging.rewrite import WidenGraph, check_shapes, in_axes_of, module_row_blocks, split_contractions
from fxmerge.runtime.runner import LockstepRunner
from fxmerge.fit.sweep import Sweep, available_memory, parse_memory, wave_bytes
from fxmerge.analysis.tracing import trace
from fxmerge.runtime.tensors import owner_of, set_tensor, tensor_state
from fxmerge.merging.widening import LayoutWidener
from fxmerge.merging.zipit import (JointCollector, ZipProjector, align_products, choose_cut, emit_partial_zip, node_costs,
                    zipped_atoms)

METHODS = C.METHODS
LABELS = C.LABELS
NORM_POLICIES = C.NORM_POLICIES
REGMEAN_ALPHA = 0.9  # off-diagonal scaling of RegMean's Gram matrices (its authors' default)


@dataclass
class MergePlan:
    """What was merged: per group, its width in each model, merged pairs and
    the merged model's width; the B permutation per group."""

    method: str
    budget: float
    labels: str
    groups: list  # dicts: id, kind, size, merged, width
    permutations: dict = field(default_factory=dict)  # group id -> B index per A index
    masks: dict = field(default_factory=dict)  # group id -> merged mask (A index order)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "budget": self.budget,
            "labels": self.labels,
            "groups": self.groups,
            "permutations": {str(k): v.tolist() for k, v in self.permutations.items()},
            "masks": {str(k): v.astype(int).tolist() for k, v in self.masks.items()},
        }


@dataclass
class MergeResult:
    model: fx.GraphModule
    plan: MergePlan
    report: dict
    groups: Optional[PermutationGroups] = field(default=None, repr=False)


@dataclass
class MergeOptions:
    """Everything ``merge`` was asked for, checked."""

    method: str = C.DEFAULT_METHOD
    budget: float = 1.0
    labels: str = "shared"
    matching: str = "activation"
    ridge: float = C.DEFAULT_RIDGE
    positions: int = C.DEFAULT_POSITIONS
    bn_stats: str = C.DEFAULT_BN_STATS
    norm_policy: str = C.DEFAULT_NORM_POLICY
    ls_inputs: str = C.DEFAULT_LS_INPUTS
    seed: int = 0
    device: torch.device = torch.device("cpu")
    progress: bool = False
    on_least_squares: Optional[Callable] = None
    max_memory: int = 0  # bytes for the sweep's frontier, statistics and solves
    frontier_dtype: str = "float32"
    schedule: str = "frontier"
    spill_dir: Optional[str] = None
    planner: str = C.DEFAULT_PLANNER
    strict: bool = False
    ls_targets: str = C.DEFAULT_LS_TARGETS
    zip_heads: str = "align"


@dataclass
class MergeState:
    """What the passes read and write."""

    opts: MergeOptions
    model_a: nn.Module
    model_b: nn.Module
    data: Any
    example_inputs: Inputs
    n_images: int
    input_names: list = field(default_factory=list)
    batch_inputs: Optional[Callable] = None
    images_per_rank: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    pg: Optional[PermutationGroups] = None
    gm_a: Optional[fx.GraphModule] = None
    gm_b: Optional[fx.GraphModule] = None  # B's weights in A's graph, aligned once ``align`` ran
    match: Matching = field(default_factory=Matching)
    plan: Optional[Plan] = None
    widener: Optional[LayoutWidener] = None
    merged: Optional[fx.GraphModule] = None
    zip_sims: dict = field(default_factory=dict)
    zip_keys: dict = field(default_factory=dict)
    projector: Optional[ZipProjector] = None
    zip_cut: int = 0
    zip_cut_node: Optional[str] = None
    least_squares: dict = field(default_factory=dict)
    sweep: dict = field(default_factory=dict)
    skipped_layers: list = field(default_factory=list)
    kept_merged: dict = field(default_factory=dict)  # root uid -> why it cannot widen (reasons)
    budget_reachable: bool = True
    pinned_share: float = 0.0
    macs_a: Optional[float] = None
    warnings: list = field(default_factory=list)
    row_block_layers: int = 0

    def batches(self) -> Iterable[Inputs]:
        """This rank's calibration inputs, batch by batch, on the device."""
        return calibration_inputs(self.data, self.input_names, self.opts.device, self.batch_inputs)

    @property
    def output_roots(self) -> set:
        return self.pg.output_roots

    @property
    def state_a(self) -> dict:
        return tensor_state(self.gm_a)


# ----------------------------------------------------------------------------
# passes


def pass_analyze(st: MergeState) -> None:
    """Trace model A, find its groups; B's weights go into A's graph."""
    st.pg = analyze(st.model_a, st.example_inputs, per_model_output=st.opts.labels == "disjoint")
    st.gm_a = st.pg.gm
    st.gm_b = copy.deepcopy(st.gm_a)
    state_b = dict(st.model_b.state_dict())
    wanted = tensor_state(st.gm_b)
    if any(k not in state_b for k in wanted):
        # non-persistent buffers (some are computed by the forward, at the
        # input's size) and tensors the tracer turned into graph constants:
        # read B's own from a trace of a copy of B (the same graph, names)
        state_b = {**tensor_state(trace(st.model_b, st.example_inputs, check=False).gm), **state_b}
    missing = [k for k in wanted if k not in state_b]
    if missing:
        raise InputError(f"model B has no tensor for {missing[0]!r} of model A's graph: "
                         "merge two models of the same architecture")
    for k, v in wanted.items():
        if tuple(state_b[k].shape) != tuple(v.shape):
            raise InputError(f"{k!r} is {tuple(v.shape)} in model A but {tuple(state_b[k].shape)} in model B: "
                             "merge two models of the same architecture")
        set_tensor(st.gm_b, k, state_b[k].detach().clone())


def pass_match(st: MergeState) -> None:
    """Which feature of B corresponds to which of A: activation matching
    (one lockstep pass over the data) or Git Re-Basin's weight matching."""
    o = st.opts
    if o.matching == "weight":
        st.match = weight_matching(st.pg, st.state_a, tensor_state(st.gm_b), seed=o.seed, exclude=st.output_roots)
        return
    collector = ActivationCollector(st.pg, o.positions, o.seed, o.device, models=(st.gm_a, st.gm_b),
                                    max_memory=o.max_memory)
    lockstep_pass(LockstepRunner([st.gm_a, st.gm_b]), collector, st.batches(), o.progress, "matching")
    collector.reduce()
    st.match = activation_matching(collector, exclude=st.output_roots)


def pass_zip_match(st: MergeState) -> None:
    """ZipIt!'s statistics: the pooled correlation of both models' features."""
    o = st.opts
    collector = JointCollector(st.pg, o.positions, o.seed, o.device, max_memory=o.max_memory)
    lockstep_pass(LockstepRunner([st.gm_a, st.gm_b]), collector, st.batches(), o.progress, "matching")
    collector.reduce()
    outputs = st.output_roots
    st.zip_sims = {u: c for u, c in collector.similarities().items() if u not in outputs}
    st.zip_keys = collector.keys


def pass_align(st: MergeState) -> None:
    """Permute B's weights so its features sit opposite A's."""
    sampler = st.match.sampler()
    aligned = copy.deepcopy(st.gm_a)
    for k, v in tensor_state(st.gm_b).items():
        lays = st.pg.members.get(k)
        set_tensor(aligned, k, permute_tensor(v, lays, sampler) if lays is not None else v)
    st.gm_b = aligned


def _fixed_roots(st: MergeState, cost_model: CostModel) -> dict:
    """Roots whose merged count the plan may not choose: each model's own
    output (never merged), and roots that must stay merged (with the reason
    in ``st.kept_merged``)."""
    outputs = {u for u in st.output_roots if u in cost_model.uids}
    fixed = {u: 0 for u in outputs}
    st.kept_merged = {u: why for u, why in merged_only_roots(st.pg, st.opts.norm_policy).items()
                      if u in cost_model.uids}
    clash = [why[0] for u, why in st.kept_merged.items() if u in outputs]
    if clash:
        raise InputError(f"labels='disjoint' keeps each model's classes apart, but {clash[0]} across the classes "
                         "(e.g. a softmax over the logits): merge with labels='shared' or remove it")
    fixed.update({u: int(n) for u, n in zip(cost_model.uids, cost_model.sizes) if u in st.kept_merged})
    return fixed


def cost_model_of(st: MergeState) -> CostModel:
    """The planner's cost model of model A, with the cost of what it cannot
    widen (opaque modules) as a constant: the measured multiply-accumulates
    of A minus the modelled ones."""
    if st.macs_a is None:
        st.macs_a = measure_macs(st.gm_a, st.example_inputs)
    return CostModel.from_groups(st.pg, source_macs=st.macs_a)


def pass_plan(st: MergeState) -> None:
    """Partial merging: how many pairs of every root merge, for the budget."""
    cost_model = cost_model_of(st)
    residual = {r.uid for g in st.pg.all_groups if g.kind == "residual" for r in g.roots}
    score = st.opts.planner
    if score == "auto":  # residual streams first where a LayerNorm normalises them (transformers)
        normalized = normalized_roots(st.pg)
        residual &= normalized
        score = "residual" if residual else "pairs"
    st.plan = plan_budget(cost_model, st.match.sims, st.opts.budget, fixed=_fixed_roots(st, cost_model),
                          score=score, first=residual)


def pass_plan_full(st: MergeState) -> None:
    """Every root merged (1x): the methods without partial merging."""
    cost_model = cost_model_of(st)
    fixed = _fixed_roots(st, cost_model)
    fixed.update({u: int(s) for u, s in zip(cost_model.uids, cost_model.sizes) if u not in fixed})
    st.plan = plan_budget(cost_model, st.match.sims, st.opts.budget, fixed=fixed)


def pass_plan_zip(st: MergeState) -> None:
    """ZipIt!'s plan: heads and convolution groups aligned as units (B's
    weights permuted), every other feature zipped within or across models;
    the planned widths are all merged but each model's own outputs; the cut
    of partial zipping chosen for the budget."""
    outputs = st.output_roots
    if st.opts.zip_heads == "align":
        st.match = align_products(st.pg, st.zip_sims, st.zip_keys, outputs)
        pass_align(st)
    zipped = zipped_atoms(st.zip_sims, st.zip_keys, outputs)
    st.projector = ZipProjector(zipped, set())
    pass_plan_full(st)
    full = st.plan.ratio
    st.zip_cut, ratio, feasible = choose_cut(st.pg, node_costs(st.gm_a, st.example_inputs), st.opts.budget, full)
    st.plan.feasible = feasible
    st.plan.achieved = ratio * st.plan.source_cost
    st.plan.target = st.opts.budget * st.plan.source_cost


def pass_widen(st: MergeState) -> None:
    """Emit the widened GraphModule: ``[A-only | merged | B-only]`` per root."""
    st.widener = LayoutWidener(st.plan.masks)
    st.merged = WidenGraph(st.pg, st.widener).run(st.state_a, tensor_state(st.gm_b))


def pass_zip_weights(st: MergeState) -> None:
    """ZipIt!'s weights: merge and unmerge matrices applied to both models
    (aligned blocks averaged)."""
    contracted = in_axes_of(st.pg)
    state_a, state_b = st.state_a, tensor_state(st.gm_b)
    for name, lays in st.pg.members.items():
        if name in state_a:
            set_tensor(st.merged, name, st.projector.merge_tensor(state_a[name], state_b[name], lays,
                                                                  contracted.get(name, set())))


def pass_fit(st: MergeState) -> None:
    """The fitting sweep: least squares (PLeaS: ``ls_inputs``; RegMean:
    stacked) and, under ``bn_stats="sweep"``, the BatchNorm statistics on
    the merged model's own activations, in one walk over the graph."""
    o = st.opts
    points, systems = [], {}
    inputs = {"pleas": o.ls_inputs, "regmean": "stacked"}.get(o.method)
    if inputs is not None:
        systems, _ = layer_systems(st.pg, st.merged, st.gm_a, st.widener, stacked=inputs == "stacked")
        per_layer: dict = {}
        models = [st.gm_a, st.gm_b, st.merged]
        solve = _solver(st, per_layer)
        normalized = o.ls_targets == "normalized" and o.bn_stats == "source" and inputs != "stacked"
        points += [LeastSquaresPoint(key, sysm, models, inputs, o.positions, o.seed, solve,
                                     norm=following_batch_norm(st.merged, sysm.node) if normalized and sysm.taps is None
                                     else None)
                   for key, sysm in systems.items()]
        points = _within_memory(points, st)
    if o.bn_stats == "sweep":
        points += batch_norm_points(st.merged)
    if not points:
        return
    models = [st.gm_a, st.gm_b, st.merged]
    sweep = Sweep(models, points, schedule=o.schedule, max_memory=o.max_memory,
                  frontier_dtype=getattr(torch, o.frontier_dtype), spill_dir=o.spill_dir, progress=o.progress,
                  desc="fit", row_blocks={target: (kind, ins, outs) for target, kind, ins, outs, _ in
                                          module_row_blocks(st.merged, st.pg, st.widener) if kind is not None})
    st.sweep = sweep.run(st.batches)
    if inputs is not None:
        st.least_squares = {"layers": len([p for p in points if isinstance(p, LeastSquaresPoint)]), "ridge": o.ridge,
                            "inputs": inputs, "passes": st.sweep["waves"] if o.schedule == "recompute" else 1,
                            "per_layer": per_layer}


def _solver(st: MergeState, per_layer: dict) -> Callable:
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
                   for gm in (st.gm_a, st.gm_b)]
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


def _within_memory(points: list, st: MergeState) -> list:
    """Least-squares points whose statistics fit in ``max_memory``; the
    others keep their initial weights, with a warning."""
    keep, skipped = [], []
    for p in points:
        (keep if wave_bytes([p]) <= st.opts.max_memory else skipped).append(p)
    if skipped:
        names = ", ".join(f"'{p.key}' ({wave_bytes([p]) / 2**30:.1f} GiB)" for p in skipped[:3])
        warnings.warn(f"least squares skipped for {len(skipped)} layer(s) whose statistics and solve exceed max_memory "
                      f"({st.opts.max_memory / 2**30:.1f} GiB): {names}; they keep their permuted weights",
                      MemoryWarning, stacklevel=4)
        st.skipped_layers = [p.key for p in skipped]
    return keep


def pass_zip_cut(st: MergeState) -> None:
    """Partial zipping: the model after the cut is both source models, side
    by side, reading the zipped features unzipped to their own."""
    nodes = list(st.pg.gm.graph.nodes)
    if st.zip_cut < len(nodes):
        model_b = copy.deepcopy(st.gm_a)
        model_b.load_state_dict({k: v for k, v in st.model_b.state_dict().items() if k in model_b.state_dict()})
        st.merged = emit_partial_zip(st.merged, st.gm_a, model_b, st.pg, st.zip_cut, st.projector.zipped,
                                     st.match.sampler(), st.opts.labels)
        st.zip_cut_node = next((n.name for n in nodes[st.zip_cut:] if n.name in {c.node for c in st.pg.contractions.values()}),
                               None)


def pass_row_blocks(st: MergeState) -> None:
    """Widened convolutions and linears as row blocks (no structural zeros)."""
    st.row_block_layers = split_contractions(st.merged, st.pg, st.widener)


def pass_batch_norm(st: MergeState) -> None:
    """Under ``bn_stats="reset"``: BatchNorm statistics recomputed in one
    train-mode pass over the calibration data, after fitting."""
    if st.opts.bn_stats == "reset":
        reset_batch_norm(st.merged, _progress(st.batches(), st.opts.progress, "batchnorm reset"))


PASSES: dict[str, Callable[[MergeState], None]] = {
    "analyze": pass_analyze,
    "match": pass_match,
    "zip_match": pass_zip_match,
    "align": pass_align,
    "plan": pass_plan,
    "plan_full": pass_plan_full,
    "plan_zip": pass_plan_zip,
    "widen": pass_widen,
    "zip_weights": pass_zip_weights,
    "zip_cut": pass_zip_cut,
    "fit": pass_fit,
    "row_blocks": pass_row_blocks,
    "batch_norm": pass_batch_norm,
}

# which passes each method runs, in order
METHOD_PASSES: dict[str, tuple] = {
    "pleas": ("analyze", "match", "align", "plan", "widen", "fit", "row_blocks", "batch_norm"),
    "perm": ("analyze", "match", "align", "plan", "widen", "fit", "row_blocks", "batch_norm"),
    "zipit": ("analyze", "zip_match", "plan_zip", "widen", "zip_weights", "row_blocks", "zip_cut", "fit", "batch_norm"),
    "rebasin": ("analyze", "match", "align", "plan_full", "widen", "fit", "row_blocks", "batch_norm"),
    "regmean": ("analyze", "plan_full", "widen", "fit", "row_blocks", "batch_norm"),
    "avg": ("analyze", "plan_full", "widen", "fit", "row_blocks", "batch_norm"),
    "ensemble": ("analyze", "plan", "widen", "row_blocks"),
}
assert set(METHOD_PASSES) == set(METHODS) and all(p in PASSES for ps in METHOD_PASSES.values() for p in ps)

# the pass whose time the report lists under each phase name
PHASES = {"analyze": "analysis", "match": "matching", "zip_match": "matching", "align": "matching",
          "plan": "plan", "plan_full": "plan", "plan_zip": "plan", "widen": "widen", "zip_weights": "widen",
          "fit": "fit", "row_blocks": "widen", "zip_cut": "widen", "batch_norm": "batchnorm_reset"}


# ----------------------------------------------------------------------------
# helpers of the passes


def _as_reiterable(data) -> Iterable:
    if data is None:
        raise InputError("no calibration data: pass a DataLoader, a list of tensors or (inputs, targets) pairs")
    if iter(data) is data:  # a one-shot iterator: keep its items for the later passes
        data = list(data)
    return data


def _example_from(batches: Iterable[Inputs]) -> Inputs:
    for x in batches:
        if x.batch_size < 1:
            continue
        return x.head(2)
    raise InputError("the calibration data is empty: give at least two inputs")


def check_same_architecture(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    for name, t in sa.items():
        if name not in sb:
            raise InputError(f"the models differ: model B has no parameter '{name}' (model A: {tuple(t.shape)})")
        if tuple(t.shape) != tuple(sb[name].shape):
            raise InputError(
                f"the models differ at '{name}': model A {tuple(t.shape)}, model B {tuple(sb[name].shape)}"
            )
    for name in sb:
        if name not in sa:
            raise InputError(f"the models differ: model A has no parameter '{name}'")


def _count_images(batches: Iterable[Inputs]) -> int:
    n = 0
    for i, x in enumerate(batches):
        if any(t.is_floating_point() and not torch.isfinite(t).all() for t in x.tensors()):
            raise InputError(f"the calibration data has non-finite values (batch {i}): clean or re-normalise it")
        n += x.batch_size
    return n


def _progress(it, enabled: bool, desc: str, total=None):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total, leave=False)


def lockstep_pass(runner: LockstepRunner, collector, batches: Iterable[Inputs], progress: bool, desc: str) -> None:
    """One pass over this rank's calibration batches, the collector seeing
    every node (``collector.batch``: the batch's index over all ranks)."""
    from fxmerge.runtime.distributed import rank, world_size

    world, me = world_size(), rank()
    for i, x in enumerate(_progress(batches, progress, desc)):
        collector.batch = i * world + me
        runner.run(x, collector)


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the CPU's fused attention kernel (the counter has no formula
    for it): ``q k^T`` and ``attn v``, two FLOPs per multiply-accumulate."""
    *batch, n_q, d_qk = query_shape
    n_kv, d_v = key_shape[-2], value_shape[-1]
    return 2 * int(np.prod(batch)) * n_q * n_kv * (d_qk + d_v)


_EXTRA_FLOP_FORMULAS = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _EXTRA_FLOP_FORMULAS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_attention_flops


def measure_macs(model: nn.Module, example_inputs) -> float:
    """Multiply-accumulates of one forward pass per example, counted on the
    real ops (``torch.utils.flop_counter``)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS)
    # nn.MultiheadAttention's fused eval-mode kernel is invisible to the
    # counter: take the plain path while counting
    mha = torch.backends.mha
    fast = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    inputs = as_inputs(example_inputs)
    try:
        try:
            with torch.no_grad(), counter:
                inputs.call(model)
        except AssertionError:
            # the counter's module tracker cannot hook a view of a parameter
            # made under no_grad that is handed to a submodule (a learned
            # query ``expand``-ed into nn.Transformer): count with autograd on
            counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS)
            with counter:
                inputs.call(model)
    finally:
        mha.set_fastpath_enabled(fast)
    return counter.get_total_flops() / 2 / max(1, inputs.batch_size)


def _output_width(pg) -> int:
    for n in pg.gm.graph.nodes:
        if n.op == "output":
            v = n.args[0]
            v = v[0] if isinstance(v, (list, tuple)) else v
            meta = getattr(v, "meta", {}).get("fxm_value")
            return int(meta.shape[-1]) if hasattr(meta, "shape") else 0
    return 0


def _check_budget(st: MergeState) -> None:
    """No silent degradation: when the plan cannot reach the budget, or most
    of the weights cannot be permuted, say so (a ``BudgetWarning``, a line
    in ``report["warnings"]``) and name what blocks it; under ``strict``
    raise ``BudgetError`` instead."""
    o, plan = st.opts, st.plan
    low, high = plan.feasible
    tol = 1e-6  # the cost range is exact; a budget inside it is met to within one step
    # (below the range only by what each model's own classifier costs: both label spaces are kept)
    st.budget_reachable = o.budget <= high + tol
    st.pinned_share = 1.0 - st.pg.covered_fraction()
    blockers = [f"{p.kind} (pinned: {p.reason})" for p in st.pg.pinned]
    blockers += [f"{kind} (pinned: {why})" for kind, why in st.pg.rule_pins.items()]
    blockers += sorted({why for reasons in st.kept_merged.values() for why in reasons})
    messages = []
    if not st.budget_reachable:
        listed = "; ".join(blockers[:4]) + (f" (+{len(blockers) - 4} more)" if len(blockers) > 4 else "")
        messages.append(f"budget {o.budget:.2f}x is out of reach for this model: it can cost at most {high:.3f}x"
                        + (f"; kept from widening by: {listed}" if blockers else ""))
    if st.budget_reachable and o.budget >= 2.0 - tol and st.kept_merged and o.method in C.BUDGETED_METHODS:
        # the cost is reached (a merged row reading both models' inputs costs
        # as much as two rows), but a 2x merge is promised to be the ensemble
        st.budget_reachable = False
        reasons = "; ".join(sorted({why for r in st.kept_merged.values() for why in r}))
        messages.append(f"at {o.budget:.2f}x the merged model is not the ensemble: some features stay merged "
                        f"({reasons})")
    if st.pinned_share > C.PINNED_SHARE_WARNING and o.method not in ("avg", "regmean", "ensemble"):
        kinds = ", ".join(p.kind for p in st.pg.pinned[:3]) or "none"
        messages.append(f"{100 * st.pinned_share:.0f}% of the conv/linear weights cannot be permuted (pinned op kinds: "
                        f"{kinds}): the merge averages them index by index")
    for m in messages:
        if o.strict:
            raise BudgetError(m + " (strict)")
        warnings.warn(m, BudgetWarning, stacklevel=4)
    st.warnings.extend(messages)


def _describe_plan(st: MergeState) -> MergePlan:
    o = st.opts
    groups, perms, masks = [], {}, {}
    for g in st.pg.groups:
        if g.parent is not None:
            groups.append({"id": g.id, "kind": g.kind, "size": g.size, "blocks": g.blocks, "merged": g.size, "width": g.size})
            continue
        uid = g.roots[0].uid
        k = st.plan.k.get(uid, g.size)
        groups.append({"id": g.id, "kind": g.kind, "size": g.size, "merged": int(k), "width": int(2 * g.size - k)})
        if uid in st.match.perms:
            perms[g.id] = np.asarray(st.match.perms[uid])
        if uid in st.plan.masks:
            masks[g.id] = st.plan.masks[uid]
    return MergePlan(o.method, o.budget, o.labels, groups, perms, masks)


def _kept_merged_summary(st: MergeState) -> list:
    """The reasons roots must stay merged, with how many channels each
    keeps."""
    sizes = {r.uid: r.size for g in st.pg.all_groups for r in g.roots}
    count: dict = {}
    for u, reasons in st.kept_merged.items():
        for why in reasons:
            count[why] = count.get(why, 0) + sizes.get(u, 0)
    return [{"reason": why, "channels": n} for why, n in sorted(count.items(), key=lambda kv: -kv[1])]


def _report(st: MergeState) -> dict:
    o = st.opts
    macs_a = st.macs_a if st.macs_a is not None else measure_macs(st.gm_a, st.example_inputs)
    macs_m = measure_macs(st.merged, st.example_inputs)
    plan = st.plan
    return {
        "method": o.method,
        "budget": o.budget,
        "labels": o.labels,
        "matching": o.matching if "match" in METHOD_PASSES[o.method] else "identity",
        "cost_planned": plan.ratio,
        "cost_measured": macs_m / macs_a if macs_a else float("nan"),
        "cost_feasible": list(plan.feasible),
        "budget_reachable": st.budget_reachable,
        "pinned_share": st.pinned_share,
        "kept_merged": _kept_merged_summary(st),
        "warnings": st.warnings,
        "cost_resolution": plan.resolution,
        "macs_source": macs_a,
        "macs_merged": macs_m,
        "params_source": sum(p.numel() for p in st.gm_a.parameters()),
        "params_merged": sum(p.numel() for p in st.merged.parameters()),
        "calibration_inputs": st.n_images,
        "world_size": len(st.images_per_rank) or 1,
        "images_per_rank": st.images_per_rank,
        "source_num_classes": int(_output_width(st.pg)),
        "row_block_layers": st.row_block_layers,
        "timings": st.timings,
        "least_squares": st.least_squares,
        "least_squares_skipped": st.skipped_layers,
        "sweep": st.sweep,
        "bn_stats": o.bn_stats if "batch_norm" in METHOD_PASSES[o.method] else "source",
        "pinned_ops": [p.kind for p in st.pg.pinned] + list(st.pg.rule_pins),
        "norm_policy": o.norm_policy,
        **({"zip_cut": st.zip_cut_node, "zip_cut_position": st.zip_cut} if o.method == "zipit" else {}),
    }


# ----------------------------------------------------------------------------


def check_options(*, method, budget, labels, matching, ridge, positions, norm_policy, ls_inputs, device,
                  bn_stats=C.DEFAULT_BN_STATS, max_memory=None, frontier_dtype="float32",
                  schedule="frontier", planner=C.DEFAULT_PLANNER) -> MergeOptions:
    """The checked options of a merge (``InputError`` on bad values)."""
    if method not in METHODS:
        raise InputError(f"unknown method '{method}': choose one of {', '.join(METHODS)}")
    if labels not in LABELS:
        raise InputError(f"labels must be one of {', '.join(LABELS)}, got '{labels}'")
    try:
        budget = float(budget)
    except (TypeError, ValueError):
        raise InputError(f"budget must be a number between 1 and 2, got {budget!r}") from None
    if not 1.0 <= budget <= 2.0 or not np.isfinite(budget):
        raise InputError(f"budget must be between 1 and 2 (x the cost of one source model), got {budget}")
    fixed = C.FIXED_BUDGET.get(method)
    if fixed == 1.0 and budget != 1.0:
        raise InputError(f"method '{method}' merges everything (budget 1); use 'perm' or 'pleas' for budget {budget}")
    if norm_policy not in NORM_POLICIES:
        raise InputError(f"norm_policy must be one of {', '.join(NORM_POLICIES)}, got '{norm_policy}'")
    if not isinstance(positions, int) or positions < 0:
        raise InputError(f"positions must be a whole number >= 0 (0 keeps every position), got {positions!r}")
    if ls_inputs not in C.LS_INPUTS:
        raise InputError(f"ls_inputs must be one of {', '.join(C.LS_INPUTS)}, got '{ls_inputs}'")
    if bn_stats not in C.BN_STATS:
        raise InputError(f"bn_stats must be one of {', '.join(C.BN_STATS)}, got '{bn_stats}'")
    if frontier_dtype not in C.FRONTIER_DTYPES:
        raise InputError(f"frontier_dtype must be one of {', '.join(C.FRONTIER_DTYPES)}, got '{frontier_dtype}'")
    if schedule not in ("frontier", "recompute"):
        raise InputError(f"schedule must be 'frontier' or 'recompute', got '{schedule}'")
    if planner not in C.PLANNER_SCORES:
        raise InputError(f"planner must be one of {', '.join(C.PLANNER_SCORES)}, got '{planner}'")
    try:
        max_memory = parse_memory(max_memory)
    except ValueError as e:
        raise InputError(str(e)) from None
    if max_memory is None:
        max_memory = int(C.DEFAULT_MEMORY_SHARE * available_memory())
    if method == "ensemble":
        budget = 2.0
        norm_policy = "split"
    matching = matching or ("weight" if method == "rebasin" else "activation")
    if matching not in C.MATCHINGS:
        raise InputError(f"matching must be one of {', '.join(C.MATCHINGS)}, got '{matching}'")
    try:
        ridge = float(ridge)
    except (TypeError, ValueError):
        raise InputError(f"ridge must be a number >= 0, got {ridge!r}") from None
    if not ridge >= 0 or not np.isfinite(ridge):
        raise InputError(f"ridge must be a number >= 0, got {ridge}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device '{device}': use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' requested but no CUDA GPU is available: use --device cpu")
    return MergeOptions(method=method, budget=budget, labels=labels, matching=matching, ridge=ridge,
                        positions=positions, norm_policy=norm_policy, ls_inputs=ls_inputs, device=device,
                        bn_stats=bn_stats, max_memory=max_memory, frontier_dtype=frontier_dtype, schedule=schedule,
                        planner=planner)


def merge(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Iterable,
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
    batch_inputs: Optional[Callable] = None,
    progress: bool = False,
    on_least_squares: Optional[Callable] = None,
) -> MergeResult:
    """Merge two models of one architecture into one of ``budget`` x the cost
    of model A (multiply-accumulates, counted at ``example_inputs``; default:
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
    same); the default is the method's (``constants.BN_STATS_OF``). ``ridge`` pulls each least-squares solution toward the permuted
    weights. ``max_memory`` (bytes or ``"2G"``; default a quarter of the
    available memory) caps the sweep's frontier, statistics and solves: beyond it the
    frontier spills to a temporary directory (``spill_dir``), stored as
    ``frontier_dtype``. ``planner``: what the budget planner counts when it
    un-merges a pair (``"pairs"``: its disagreement; ``"reach"``: its
    disagreement times the layers reading its root; ``"residual"``: the
    residual streams first; ``"auto"``: residual streams first where a
    LayerNorm normalises them, disagreement elsewhere). When the budget cannot
    be reached or most weights cannot be permuted the merge warns
    (``BudgetWarning``, ``report["warnings"]``) and goes on at the nearest
    cost; ``strict=True`` raises ``BudgetError`` instead.
    ``zip_heads="average"`` (ZipIt! only) averages heads and convolution
    groups index by index instead of aligning them first: ZipIt!'s paper has
    no notion of them (kept for comparison). Under an initialised
    ``torch.distributed`` process group every rank
    reads its own shard of ``data`` (``shard=False``: the caller gives each
    rank its own), statistics are summed across ranks and every rank gets
    the same merged model. ``on_least_squares(system, weight, bias)`` is called
    with every layer's accumulated system before it is solved. The source
    models are never modified.
    """
    t_start = time.perf_counter()
    if bn_stats is None:
        bn_stats = "source" if reset_bn is False else C.BN_STATS_OF.get(method, C.DEFAULT_BN_STATS)
    opts = check_options(method=method, budget=budget, labels=labels, matching=matching, ridge=ridge,
                         positions=positions, norm_policy=norm_policy, ls_inputs=ls_inputs, device=device,
                         bn_stats=bn_stats, max_memory=max_memory, frontier_dtype=frontier_dtype, schedule=schedule,
                         planner=planner)
    opts.seed, opts.progress, opts.on_least_squares, opts.spill_dir = seed, progress, on_least_squares, spill_dir
    opts.strict = bool(strict)
    if ls_targets not in C.LS_TARGETS:
        raise InputError(f"ls_targets must be one of {', '.join(C.LS_TARGETS)}, got '{ls_targets}'")
    opts.ls_targets = ls_targets
    if zip_heads not in ("align", "average"):
        raise InputError(f"zip_heads must be 'align' or 'average', got '{zip_heads}'")
    opts.zip_heads = zip_heads
    check_same_architecture(model_a, model_b)
    check_finite_state(model_a.state_dict(), "A")
    check_finite_state(model_b.state_dict(), "B")
    data = _as_reiterable(data)
    if shard and dist.world_size() > 1:
        data = dist.shard(data)
    names = forward_inputs(model_a)
    batches = lambda: calibration_inputs(data, names, opts.device, batch_inputs)  # noqa: E731
    error, local = None, 0
    try:
        local = _count_images(batches())
        if local < 1 and dist.world_size() > 1:
            raise InputError(f"the calibration data has no inputs for rank {dist.rank()} of {dist.world_size()}: "
                             f"give at least {dist.world_size()} batches")
    except FxmergeError as e:
        error = e
    dist.agree(error)
    per_rank = dist.gather_objects(local)
    n_images = sum(per_rank)
    if n_images < 2:
        raise InputError(f"the calibration data has {n_images} input(s): give at least two (a few hundred for least squares)")
    example = _example_from(batches()) if example_inputs is None else as_inputs(example_inputs).to(opts.device)
    st = MergeState(opts, copy.deepcopy(model_a).to(opts.device).eval(), copy.deepcopy(model_b).to(opts.device).eval(),
                    data, example, n_images, input_names=names, batch_inputs=batch_inputs, images_per_rank=per_rank)
    try:
        for name in METHOD_PASSES[opts.method]:
            t = time.perf_counter()
            PASSES[name](st)
            if name == "widen":
                check_shapes(st.merged, st.pg, st.widener, st.example_inputs)
            if name.startswith("plan"):
                _check_budget(st)
            phase = PHASES[name]
            st.timings[phase] = st.timings.get(phase, 0.0) + time.perf_counter() - t
    except Exception as e:
        if dist.world_size() > 1:
            dist.agree(e)  # every rank ends with the same error
        raise
    dist.sync()
    st.merged.eval()
    st.timings["total"] = time.perf_counter() - t_start
    return MergeResult(st.merged, _describe_plan(st), _report(st), st.pg)
