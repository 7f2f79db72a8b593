"""Partial merging of N models: per feature, which models share a channel.

Once every model is aligned to one shared order (``universe``), each
feature of a root (a channel, or a block of heads) has N aligned versions.
Merging a cluster of them into one channel replaces each by the cluster's
mean; for features scaled to unit variance the squared error this costs is

    SSE(cluster) = 2 / |cluster| * sum over pairs in it of (1 - similarity)

(two models: ``1 - similarity``, the two-model planner's score). Per feature
the models are clustered agglomeratively by Ward's criterion (the merge
that adds the least SSE first); read backwards, the dendrogram is a
sequence of N - 1 *splits*, from one shared channel to one per model, each
repairing the SSE it removes. The planner starts with every feature shared
(1x) and takes splits across all roots, a slice at a time, by the best
ratio of SSE repaired to cost added (``ClusterCost``), the last slice sized
by bisection to land on the budget, as the two-model planner does.
"""
from __future__ import annotations

import numpy as np

from fxmerge.errors import InputError

from .cost import ClusterCost, CostModel
from .plan import Plan
from .widening import model_bit


def ward_splits(sim: np.ndarray) -> tuple:
    """Splits of one feature's ``(N, N)`` similarity matrix, fewest clusters
    first: ``(gains, labels)`` with ``labels[t]`` the models' cluster labels
    with ``t + 1`` clusters and ``gains[t]`` the SSE the split from ``t + 1``
    to ``t + 2`` clusters repairs (non-increasing)."""
    n = sim.shape[0]
    dis = np.clip(1.0 - sim, 0.0, None)

    def sse(members) -> float:
        idx = np.asarray(members)
        return float(dis[np.ix_(idx, idx)].sum()) / len(idx)  # 2/|C| sum over pairs = 1/|C| sum over ordered pairs

    clusters = [[m] for m in range(n)]
    levels = [(0.0, [list(c) for c in clusters])]
    while len(clusters) > 1:
        best = None
        for i in range(len(clusters)):
            for j in range(i + 1, len(clusters)):
                grow = sse(clusters[i] + clusters[j]) - sse(clusters[i]) - sse(clusters[j])
                if best is None or grow < best[0] - 1e-12:
                    best = (grow, i, j)
        grow, i, j = best
        clusters = [c for t, c in enumerate(clusters) if t not in (i, j)] + [clusters[i] + clusters[j]]
        levels.append((levels[-1][0] + grow, [list(c) for c in clusters]))
    levels.reverse()  # one cluster first
    labels = np.zeros((n, n), dtype=np.int64)
    for t, (_, cs) in enumerate(levels):
        for lab, c in enumerate(sorted(cs, key=min)):
            labels[t, c] = lab
    total = [s for s, _ in levels]
    gains = np.array([max(total[t] - total[t + 1], 0.0) for t in range(n - 1)])
    return np.minimum.accumulate(gains) if len(gains) else gains, labels


def roles_of(labels: np.ndarray) -> list:
    """The role (bit set of models) of every cluster of one feature."""
    roles: dict = {}
    for m, lab in enumerate(labels.tolist()):
        roles[lab] = roles.get(lab, 0) | model_bit(m)
    return list(roles.values())


class RootSplits:
    """The splits of one root's units in the order the planner takes them
    (most SSE repaired first; a unit's splits in their own order)."""

    def __init__(self, sims: np.ndarray, n_models: int):
        units = sims.shape[-1]
        self.n = n_models
        self.labels = np.zeros((units, n_models, n_models), dtype=np.int64)
        gains = np.zeros((units, n_models - 1))
        for i in range(units):
            gains[i], self.labels[i] = ward_splits(sims[:, :, i])
        unit, level = np.meshgrid(np.arange(units), np.arange(n_models - 1), indexing="ij")
        order = np.lexsort((level.ravel(), -gains.ravel()))
        self.unit, self.gain = unit.ravel()[order], gains.ravel()[order]
        self.size = len(self.unit)
        # the role histogram of each unit at each level (its clusters' roles)
        self.unit_hist = np.zeros((units, n_models, 1 << n_models))
        for i in range(units):
            for t in range(n_models):
                for r in roles_of(self.labels[i, t]):
                    self.unit_hist[i, t, r] += 1

    def levels(self, taken: int) -> np.ndarray:
        """Each unit's level (clusters - 1) after the first ``taken`` splits."""
        return np.bincount(self.unit[:taken], minlength=self.labels.shape[0])

    def histogram(self, taken: int) -> np.ndarray:
        lv = self.levels(taken)
        return self.unit_hist[np.arange(len(lv)), lv].sum(0)

    def partition(self, taken: int) -> np.ndarray:
        """``(N, units)`` cluster labels after ``taken`` splits."""
        lv = self.levels(taken)
        return self.labels[np.arange(len(lv)), lv].T.copy()


def plan_clusters(model: CostModel, similarity: dict, budget: float, n_models: int, *, fixed: dict | None = None,
                  chunks: int = 32) -> Plan:
    """Choose, per root, how the ``n_models`` models cluster on every unit so
    the widened model costs ``budget`` x one source model.

    ``similarity[uid]``: the ``(N, N, units)`` similarity of every pair of
    aligned models per unit (missing: no evidence, all alike at 0).
    ``fixed[uid]``: ``0`` keeps every model apart on that root (each model's
    own outputs), its size keeps it merged (``plan_budget``'s convention).
    """
    if not 1.0 <= budget <= n_models:
        raise InputError(f"budget must be between 1 and {n_models} (x the cost of one source model), got {budget}")
    fixed = dict(fixed or {})
    cm = ClusterCost(model, n_models)
    sizes = dict(zip(model.uids, model.sizes.tolist()))
    split = {}
    for u in model.uids:
        sims = similarity.get(u)
        if sims is None or sims.shape[-1] != sizes[u]:
            sims = np.zeros((n_models, n_models, sizes[u]))
        split[u] = RootSplits(sims, n_models)
    taken = {u: 0 for u in model.uids}
    for u, k in fixed.items():
        if u in taken:
            taken[u] = split[u].size if k == 0 else 0
    free = [u for u in model.uids if u not in fixed]

    def hists(t: dict) -> dict:
        return {u: split[u].histogram(n) for u, n in t.items()}

    src = model.source_cost()
    target = budget * src
    lo = cm.cost(hists(taken))
    hi = cm.cost(hists({**taken, **{u: split[u].size for u in free}}))
    cost, resolution = lo, 0.0
    if target >= hi * (1 - 1e-9):
        taken.update({u: split[u].size for u in free})
        cost = hi
    elif target > cost:
        while True:
            best = None
            for u in free:
                s = split[u]
                if taken[u] >= s.size:
                    continue
                step = min(s.size - taken[u], max(1, -(-s.size // chunks)))
                gain = float(s.gain[taken[u]:taken[u] + step].sum()) + 1e-9 * step
                dc = cm.cost(hists({**taken, u: taken[u] + step})) - cost
                ratio = gain / dc if dc > 0 else np.inf
                if best is None or ratio > best[0]:
                    best = (ratio, u, step, cost + dc)
            if best is None:
                break
            _, u, step, new_cost = best
            if new_cost >= target:
                lo_s, hi_s = 0, step
                while hi_s - lo_s > 1:
                    mid = (lo_s + hi_s) // 2
                    if cm.cost(hists({**taken, u: taken[u] + mid})) >= target:
                        hi_s = mid
                    else:
                        lo_s = mid
                c_lo = cm.cost(hists({**taken, u: taken[u] + lo_s}))
                c_hi = cm.cost(hists({**taken, u: taken[u] + hi_s}))
                taken[u] += lo_s if abs(c_lo - target) <= abs(c_hi - target) else hi_s
                cost = c_lo if abs(c_lo - target) <= abs(c_hi - target) else c_hi
                resolution = (c_hi - c_lo) / src if src else 0.0
                break
            taken[u] += step
            cost = new_cost
    partitions, merged, final = {}, {}, hists(taken)
    for u in model.uids:
        part = split[u].partition(taken[u])
        merged[u] = int((part == part[:1]).all(0).sum())  # units every model shares
        if taken[u]:
            partitions[u] = part
    return Plan(merged, partitions, target, cost, src, (lo / src if src else 1.0, hi / src if src else 1.0),
                resolution, histograms=final, n_models=n_models)
