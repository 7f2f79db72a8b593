"""ZipIt!'s passes: pooled statistics, its plan, its weights and the cut of
partial zipping. Their state (``ZipState``) is their own.

    zip_match    pooled statistics of every model     -> pairs (clusters) within and across models
    zip_plan     heads aligned, features zipped, cut  -> Plan, the cut's position
    zip_weights  merge/unmerge matrices               -> zipped weights
    zip_cut      everything after the cut separate    -> partially zipped GraphModule
    cca_plan     heads aligned, CCA maps per root     -> Plan (1x); CCA Merge's matrices for zip_weights
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional

from fxmerge.runtime.runner import LockstepRunner
from fxmerge.runtime.tensors import set_tensor, tensor_state

from .cost import node_costs
from .cca import cca_atoms
from .matching import Matching, permuted
from .passes import check_budget, full_plan
from .pipeline import MergeState, lockstep_pass, merge_pass
from .rewrite import in_axes_of
from .zip_cut import choose_cut, emit_partial_zip
from .zipit import JointCollector, ZipProjector, align_products, zipped_atoms


@dataclass
class ZipState:
    """ZipIt!'s statistics, its projector and the cut of partial zipping."""

    sims: dict = field(default_factory=dict)
    covs: dict = field(default_factory=dict)  # pooled covariances (CCA Merge)
    keys: dict = field(default_factory=dict)
    projector: Optional[ZipProjector] = None
    aligns: list = field(default_factory=list)  # per model, how its blocks were aligned opposite A's
    cut: int = 0
    cut_node: Optional[str] = None

    def report(self) -> dict:
        return {"zip_cut": self.cut_node, "zip_cut_position": self.cut}


@merge_pass("zip_match", "matching")
def pass_zip_match(st: MergeState) -> None:
    """ZipIt!'s statistics: the pooled correlation of every model's features."""
    o = st.opts
    collector = JointCollector(st.pg, o.positions, o.seed, o.device, max_memory=o.max_memory, n_models=st.n_models)
    lockstep_pass(LockstepRunner(st.sources), collector, st.batches(), o.progress, "matching")
    collector.reduce()
    outputs = st.output_roots
    st.method_state = ZipState(sims={u: c for u, c in collector.similarities().items() if u not in outputs},
                               covs={u: c for u, c in collector.covariances().items() if u not in outputs},
                               keys=collector.keys)


@merge_pass("zip_plan", "plan")
def pass_zip_plan(st: MergeState) -> None:
    """ZipIt!'s plan: heads and convolution groups aligned as units (B's
    weights permuted), every other feature zipped within or across models;
    the planned widths are all merged but each model's own outputs; the cut
    of partial zipping chosen for the budget."""
    z = st.method_state
    outputs = st.output_roots
    align_blocks(st)
    zipped = zipped_atoms(z.sims, z.keys, outputs, st.n_models)
    z.projector = ZipProjector(zipped, set(), st.n_models)
    full_plan(st)
    full = st.plan.ratio
    z.cut, ratio, feasible = choose_cut(st.pg, node_costs(st.gm_a, st.example_inputs), st.opts.budget, full,
                                        st.n_models)
    st.plan.feasible = feasible
    st.plan.achieved = ratio * st.plan.source_cost
    st.plan.target = st.opts.budget * st.plan.source_cost
    check_budget(st)


def align_blocks(st: MergeState) -> None:
    """Heads and convolution groups of every model aligned opposite A's
    (``zip_heads="align"``), the models' weights permuted accordingly."""
    z = st.method_state
    z.aligns = [Matching() for _ in range(st.n_models)]
    if st.opts.zip_heads == "align":
        for m in range(1, st.n_models):
            z.aligns[m] = align_products(st.pg, z.sims, z.keys, st.output_roots, model=m)
            st.sources[m] = permuted(st.pg, st.gm_a, st.sources[m], z.aligns[m].sampler())
        st.match = z.aligns[1]


@merge_pass("cca_plan", "plan")
def pass_cca_plan(st: MergeState) -> None:
    """CCA Merge's plan: blocks aligned as units, every other root's features
    mapped into A's by CCA (``cca``), everything merged (1x)."""
    z = st.method_state
    align_blocks(st)
    z.projector = ZipProjector(cca_atoms(z.covs, z.keys, st.output_roots, st.n_models), set(), st.n_models,
                               linear_maps=True)
    z.cut = len(st.pg.gm.graph.nodes)
    full_plan(st)
    check_budget(st)


@merge_pass("zip_weights", "widen")
def pass_zip_weights(st: MergeState) -> None:
    """ZipIt!'s weights: merge and unmerge matrices applied to every model
    (aligned blocks averaged)."""
    contracted = in_axes_of(st.pg)
    states = [tensor_state(gm) for gm in st.sources]
    projector = st.method_state.projector
    for name, lays in st.pg.members.items():
        if name in states[0]:
            set_tensor(st.merged, name, projector.merge_tensor([s[name] for s in states], lays,
                                                               contracted.get(name, set())))


@merge_pass("zip_cut", "widen")
def pass_zip_cut(st: MergeState) -> None:
    """Partial zipping: the model after the cut is every source model, side
    by side, reading the zipped features unzipped to its own."""
    z = st.method_state
    nodes = list(st.pg.gm.graph.nodes)
    if z.cut < len(nodes):
        gms = [st.gm_a]
        for model in st.models[1:]:  # each model's own (unaligned) weights: the unzip reads its own order
            gm = copy.deepcopy(st.gm_a)
            gm.load_state_dict({k: v for k, v in model.state_dict().items() if k in gm.state_dict()})
            gms.append(gm)
        st.merged = emit_partial_zip(st.merged, gms, st.pg, z.cut, z.projector.zipped,
                                     [m.sampler() for m in z.aligns], st.opts.labels)
        contractions = {c.node for c in st.pg.contractions.values()}
        z.cut_node = next((n.name for n in nodes[z.cut:] if n.name in contractions), None)
