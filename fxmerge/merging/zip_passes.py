"""ZipIt!'s passes: pooled statistics, its plan, its weights and the cut of
partial zipping. Their state (``ZipState``) is their own.

    zip_match    pooled statistics of both models     -> pairs within and across models
    zip_plan     heads aligned, features zipped, cut  -> Plan, the cut's position
    zip_weights  merge/unmerge matrices               -> zipped weights
    zip_cut      everything after the cut separate    -> partially zipped GraphModule
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional

from fxmerge.runtime.runner import LockstepRunner
from fxmerge.runtime.tensors import set_tensor, tensor_state

from .cost import node_costs
from .passes import align_weights, check_budget, full_plan
from .pipeline import MergeState, lockstep_pass, merge_pass
from .rewrite import in_axes_of
from .zipit import JointCollector, ZipProjector, align_products, choose_cut, emit_partial_zip, zipped_atoms


@dataclass
class ZipState:
    """ZipIt!'s statistics, its projector and the cut of partial zipping."""

    sims: dict = field(default_factory=dict)
    keys: dict = field(default_factory=dict)
    projector: Optional[ZipProjector] = None
    cut: int = 0
    cut_node: Optional[str] = None

    def report(self) -> dict:
        return {"zip_cut": self.cut_node, "zip_cut_position": self.cut}


@merge_pass("zip_match", "matching")
def pass_zip_match(st: MergeState) -> None:
    """ZipIt!'s statistics: the pooled correlation of both models' features."""
    o = st.opts
    collector = JointCollector(st.pg, o.positions, o.seed, o.device, max_memory=o.max_memory)
    lockstep_pass(LockstepRunner([st.gm_a, st.gm_b]), collector, st.batches(), o.progress, "matching")
    collector.reduce()
    outputs = st.output_roots
    st.method_state = ZipState(sims={u: c for u, c in collector.similarities().items() if u not in outputs},
                               keys=collector.keys)


@merge_pass("zip_plan", "plan")
def pass_zip_plan(st: MergeState) -> None:
    """ZipIt!'s plan: heads and convolution groups aligned as units (B's
    weights permuted), every other feature zipped within or across models;
    the planned widths are all merged but each model's own outputs; the cut
    of partial zipping chosen for the budget."""
    z = st.method_state
    outputs = st.output_roots
    if st.opts.zip_heads == "align":
        st.match = align_products(st.pg, z.sims, z.keys, outputs)
        align_weights(st)
    zipped = zipped_atoms(z.sims, z.keys, outputs)
    z.projector = ZipProjector(zipped, set())
    full_plan(st)
    full = st.plan.ratio
    z.cut, ratio, feasible = choose_cut(st.pg, node_costs(st.gm_a, st.example_inputs), st.opts.budget, full)
    st.plan.feasible = feasible
    st.plan.achieved = ratio * st.plan.source_cost
    st.plan.target = st.opts.budget * st.plan.source_cost
    check_budget(st)


@merge_pass("zip_weights", "widen")
def pass_zip_weights(st: MergeState) -> None:
    """ZipIt!'s weights: merge and unmerge matrices applied to both models
    (aligned blocks averaged)."""
    contracted = in_axes_of(st.pg)
    state_a, state_b = tensor_state(st.gm_a), tensor_state(st.gm_b)
    projector = st.method_state.projector
    for name, lays in st.pg.members.items():
        if name in state_a:
            set_tensor(st.merged, name, projector.merge_tensor(state_a[name], state_b[name], lays,
                                                               contracted.get(name, set())))


@merge_pass("zip_cut", "widen")
def pass_zip_cut(st: MergeState) -> None:
    """Partial zipping: the model after the cut is both source models, side
    by side, reading the zipped features unzipped to their own."""
    z = st.method_state
    nodes = list(st.pg.gm.graph.nodes)
    if z.cut < len(nodes):
        model_b = copy.deepcopy(st.gm_a)
        model_b.load_state_dict({k: v for k, v in st.model_b.state_dict().items() if k in model_b.state_dict()})
        st.merged = emit_partial_zip(st.merged, st.gm_a, model_b, st.pg, z.cut, z.projector.zipped,
                                     st.match.sampler(), st.opts.labels)
        contractions = {c.node for c in st.pg.contractions.values()}
        z.cut_node = next((n.name for n in nodes[z.cut:] if n.name in contractions), None)
