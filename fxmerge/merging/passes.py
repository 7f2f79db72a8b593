"""The merging stage's passes: analysis, matching, alignment, planning,
widening and the row-block split, each a function of the ``MergeState``.

    analyze     trace + ChannelAnalysis              -> PermutationGroups, A's and B's GraphModules
    match       A and B in lockstep (or weights)     -> Matching
    align       permute B's weights                  -> B opposite A
    plan        CostModel + plan_budget              -> Plan: merged pairs per root, for the budget
    plan_full   every root merged (1x)               -> Plan
    widen       WidenGraph                           -> the widened GraphModule (checked shapes)
    row_blocks  split_contractions                   -> no structural zeros computed

Every plan ends with ``check_budget``: what the plan cannot do is said.
"""
from __future__ import annotations

import copy
import warnings

import torch

from fxmerge import constants as C
from fxmerge.analysis.channels import analyze
from fxmerge.analysis.ir import layout_size
from fxmerge.analysis.rules.registry import op_kind
from fxmerge.analysis.tracing import trace
from fxmerge.errors import BudgetError, BudgetWarning, InputError
from fxmerge.runtime.runner import LockstepRunner
from fxmerge.runtime.tensors import set_tensor, tensor_state
from fxmerge.runtime.validate import model_name

from .cost import ClusterCost, CostModel, measure_macs, node_costs
from .clusters import plan_clusters
from .matching import activation_matching, permuted, weight_matching
from .statistics import ActivationCollector
from .universe import match_universe
from .parts import pinned_layers
from .pipeline import MergeState, lockstep_pass, merge_pass
from .plan import merged_only_roots, normalized_roots, plan_budget
from .rewrite import WidenGraph, check_shapes, split_contractions
from .widening import LayoutWidener


@merge_pass("analyze", "analysis")
def pass_analyze(st: MergeState) -> None:
    """Trace model A, find its groups; every other model's weights go into
    A's graph."""
    st.pg = analyze(st.model_a, st.example_inputs, per_model_output=st.opts.labels == "disjoint", fold_weights=True)
    st.sources = [st.pg.gm] + [weights_in_graph(st, m, model_name(i)) for i, m in enumerate(st.models) if i]


def weights_in_graph(st: MergeState, model, name: str):
    """A copy of A's GraphModule holding ``model``'s tensors."""
    gm = copy.deepcopy(st.pg.gm)
    state = dict(model.state_dict())
    wanted = tensor_state(gm)
    if any(k not in state for k in wanted):
        # non-persistent buffers (some are computed by the forward, at the
        # input's size) and tensors the tracer turned into graph constants:
        # read the model's own from a trace of a copy of it (the same graph, names)
        state = {**tensor_state(trace(model, st.example_inputs, check=False, fold_weights=True).gm), **state}
    if any(k not in state for k in wanted):
        # a table A cached in a forward already run (at this input size) and
        # this model builds on its first call: run it once too
        warmed = copy.deepcopy(model).eval()
        with torch.no_grad():
            st.example_inputs.call(warmed)
        state = {**tensor_state(trace(warmed, st.example_inputs, check=False, fold_weights=True).gm), **state}
    missing = [k for k in wanted if k not in state]
    if missing:
        raise InputError(f"model {name} has no tensor for {missing[0]!r} of model A's graph: "
                         "merge models of the same architecture")
    for k, v in wanted.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise InputError(f"{k!r} is {tuple(v.shape)} in model A but {tuple(state[k].shape)} in model {name}: "
                             "merge models of the same architecture")
        set_tensor(gm, k, state[k].detach().clone())
    return gm


@merge_pass("match", "matching")
def pass_match(st: MergeState) -> None:
    """Which feature of B corresponds to which of A: activation matching
    (one lockstep pass over the data) or Git Re-Basin's weight matching.
    More than two models are matched into one shared order (``universe``)."""
    o = st.opts
    if st.n_models > 2:
        st.universe = match_universe(st)
        return
    if o.matching == "weight":
        st.match = weight_matching(st.pg, tensor_state(st.gm_a), tensor_state(st.gm_b), seed=o.seed, exclude=st.output_roots)
        return
    collector = ActivationCollector(st.pg, o.positions, o.seed, o.device, models=(st.gm_a, st.gm_b),
                                    max_memory=o.max_memory)
    lockstep_pass(LockstepRunner([st.gm_a, st.gm_b]), collector, st.batches(), o.progress, "matching")
    collector.reduce()
    st.match = activation_matching(collector, exclude=st.output_roots)


@merge_pass("align", "matching")
def pass_align(st: MergeState) -> None:
    """Permute every model's weights so its features sit opposite A's (or,
    for more than two models, opposite the shared order)."""
    if st.universe is not None:
        st.sources = list(st.universe.aligned)  # aligned while the universe was found
        return
    align_weights(st)


def align_weights(st: MergeState) -> None:
    """B's weights permuted by the matching (``st.sources[1]`` replaced)."""
    st.sources[1] = permuted(st.pg, st.gm_a, st.gm_b, st.match.sampler())


def fixed_roots(st: MergeState, cost_model: CostModel) -> dict:
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
    model = CostModel.from_groups(st.pg, source_macs=st.macs_a)
    if model.parts:  # what runs per model view but no layer covers (an opaque module) is counted too
        if st.node_macs_a is None:
            st.node_macs_a = node_costs(st.gm_a, st.example_inputs)
        model.count_unmodelled(st.node_macs_a)
    return model


@merge_pass("plan", "plan")
def pass_plan(st: MergeState) -> None:
    """Partial merging: how many pairs of every root merge, for the budget
    (for more than two models: how the models cluster per feature)."""
    cost_model = cost_model_of(st)
    if st.n_models > 2:
        st.plan = plan_clusters(cost_model, st.universe.similarity if st.universe else {}, st.opts.budget,
                                st.n_models, fixed=fixed_roots(st, cost_model))
        check_budget(st)
        return
    residual = {r.uid for g in st.pg.all_groups if g.kind == "residual" for r in g.roots}
    score = st.opts.planner
    if score == "auto":  # residual streams first where a LayerNorm normalises them (transformers)
        normalized = normalized_roots(st.pg)
        residual &= normalized
        score = "residual" if residual else "pairs"
    st.plan = plan_budget(cost_model, st.match.sims, st.opts.budget, fixed=fixed_roots(st, cost_model),
                          score=score, first=residual)
    check_budget(st)


@merge_pass("plan_full", "plan")
def pass_plan_full(st: MergeState) -> None:
    """Every root merged (1x): the methods without partial merging."""
    full_plan(st)
    check_budget(st)


def full_plan(st: MergeState) -> None:
    """``st.plan`` with every root merged but each model's own outputs."""
    cost_model = cost_model_of(st)
    fixed = fixed_roots(st, cost_model)
    fixed.update({u: int(s) for u, s in zip(cost_model.uids, cost_model.sizes) if u not in fixed})
    if st.n_models > 2:
        st.plan = plan_clusters(cost_model, {}, st.opts.budget, st.n_models, fixed=fixed)
        return
    st.plan = plan_budget(cost_model, st.match.sims, st.opts.budget, fixed=fixed)


@merge_pass("widen", "widen")
def pass_widen(st: MergeState) -> None:
    """Emit the widened GraphModule: ``[A-only | merged | B-only]`` per root
    (one channel per cluster of models for more than two)."""
    st.widener = LayoutWidener(st.plan.masks, st.n_models)
    widen = WidenGraph(st.pg, st.widener)
    st.merged = widen.run([tensor_state(gm) for gm in st.sources])
    st.per_model_views = widen.per_view
    check_shapes(st.merged, st.pg, st.widener, st.example_inputs)
    check_pinned_layers(st)


def check_pinned_layers(st: MergeState) -> None:
    """A merge at budget N is promised to be the ensemble: a layer that reads
    widened channels into pinned ones (outside the parts run per model view)
    keeps each model's rows merged, so say so (``report["kept_merged"]``,
    a ``BudgetWarning``; ``BudgetError`` under ``strict``)."""
    st.pinned_layers = {n: (f"the output channels of '{n}' ({kind}) are pinned", channels)
                        for n, (kind, lay, channels) in pinned_layers(st.pg).items()
                        if n not in st.per_model_views and st.widener.size(lay) != layout_size(lay)}
    if not st.pinned_layers or st.opts.budget < st.n_models - 1e-6 or not st.method.budgeted or not st.budget_reachable:
        return
    st.budget_reachable = False
    first = next(iter(st.pinned_layers.values()))[0]
    more = f" (+{len(st.pinned_layers) - 1} more layers)" if len(st.pinned_layers) > 1 else ""
    say(st, f"at {st.opts.budget:.2f}x the merged model is not the ensemble: {first}{more}", stacklevel=5)


@merge_pass("row_blocks", "widen")
def pass_row_blocks(st: MergeState) -> None:
    """Widened convolutions and linears as row blocks (no structural zeros)."""
    st.row_block_layers = split_contractions(st.merged, st.pg, st.widener)


def check_budget(st: MergeState) -> None:
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
    if o.labels == "shared" and outputs_features(st.pg):
        blockers.append("the model's output: features its own layers read, kept merged by labels='shared' "
                        "(labels='disjoint' keeps each model's)")
    messages = []
    if not st.budget_reachable:
        listed = "; ".join(blockers[:4]) + (f" (+{len(blockers) - 4} more)" if len(blockers) > 4 else "")
        messages.append(f"budget {o.budget:.2f}x is out of reach for this model: it can cost at most {high:.3f}x"
                        + (f"; kept from widening by: {listed}" if blockers else ""))
    if st.budget_reachable and o.budget >= st.n_models - tol and st.kept_merged and st.method.budgeted:
        # the cost is reached (a merged row reading both models' inputs costs
        # as much as two rows), but a 2x merge is promised to be the ensemble
        st.budget_reachable = False
        reasons = "; ".join(sorted({why for r in st.kept_merged.values() for why in r}))
        messages.append(f"at {o.budget:.2f}x the merged model is not the ensemble: some features stay merged "
                        f"({reasons})")
    if st.pinned_share > C.PINNED_SHARE_WARNING and st.method.permutes:
        kinds = ", ".join(p.kind for p in st.pg.pinned[:3]) or "none"
        messages.append(f"{100 * st.pinned_share:.0f}% of the conv/linear weights cannot be permuted (pinned op kinds: "
                        f"{kinds}): the merge averages them index by index")
    for m in messages:
        say(st, m, stacklevel=5)


def say(st: MergeState, message: str, *, stacklevel: int) -> None:
    """What the merge cannot do, said: a ``BudgetWarning`` (``stacklevel``
    as the caller's) and a line in ``report["warnings"]``, or ``BudgetError``
    under ``strict``."""
    if st.opts.strict:
        raise BudgetError(message + " (strict)")
    warnings.warn(message, BudgetWarning, stacklevel=stacklevel + 1)
    st.warnings.append(message)


def outputs_features(pg) -> bool:
    """Whether the model outputs features (a model without a classifier)
    rather than a layer's own output: walking back from the output through
    ops of one input, a node other than a contraction is reached."""
    contractions = {c.node for c in pg.contractions.values()}
    output = next(n for n in pg.gm.graph.nodes if n.op == "output")
    for node in output.all_input_nodes:
        while node.name not in contractions and len(node.all_input_nodes) == 1 and node.op != "placeholder":
            node = node.all_input_nodes[0]
        if node.name not in contractions:
            return True
    return False


@merge_pass("check_cost", "widen")
def pass_check_cost(st: MergeState) -> None:
    """No silent miss: the emitted model's cost, measured, against the
    budget asked. Off by more than ``COST_TOLERANCE`` (relative) where the
    budget is reachable, the merge warns and names the op kinds whose
    measured cost departs from what the plan counted."""
    if st.macs_a is None:
        st.macs_a = measure_macs(st.gm_a, st.example_inputs)
    st.macs_merged = measure_macs(st.merged, st.example_inputs)
    ratio = st.macs_merged / st.macs_a if st.macs_a else 1.0
    budget = st.opts.budget
    if not st.budget_reachable or abs(ratio - budget) <= C.COST_TOLERANCE * budget:
        return
    message = f"the merged model costs {ratio:.3f}x, not the {budget:.2f}x asked"
    if abs(st.plan.ratio - budget) > C.COST_TOLERANCE * budget:
        # the plan itself lands there: the nearest cost its units allow (whole blocks, a ZipIt! cut)
        message += f": the nearest plan costs {st.plan.ratio:.3f}x"
    else:
        kinds = cost_departures(st)
        if kinds:
            message += (f": the plan does not count how the cost of {'; '.join(kinds[:4])} grows when channels "
                        "widen; there the widened model mixes the models' features (at 2x it is not the ensemble)")
    say(st, message, stacklevel=4)


def cost_departures(st: MergeState) -> list:
    """Op kinds (with their nodes) whose measured cost in the merged model
    departs from the plan's by more than half a percent of the source's
    cost: nodes the cost model covers against its count at the plan's merge
    counts, the others against their cost in the source model."""
    planned = node_costs(st.gm_a, st.example_inputs)
    cost_model = cost_model_of(st)
    if st.plan.histograms is not None:
        planned.update(ClusterCost(cost_model, st.n_models).node_costs(st.plan.histograms))
    else:
        planned.update(cost_model.node_costs(st.plan.k))
    measured = node_costs(st.merged, st.example_inputs)
    nodes = {n.name: n for n in st.pg.gm.graph.nodes}
    by_kind: dict = {}
    for name, cost in measured.items():
        if name in nodes and abs(cost - planned.get(name, 0.0)) > 0.005 * st.macs_a:
            n = nodes[name]
            kind = op_kind(n, st.gm_a.get_submodule(n.target) if n.op == "call_module" else None)
            by_kind.setdefault(kind, []).append(name)
    return [f"{kind} ({', '.join(names[:3])})" for kind, names in by_kind.items()]
