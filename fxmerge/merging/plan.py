"""The partial-matching budget planner (the cost it plans with: ``cost``).

Planning. Start fully merged (cost 1x) and un-merge, a slice of pairs at a
time, the least similar remaining pairs of the root with the best ratio of
disagreement repaired (``sum 1 - similarity``) to cost added, until the target
is met; the last slice is sized by bisection so the achieved cost lands on the
target to within one pair.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from fxmerge.analysis.ir import Concat, Dep, Product, find, fold
from fxmerge.errors import InputError
from fxmerge.analysis.rules.registry import weight_layouts
from fxmerge.merging.cost import CostModel


def roots_within(lay, into: set) -> set:
    """Add the uid of every root dim inside ``lay`` (its parts, product
    outers and inners, and the keys of dependent axes) to ``into``."""
    if isinstance(lay, Dep):
        for t in lay.table:
            roots_within(t, into)
        return into
    r = find(lay)
    into.add(r.uid)
    s = r.structure
    if isinstance(s, Concat):
        for p in s.parts:
            roots_within(p, into)
    elif isinstance(s, Product):
        roots_within(s.outer, into)
        for i in s.inners:
            roots_within(i, into)
    return into


def inners_widen_alike(inners) -> bool:
    """Whether the blocks of a product with a fixed outer axis (such as the
    ``3`` of a packed q/k/v projection) keep equal widths under every plan:
    they are one root, or all products of one movable outer root (heads) with
    equal inner sizes, which widen block by block."""
    if any(isinstance(i, Dep) for i in inners):
        return False
    roots = [find(i) for i in inners]
    if len({r.uid for r in roots}) == 1:
        return True
    outers = set()
    for r in roots:
        s = r.structure
        if not isinstance(s, Product) or find(s.outer).pinned:
            return False
        outers.add((find(s.outer).uid, s.inner_size))
    return len(outers) == 1


def frozen_roots(pg) -> set:
    """Roots that must stay fully merged: everything inside the blocks of a
    product whose blocks cannot move (a grouped convolution or GroupNorm over
    a concatenation). Widening them independently would give blocks of
    different widths, which no grouped op can compute."""
    frozen: set = set()

    def under(x):
        roots_within(x, frozen)

    def walk(x):
        if isinstance(x, Dep):
            return
        r = find(x)
        s = r.structure
        if isinstance(s, Concat):
            for p in s.parts:
                walk(p)
        elif isinstance(s, Product):
            if not find(s.outer).pinned:
                walk(s.outer)
            elif inners_widen_alike(s.inners):
                for i in s.inners:
                    walk(i)
            else:
                for i in s.inners:
                    under(i)

    for lays in pg.members.values():
        for lay in lays:
            walk(lay)
    # grouped contractions over channels that are not a product of movable
    # blocks (groups cut through a concatenation)
    for c in pg.contractions.values():
        if c.groups > 1:
            lays = weight_layouts(pg, c)
            out = find(lays[0]) if not isinstance(lays[0], Dep) else None
            movable = out is not None and isinstance(out.structure, Product) and not find(out.structure.outer).pinned
            if not movable and out is not None and out.size != c.groups:
                for lay in lays[:2]:
                    under(lay)
    return frozen


def normalized_roots(pg) -> set:
    """Roots of the features a LayerNorm/RMSNorm normalises (a transformer's
    residual stream)."""
    from .rewrite import normalized_layouts

    nodes = {n.name: n for n in pg.gm.graph.nodes}
    out: set = set()
    for name, norm in pg.normalizations.items():
        for lay in normalized_layouts(pg, nodes[name], norm):
            roots_within(lay, out)
    return out


def block_inner_roots(pg) -> set:
    """Roots inside the blocks of a product whose blocks move whole (the
    per-group channels of a grouped convolution): the rewrite widens such a
    product block by block, so a root inside its blocks keeps its width even
    where it also appears as an axis of its own (ResNeSt sums its radix
    blocks into one axis and reads that axis with a dense layer)."""
    inner: set = set()

    def blocks(r, s) -> None:
        walk(s.outer)
        for i in s.inners:
            roots_within(i, inner)

    def walk(x) -> None:
        fold(x, dep=lambda l: [walk(t) for t in l.table], atom=lambda r: None, product=blocks,
             concat=lambda r, parts: [walk(p) for p in parts])

    for lays in pg.members.values():
        for lay in lays:
            walk(lay)
    return inner


def merged_only_roots(pg, norm_policy: str) -> dict:
    """Roots that must stay fully merged, each with the reason: blocks that
    cannot move (a grouped op over a concatenation), channels inside blocks
    that widen whole, features a normalisation reads across the whole axis
    (all of them under ``norm_policy="merged"``, those the rewrite cannot
    split otherwise). Features an op combines (``Mixing``: reductions,
    softmax, normalize over channels) widen: the op runs once per model view
    (``views.mixing_parts``). Each root maps to the list of its reasons."""
    from fxmerge.analysis.rules.registry import op_kind
    from .rewrite import normalized_layouts, splittable

    why: dict = {}

    def keep(lay, reason):
        for u in roots_within(lay, set()):
            if reason not in why.setdefault(u, []):
                why[u].append(reason)

    for u in frozen_roots(pg):
        why.setdefault(u, []).append("a grouped op over a concatenation keeps its blocks")
    for u in block_inner_roots(pg):
        why.setdefault(u, []).append("blocks (convolution groups, heads) widen whole, never within one")
    nodes = {n.name: n for n in pg.gm.graph.nodes}
    for name, norm in pg.normalizations.items():
        node = nodes[name]
        if norm_policy == "merged" or not splittable(pg.gm, node, norm):
            module = pg.gm.get_submodule(node.target) if node.op == "call_module" else None
            reason = (f"{op_kind(node, module)} normalises them"
                      + (" (norm_policy='merged')" if norm_policy == "merged" else " and cannot be split per model"))
            for lay in normalized_layouts(pg, node, norm):
                keep(lay, reason)
    return why


@dataclass
class Plan:
    """Per root: how many pairs merge and which (``masks``), with the cost.
    For more than two models (``clusters.plan_clusters``): ``k`` counts the
    units every model shares, ``masks`` holds each widened root's partition
    (``(n_models, units)`` cluster labels) and ``histograms`` its channels'
    roles."""

    k: dict
    masks: dict
    target: float
    achieved: float
    source_cost: float
    feasible: tuple  # (min, max) relative cost
    resolution: float = 0.0  # relative cost of the smallest step next to the target
    histograms: Optional[dict] = None
    n_models: int = 2

    @property
    def ratio(self) -> float:
        return self.achieved / self.source_cost if self.source_cost else 1.0


def reach(model: CostModel) -> dict:
    """Per root: how many layers read it (inputs of contractions and of
    activation products), at least 1. A residual stream feeds every block;
    a hidden width one layer."""
    count: dict = {u: 0 for u in model.uids}
    for layer in model.layers:
        for u in layer.in_form[1]:
            count[u] += 1
    for p in model.products:
        for _, form in p.dims:
            for u in form[1]:
                count[u] += 1
    return {u: max(c, 1) for u, c in count.items()}


def plan_budget(model: CostModel, sims: dict, budget: float, *, fixed: dict | None = None, chunks: int = 32,
                score: str = "pairs", first: set = frozenset()) -> Plan:
    """Choose ``k`` per root so the model costs ``budget`` x model A.

    ``sims[uid]`` holds the similarity of every matched pair (per A unit);
    ``fixed[uid]`` forces a root's ``k`` (pinned output roots, inner roots).
    ``score``: what un-merging a pair repairs: ``"pairs"`` counts its
    disagreement ``1 - similarity`` once, ``"reach"`` once per layer that
    reads the root (``reach``), so wide-reaching roots (residual streams)
    are un-merged earlier; ``"residual"`` un-merges the roots in ``first``
    (the residual streams) before any other.
    """
    if not 1.0 <= budget <= 2.0:
        raise InputError(f"budget must be between 1 and 2 (x the cost of one source model), got {budget}")
    fixed = dict(fixed or {})
    k = model.k_full()
    for i, u in enumerate(model.uids):
        if u in fixed:
            k[i] = fixed[u]
    free = [i for i, u in enumerate(model.uids) if u not in fixed]
    src = model.source_cost()
    target = budget * src
    k_max = k.copy()
    k_max[free] = 0
    lo, hi = model.cost(k), model.cost(k_max)
    weight = reach(model) if score == "reach" else {}
    if score == "residual":
        weight = {u: 1e6 for u in first}
    # order of un-merging inside each root: least similar pairs first
    order = {}
    for i in free:
        u = model.uids[i]
        s = np.asarray(sims.get(u, np.zeros(model.sizes[i])), dtype=np.float64)
        order[i] = (np.argsort(s, kind="stable"), s)  # ascending similarity
    cost = lo
    resolution = 0.0
    if target >= hi * (1 - 1e-9):
        k, cost = k_max, hi  # nothing merges: the ensemble
    elif target > cost:
        while True:
            best, best_ratio = None, -np.inf
            for i in free:
                if k[i] == 0:
                    continue
                n = int(model.sizes[i])
                step = min(int(k[i]), max(1, -(-n // chunks)))
                idx, s = order[i]
                removed = n - k[i]
                gain = (float(np.sum(1.0 - s[idx[removed:removed + step]])) + 1e-9 * step) * weight.get(model.uids[i], 1)
                k2 = k.copy()
                k2[i] -= step
                dc = model.cost(k2) - cost
                ratio = gain / dc if dc > 0 else np.inf
                if ratio > best_ratio:
                    best, best_ratio, best_step, best_cost = i, ratio, step, cost + dc
            if best is None:
                break
            if best_cost >= target:
                # bisection on the slice size to land on the target
                lo_s, hi_s = 0, best_step
                while hi_s - lo_s > 1:
                    mid = (lo_s + hi_s) // 2
                    k2 = k.copy()
                    k2[best] -= mid
                    if model.cost(k2) >= target:
                        hi_s = mid
                    else:
                        lo_s = mid
                k_lo, k_hi = k.copy(), k.copy()
                k_lo[best] -= lo_s
                k_hi[best] -= hi_s
                c_lo, c_hi = model.cost(k_lo), model.cost(k_hi)
                k, cost = (k_lo, c_lo) if abs(c_lo - target) <= abs(c_hi - target) else (k_hi, c_hi)
                resolution = (c_hi - c_lo) / src if src else 0.0
                break
            k[best] -= best_step
            cost = best_cost
    kd = {u: int(v) for u, v in zip(model.uids, k)}
    masks = {}
    for i, u in enumerate(model.uids):
        n = int(model.sizes[i])
        if kd[u] >= n:
            continue
        if i in order:
            idx, _ = order[i]
            keep = idx[n - kd[u]:]  # the most similar pairs stay merged
        else:
            keep = np.arange(kd[u])
        m = np.zeros(n, dtype=bool)
        m[keep] = True
        masks[u] = m
    return Plan(kd, masks, target, cost, src, (lo / src if src else 1.0, hi / src if src else 1.0), resolution)
