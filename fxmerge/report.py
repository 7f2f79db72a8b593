"""What a merge returns: the plan (``MergePlan``: per group, what merged),
the report (costs, warnings, timings, what was fitted) and the merged model
(``MergeResult``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch.fx as fx

from fxmerge.analysis.groups import PermutationGroups
from fxmerge.merging.cost import measure_macs
from fxmerge.merging.pipeline import MergeState


@dataclass
class MergePlan:
    """What was merged: per group, its width in each model, merged pairs and
    the merged model's width; the B permutation per group."""

    method: str
    budget: float
    labels: str
    groups: list  # dicts: id, kind, size, merged, width
    # group id -> B index per A index; for more than two models ``(N, size)``:
    # each model's own feature at every position of the shared order
    permutations: dict = field(default_factory=dict)
    # group id -> merged mask (A index order); for more than two models the
    # partition: each model's cluster label per feature of the shared order
    masks: dict = field(default_factory=dict)
    n_models: int = 2

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "budget": self.budget,
            "labels": self.labels,
            "n_models": self.n_models,
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


def describe_plan(st: MergeState) -> MergePlan:
    o = st.opts
    groups, perms, masks = [], {}, {}
    for g in st.pg.groups:
        if g.parent is not None:
            groups.append({"id": g.id, "kind": g.kind, "size": g.size, "blocks": g.blocks, "merged": g.size, "width": g.size})
            continue
        uid = g.roots[0].uid
        k = st.plan.k.get(uid, g.size)
        width = 2 * g.size - k if st.n_models == 2 or st.widener is None else st.widener.size(g.roots[0])
        groups.append({"id": g.id, "kind": g.kind, "size": g.size, "merged": int(k), "width": int(width)})
        if st.universe is not None:
            if g.roots[0].structure is None:
                perms[g.id] = np.stack([p.get(uid, np.arange(g.size)) for p in st.universe.perms])
        elif uid in st.match.perms:
            perms[g.id] = np.asarray(st.match.perms[uid])
        if uid in st.plan.masks:
            masks[g.id] = st.plan.masks[uid]
    return MergePlan(o.method, o.budget, o.labels, groups, perms, masks, st.n_models)


def kept_merged_summary(st: MergeState) -> list:
    """The reasons roots must stay merged, with how many channels each
    keeps."""
    sizes = {r.uid: r.size for g in st.pg.all_groups for r in g.roots}
    count: dict = {}
    for u, reasons in st.kept_merged.items():
        for why in reasons:
            count[why] = count.get(why, 0) + sizes.get(u, 0)
    kept = [{"reason": why, "channels": n} for why, n in sorted(count.items(), key=lambda kv: -kv[1])]
    return kept + [{"reason": why, "channels": n} for why, n in st.pinned_layers.values()]


def output_width(pg) -> int:
    for n in pg.gm.graph.nodes:
        if n.op == "output":
            v = n.args[0]
            v = v[0] if isinstance(v, (list, tuple)) else v
            meta = getattr(v, "meta", {}).get("fxm_value")
            return int(meta.shape[-1]) if hasattr(meta, "shape") else 0
    return 0


def build_report(st: MergeState) -> dict:
    o = st.opts
    macs_a = st.macs_a if st.macs_a is not None else measure_macs(st.gm_a, st.example_inputs)
    macs_m = st.macs_merged if st.macs_merged is not None else measure_macs(st.merged, st.example_inputs)
    plan = st.plan
    return {
        "method": o.method,
        "budget": o.budget,
        "labels": o.labels,
        "n_models": st.n_models,
        "matching": o.matching if st.method.matching is not None else "identity",
        "cost_planned": plan.ratio,
        "cost_measured": macs_m / macs_a if macs_a else float("nan"),
        "cost_feasible": list(plan.feasible),
        "budget_reachable": st.budget_reachable,
        "pinned_share": st.pinned_share,
        "kept_merged": kept_merged_summary(st),
        "warnings": st.warnings,
        "cost_resolution": plan.resolution,
        "macs_source": macs_a,
        "macs_merged": macs_m,
        "params_source": sum(p.numel() for p in st.gm_a.parameters()),
        "params_merged": sum(p.numel() for p in st.merged.parameters()),
        "calibration_inputs": st.n_images,
        "world_size": len(st.images_per_rank) or 1,
        "images_per_rank": st.images_per_rank,
        "bytes_reduced": st.bytes_reduced,
        "source_num_classes": int(output_width(st.pg)),
        "row_block_layers": st.row_block_layers,
        "per_model_views": st.per_model_views,
        "timings": st.timings,
        "least_squares": st.least_squares,
        "least_squares_skipped": st.skipped_layers,
        "sweep": st.sweep,
        "bn_stats": o.bn_stats,
        "pinned_ops": [p.kind for p in st.pg.pinned] + list(st.pg.rule_pins),
        "norm_policy": o.norm_policy,
        **({"universe": st.universe.report(st.pg)} if st.universe is not None else {}),
        **(st.method_state.report() if hasattr(st.method_state, "report") else {}),
    }
