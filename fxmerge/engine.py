"""One entry point for every merging method: a pipeline of passes.

``merge`` checks its inputs, builds a ``MergeState`` and runs the passes that
``METHOD_PASSES`` lists for the method, each a function of the state:

    analyze        trace + ChannelAnalysis               -> PermutationGroups
    match          A and B in lockstep (or weights)      -> Matching
    zip_match      pooled statistics (ZipIt!)            -> pairs within and across models
    align          permute B's weights                   -> B opposite A
    plan           CostModel + plan_budget               -> Plan: merged pairs per root
    plan_full      every root merged (1x)                -> Plan
    plan_zip       ZipIt!'s partial zipping cut          -> Plan
    widen          WidenGraph                            -> widened GraphModule, W0
    zip_weights    ZipIt!'s merge/unmerge matrices       -> zipped weights
    least_squares  layer-wise least squares              -> new W per layer
    regmean        RegMean's stacked least squares       -> new W per layer
    row_blocks     split_contractions                    -> no structural zeros computed
    batch_norm     BatchNorm statistics of the merged model

Methods: ``pleas`` (activation matching, partial merging at the budget,
least squares, BatchNorm reset), ``perm`` (the same without least squares),
``zipit`` (ZipIt!), ``rebasin`` (Git Re-Basin: weight matching, full merge at
1x), ``regmean`` (RegMean, 1x), ``avg`` (no permutation, 1x) and
``ensemble`` (no merging: both models side by side at 2x, the reference).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from . import constants as C
from .analysis import analyze
from .budget import CostModel, Plan, frozen_roots, plan_budget, roots_within
from .errors import InputError
from .groups import PermutationGroups
from .ir import Product, find
from .lstsq import GramCollector, layer_systems, regmean_layer, solve_layer
from .matching import ActivationCollector, Matching, activation_matching, check_finite_state, weight_matching
from .permute import permute_tensor
from .rewrite import WidenGraph, check_shapes, in_axes_of, normalized_layouts, split_contractions, splittable
from .runner import LockstepRunner, input_batches
from .tensors import set_tensor
from .widening import LayoutWidener
from .zipit import JointCollector, ZipProjector, merge_matrices, root_order, zip_cut, zip_pairs

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
    reset_bn: bool = True
    norm_policy: str = C.DEFAULT_NORM_POLICY
    ls_inputs: str = C.DEFAULT_LS_INPUTS
    seed: int = 0
    device: torch.device = torch.device("cpu")
    progress: bool = False
    on_least_squares: Optional[Callable] = None


@dataclass
class MergeState:
    """What the passes read and write."""

    opts: MergeOptions
    model_a: nn.Module
    model_b: nn.Module
    data: Any
    example_inputs: tuple
    n_images: int
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
    least_squares: dict = field(default_factory=dict)
    row_block_layers: int = 0

    @property
    def output_roots(self) -> set:
        return {r.uid for g in self.pg.all_groups if g.kind == "output" for r in g.roots}

    @property
    def state_a(self) -> dict:
        return dict(self.gm_a.state_dict())


# ----------------------------------------------------------------------------
# passes


def pass_analyze(st: MergeState) -> None:
    """Trace model A, find its groups; B's weights go into A's graph."""
    st.pg = analyze(st.model_a, st.example_inputs, per_model_output=st.opts.labels == "disjoint")
    st.gm_a = st.pg.gm
    st.gm_b = copy.deepcopy(st.gm_a)
    state_b = st.model_b.state_dict()
    st.gm_b.load_state_dict({k: state_b[k] for k in st.gm_b.state_dict()}, strict=True)


def pass_match(st: MergeState) -> None:
    """Which feature of B corresponds to which of A: activation matching
    (one lockstep pass over the data) or Git Re-Basin's weight matching."""
    o = st.opts
    if o.matching == "weight":
        st.match = weight_matching(st.pg, st.state_a, st.gm_b.state_dict(), seed=o.seed, exclude=st.output_roots)
        return
    collector = ActivationCollector(st.pg, o.positions, o.seed, o.device, models=(st.gm_a, st.gm_b))
    lockstep_pass(LockstepRunner([st.gm_a, st.gm_b]), collector, st.data, o.device, o.progress, "matching")
    st.match = activation_matching(collector, exclude=st.output_roots)


def pass_zip_match(st: MergeState) -> None:
    """ZipIt!'s statistics: the pooled correlation of both models' features."""
    o = st.opts
    collector = JointCollector(st.pg, o.positions, o.seed, o.device)
    lockstep_pass(LockstepRunner([st.gm_a, st.gm_b]), collector, st.data, o.device, o.progress, "matching")
    outputs = st.output_roots
    st.zip_sims = {u: c for u, c in collector.similarities().items() if u not in outputs}
    st.zip_keys = collector.keys


def pass_align(st: MergeState) -> None:
    """Permute B's weights so its features sit opposite A's."""
    sampler = st.match.sampler()
    state_b = {}
    for k, v in st.gm_b.state_dict().items():
        lays = st.pg.members.get(k)
        state_b[k] = permute_tensor(v, lays, sampler) if lays is not None else v
    aligned = copy.deepcopy(st.gm_a)
    aligned.load_state_dict(state_b)
    st.gm_b = aligned


def _fixed_roots(st: MergeState, cost_model: CostModel) -> dict:
    """Roots whose merged count the plan may not choose: each model's own
    output (never merged), and roots that must stay merged."""
    fixed = {u: 0 for u in st.output_roots if u in cost_model.uids}
    frozen = frozen_roots(st.pg) | _normalized_roots(st.pg, st.opts.norm_policy)
    fixed.update({u: int(n) for u, n in zip(cost_model.uids, cost_model.sizes) if u in frozen})
    return fixed


def pass_plan(st: MergeState) -> None:
    """Partial merging: how many pairs of every root merge, for the budget."""
    cost_model = CostModel.from_groups(st.pg)
    st.plan = plan_budget(cost_model, st.match.sims, st.opts.budget, fixed=_fixed_roots(st, cost_model))


def pass_plan_full(st: MergeState) -> None:
    """Every root merged (1x): the methods without partial merging."""
    cost_model = CostModel.from_groups(st.pg)
    fixed = _fixed_roots(st, cost_model)
    fixed.update({u: int(s) for u, s in zip(cost_model.uids, cost_model.sizes) if u not in fixed})
    st.plan = plan_budget(cost_model, st.match.sims, st.opts.budget, fixed=fixed)


def pass_plan_zip(st: MergeState) -> None:
    """ZipIt!'s plan: the cut of the root order nearest the budget; zipped
    roots get merge/unmerge matrices, the others stay separate."""
    pg = st.pg
    cost_model = CostModel.from_groups(pg)
    fixed = _fixed_roots(st, cost_model)
    order = [r.uid for r in root_order(pg)]
    k, ratio, feasible = zip_cut(cost_model, order, st.opts.budget, fixed)
    sizes = dict(zip(cost_model.uids, cost_model.sizes.tolist()))
    zipped = {}
    for uid, corr in st.zip_sims.items():
        r = st.zip_keys[uid]
        s = r.structure
        if s is None:
            unit = r
        elif isinstance(s, Product) and s.inner_size == 1:
            unit = find(s.outer)  # one channel per block (depthwise): zip the blocks
        else:
            continue  # heads: ZipIt! has no notion of them; they are averaged
        if k.get(unit.uid, unit.size) == unit.size and corr.shape[0] == 2 * r.size:
            zipped[uid] = merge_matrices(zip_pairs(corr), r.size)
    separate = {u for u, kk in k.items() if kk == 0}
    masks = {u: np.full(sizes[u], kk == sizes[u]) for u, kk in k.items()}
    src = cost_model.source_cost()
    st.plan = Plan(k, masks, st.opts.budget, ratio * src, src, feasible, 0.0)
    st.projector = ZipProjector(zipped, separate)


def pass_widen(st: MergeState) -> None:
    """Emit the widened GraphModule: ``[A-only | merged | B-only]`` per root."""
    st.widener = LayoutWidener(st.plan.masks)
    st.merged = WidenGraph(st.pg, st.widener).run(st.state_a, st.gm_b.state_dict())


def pass_zip_weights(st: MergeState) -> None:
    """ZipIt!'s weights: merge and unmerge matrices applied to both models."""
    contracted = in_axes_of(st.pg)
    state_a, state_b = st.state_a, st.gm_b.state_dict()
    for name, lays in st.pg.members.items():
        if name in state_a:
            set_tensor(st.merged, name, st.projector.merge_tensor(state_a[name], state_b[name], lays,
                                                                  contracted.get(name, set())))


def pass_least_squares(st: MergeState) -> None:
    """PLeaS's layer-wise least squares."""
    st.least_squares = _least_squares(st, st.opts.ls_inputs)


def pass_regmean(st: MergeState) -> None:
    """RegMean: least squares over both models' own inputs, no permutation."""
    st.least_squares = _least_squares(st, "stacked")


def pass_row_blocks(st: MergeState) -> None:
    """Widened convolutions and linears as row blocks (no structural zeros)."""
    st.row_block_layers = split_contractions(st.merged, st.pg, st.widener)


def pass_batch_norm(st: MergeState) -> None:
    """BatchNorm statistics recomputed on the calibration data."""
    if st.opts.reset_bn:
        reset_batch_norm(st.merged, st.data, st.opts.device, st.opts.progress)


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
    "least_squares": pass_least_squares,
    "regmean": pass_regmean,
    "row_blocks": pass_row_blocks,
    "batch_norm": pass_batch_norm,
}

# which passes each method runs, in order
METHOD_PASSES: dict[str, tuple] = {
    "pleas": ("analyze", "match", "align", "plan", "widen", "least_squares", "row_blocks", "batch_norm"),
    "perm": ("analyze", "match", "align", "plan", "widen", "row_blocks", "batch_norm"),
    "zipit": ("analyze", "zip_match", "plan_zip", "widen", "zip_weights", "row_blocks", "batch_norm"),
    "rebasin": ("analyze", "match", "align", "plan_full", "widen", "row_blocks", "batch_norm"),
    "regmean": ("analyze", "plan_full", "widen", "regmean", "row_blocks", "batch_norm"),
    "avg": ("analyze", "plan_full", "widen", "row_blocks", "batch_norm"),
    "ensemble": ("analyze", "plan", "widen", "row_blocks"),
}
assert set(METHOD_PASSES) == set(METHODS) and all(p in PASSES for ps in METHOD_PASSES.values() for p in ps)

# the pass whose time the report lists under each phase name
PHASES = {"analyze": "analysis", "match": "matching", "zip_match": "matching", "align": "matching",
          "plan": "plan", "plan_full": "plan", "plan_zip": "plan", "widen": "widen", "zip_weights": "widen",
          "least_squares": "least_squares", "regmean": "least_squares", "row_blocks": "widen",
          "batch_norm": "batchnorm_reset"}


# ----------------------------------------------------------------------------
# helpers of the passes


def _as_reiterable(data) -> Iterable:
    if data is None:
        raise InputError("no calibration data: pass a DataLoader, a list of tensors or (inputs, targets) pairs")
    if iter(data) is data:  # a one-shot iterator: keep its items for the later passes
        data = list(data)
    return data


def _example_from(data, device) -> tuple:
    for x in input_batches(data, device):
        if x.shape[0] < 1:
            continue
        return (x[:2],)
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


def _count_images(data, device) -> int:
    n = 0
    for i, x in enumerate(input_batches(data, device)):
        if not torch.isfinite(x).all():
            raise InputError(f"the calibration data has non-finite values (batch {i}): clean or re-normalise it")
        n += int(x.shape[0])
    return n


def _progress(it, enabled: bool, desc: str, total=None):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total, leave=False)


def lockstep_pass(runner: LockstepRunner, collector, data, device, progress: bool, desc: str, until=None) -> None:
    """One pass over the calibration data, the collector seeing every node."""
    for i, x in enumerate(_progress(input_batches(data, device), progress, desc)):
        collector.batch = i
        runner.run((x,), collector, until=until)


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the CPU's fused attention kernel (the counter has no formula
    for it): ``q k^T`` and ``attn v``, two FLOPs per multiply-accumulate."""
    *batch, n_q, d_qk = query_shape
    n_kv, d_v = key_shape[-2], value_shape[-1]
    return 2 * int(np.prod(batch)) * n_q * n_kv * (d_qk + d_v)


_EXTRA_FLOP_FORMULAS = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _EXTRA_FLOP_FORMULAS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_attention_flops


def measure_macs(model: nn.Module, example_inputs: tuple) -> float:
    """Multiply-accumulates of one forward pass per example, counted on the
    real ops (``torch.utils.flop_counter``)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS)
    # nn.MultiheadAttention's fused eval-mode kernel is invisible to the
    # counter: take the plain path while counting
    mha = torch.backends.mha
    fast = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), counter:
            model(*example_inputs)
    finally:
        mha.set_fastpath_enabled(fast)
    return counter.get_total_flops() / 2 / max(1, int(example_inputs[0].shape[0]))


@torch.no_grad()
def reset_batch_norm(model: nn.Module, data, device, progress: bool = False) -> int:
    """Recompute every BatchNorm's running statistics on ``data`` (cumulative
    average over all batches; the rest of the model stays in eval mode)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        for x in _progress(input_batches(data, device), progress, "batchnorm reset"):
            model(x)
    finally:
        for m, (mom, tr) in zip(bns, saved):
            m.momentum = mom
            m.train(tr)
    return len(bns)


def _normalized_roots(pg, policy: str) -> set:
    """Roots that must stay merged because a normalisation reads them across
    all features: all of them under the ``merged`` policy, those of
    normalisations the rewrite cannot split under ``split``."""
    nodes = {n.name: n for n in pg.gm.graph.nodes}
    roots: set = set()
    for name, norm in pg.normalizations.items():
        node = nodes[name]
        if policy == "merged" or not splittable(pg.gm, node, norm):
            for lay in normalized_layouts(pg, node, norm):
                roots_within(lay, roots)
    return roots


def _output_width(pg) -> int:
    for n in pg.gm.graph.nodes:
        if n.op == "output":
            v = n.args[0]
            v = v[0] if isinstance(v, (list, tuple)) else v
            meta = getattr(v, "meta", {}).get("fxm_value")
            return int(meta.shape[-1]) if hasattr(meta, "shape") else 0
    return 0


def _least_squares(st: MergeState, inputs: str) -> dict:
    o = st.opts
    systems, modules = layer_systems(st.pg, st.merged, st.gm_a, st.widener, stacked=inputs == "stacked")
    if not systems:
        return {"layers": 0}
    gm_a, gm_b, merged = st.gm_a, st.gm_b, st.merged
    if inputs in ("ensemble", "stacked"):
        waves = [list(systems)]
        models = [gm_a, gm_b]
    else:
        waves = _waves(merged, systems)
        models = [gm_a, gm_b, merged]
    per_layer = {}
    runner = LockstepRunner(models)
    nodes = {n.name: n for n in merged.graph.nodes}
    for w, wave in enumerate(waves):
        collector = GramCollector({k: systems[k] for k in wave}, modules, models, o.positions, o.seed,
                                  stacked=inputs == "stacked")
        desc = "least squares" if len(waves) == 1 else f"least squares {w + 1}/{len(waves)}"
        # waves are in graph order: nothing after a wave's last layer is needed
        lockstep_pass(runner, collector, st.data, o.device, o.progress, desc,
                      until=systems[wave[-1]].node if len(waves) > 1 else None)
        collector.finish()
        for key in wave:
            sysm = systems[key]
            weight = merged.get_parameter(sysm.weight)
            bias = merged.get_parameter(sysm.bias) if sysm.bias is not None else None
            if o.on_least_squares is not None:
                o.on_least_squares(sysm, weight, bias)
            if inputs == "stacked":
                src = [(gm.get_parameter(sysm.weight), gm.get_parameter(sysm.bias) if sysm.bias else None)
                       for gm in (gm_a, gm_b)]
                w_new, bias = regmean_layer(sysm, [s[0] for s in src], [s[1] for s in src], REGMEAN_ALPHA, o.ridge)
            else:
                w_new, bias = solve_layer(sysm, weight, bias, o.ridge)
            if not torch.isfinite(w_new).all():
                raise InputError(f"least squares for '{key}' produced non-finite weights: give more calibration data or a larger ridge")
            set_tensor(merged, sysm.weight, w_new)
            if bias is not None:
                set_tensor(merged, sysm.bias, bias)
            modules[key] = merged.get_submodule(nodes[sysm.node].target)
            per_layer[key] = {"samples": sysm.n, "loss_init": sysm.loss_init, "loss_fit": sysm.loss_fit}
            sysm.gram = sysm.cross = None  # free
    return {"layers": len(systems), "ridge": o.ridge, "inputs": inputs, "passes": len(waves), "per_layer": per_layer}


def _waves(gm: fx.GraphModule, systems: dict) -> list:
    """The fitted weights (system keys) in waves: a weight joins the first
    wave after every fitted weight upstream of it; the weights of one node
    (a packed attention's input and output projections) go in successive
    waves, in the order of their systems."""
    from collections import defaultdict

    by_node: dict = defaultdict(list)
    for key, sysm in systems.items():
        by_node[sysm.node].append(key)
    level: dict = {}
    waves: dict = defaultdict(list)
    for node in gm.graph.nodes:
        up = max((level[a] for a in node.all_input_nodes), default=0)
        for key in by_node.get(node.name, ()):
            waves[up].append(key)
            up += 1
        level[node] = up
    return [waves[k] for k in sorted(waves)]


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


def _report(st: MergeState) -> dict:
    o = st.opts
    macs_a = measure_macs(st.gm_a, st.example_inputs)
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
        "cost_resolution": plan.resolution,
        "macs_source": macs_a,
        "macs_merged": macs_m,
        "params_source": sum(p.numel() for p in st.gm_a.parameters()),
        "params_merged": sum(p.numel() for p in st.merged.parameters()),
        "calibration_inputs": st.n_images,
        "source_num_classes": int(_output_width(st.pg)),
        "row_block_layers": st.row_block_layers,
        "timings": st.timings,
        "least_squares": st.least_squares,
        "pinned_ops": [p.kind for p in st.pg.pinned],
        "norm_policy": o.norm_policy,
    }


# ----------------------------------------------------------------------------


def check_options(*, method, budget, labels, matching, ridge, positions, norm_policy, ls_inputs, device) -> MergeOptions:
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
                        positions=positions, norm_policy=norm_policy, ls_inputs=ls_inputs, device=device)


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
    reset_bn: bool = True,
    norm_policy: str = C.DEFAULT_NORM_POLICY,
    ls_inputs: str = C.DEFAULT_LS_INPUTS,
    progress: bool = False,
    on_least_squares: Optional[Callable] = None,
) -> MergeResult:
    """Merge two models of one architecture into one of ``budget`` x the cost
    of model A (multiply-accumulates).

    ``data`` yields input tensors or ``(inputs, targets)`` pairs (a DataLoader
    works); it is read once for matching, once for least squares and once for
    the BatchNorm reset. ``labels="disjoint"`` keeps both classifiers: the
    merged model outputs ``cat([logits_A, logits_B], -1)``. ``matching`` is
    ``"activation"`` or ``"weight"`` (default: activation for pleas and perm,
    weight for rebasin). ``norm_policy`` says what happens to features that
    a LayerNorm normalises (a transformer's residual stream): ``"split"``
    widens them like any other group and gives each such LayerNorm per-model
    statistics (exact at 2x); ``"merged"`` keeps them fully merged and spends
    the budget elsewhere (heads, MLP width). ``ls_inputs`` picks the inputs
    least squares fits on: the permuted ensemble's (``"ensemble"``, one pass)
    or the merged model's own (``"merged"``, one pass per wave of layers).
    ``ridge`` pulls each least-squares solution toward the permuted weights.
    ``on_least_squares(system, weight, bias)`` is called with every layer's
    accumulated system before it is solved. The source models are never
    modified.
    """
    t_start = time.perf_counter()
    opts = check_options(method=method, budget=budget, labels=labels, matching=matching, ridge=ridge,
                         positions=positions, norm_policy=norm_policy, ls_inputs=ls_inputs, device=device)
    opts.seed, opts.reset_bn, opts.progress, opts.on_least_squares = seed, reset_bn, progress, on_least_squares
    check_same_architecture(model_a, model_b)
    check_finite_state(model_a.state_dict(), "A")
    check_finite_state(model_b.state_dict(), "B")
    data = _as_reiterable(data)
    n_images = _count_images(data, opts.device)
    if n_images < 2:
        raise InputError(f"the calibration data has {n_images} input(s): give at least two (a few hundred for least squares)")
    if example_inputs is None:
        example_inputs = _example_from(data, opts.device)
    elif not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    example_inputs = tuple(x.to(opts.device) for x in example_inputs)
    st = MergeState(opts, copy.deepcopy(model_a).to(opts.device).eval(), copy.deepcopy(model_b).to(opts.device).eval(),
                    data, example_inputs, n_images)
    for name in METHOD_PASSES[opts.method]:
        t = time.perf_counter()
        PASSES[name](st)
        if name == "widen":
            check_shapes(st.merged, st.pg, st.widener, st.example_inputs)
        phase = PHASES[name]
        st.timings[phase] = st.timings.get(phase, 0.0) + time.perf_counter() - t
    st.merged.eval()
    st.timings["total"] = time.perf_counter() - t_start
    return MergeResult(st.merged, _describe_plan(st), _report(st), st.pg)
