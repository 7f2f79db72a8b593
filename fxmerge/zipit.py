"""ZipIt!: merging features within and across the two models.

ZipIt! (Stoica et al., 2024) does not pair A's features with B's: it pools
both models' ``2d`` features of a group, correlates all of them, and merges
the ``d`` most correlated pairs wherever they come from (two of A's features
may merge). Per root this gives a merge matrix ``M`` (``d x 2d``, each row
averages one pair) for the axes that produce the features and an unmerge
matrix ``U`` (``2d x d``, each pair's two features read their merged one)
for the axes that consume them. Partial zipping merges the roots that come
first in the graph and keeps the rest separate (both models' later layers side
by side, outputs averaged or concatenated); the cut is placed where the cost
comes closest to the budget.

The pass reuses the widening rewrite: zipped roots are planned as fully
merged (width ``d``), separate ones as unmerged (width ``2d``), so module
attributes and shape constants follow; only the parameter values differ:

    merged = sum over models m of  T_m x_axis P_axis,m   (every channel axis)

with ``P`` the model's slice of ``M`` on output axes and of ``U^T`` on
contracted (input) axes.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.linalg import block_diag

from .ir import Concat, Dep, Product, find
from .lstsq import gram_upper, symmetric
from .matching import ActivationCollector, correlation_from_moments, occurrences
from .rules.registry import weight_layouts


class JointStats:
    """Streaming float64 sums for the correlation of the pooled features
    ``[A | B]`` at one site (``2d x 2d``), relative to their first-batch mean
    as in ``CorrelationStats``."""

    __slots__ = ("n", "shift", "s", "ss")

    def __init__(self, d: int, device):
        self.n = 0
        self.shift = None
        self.s = torch.zeros(2 * d, dtype=torch.float64, device=device)
        self.ss = torch.zeros(2 * d, 2 * d, dtype=torch.float64, device=device)

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        x = torch.cat([a, b], dim=1)
        if self.shift is None:
            self.shift = x.mean(0)
        x = x - self.shift
        self.n += x.shape[0]
        self.ss += gram_upper(x)  # mirrored in correlation()
        self.s += x.double().sum(0)

    @staticmethod
    def nbytes(d: int) -> int:
        return 8 * (4 * d * d + 2 * d)

    def reduce(self) -> None:
        from .distributed import all_sum, broadcast_object, sum_int, world_size

        if world_size() <= 1:
            return
        ref = broadcast_object(self.shift.cpu() if self.shift is not None else None)
        if ref is not None and self.shift is not None:
            d = (self.shift - ref.to(self.shift.device)).double()
            # sums of (x - ref) from sums of (x - shift), upper triangle as accumulated
            full = self.s[:, None] * d[None, :] + d[:, None] * self.s[None, :] + self.n * d[:, None] * d[None, :]
            self.ss += torch.triu(full)
            self.s += self.n * d
        self.n = sum_int(self.n)
        all_sum(self.s, self.ss)

    def correlation(self) -> np.ndarray:
        n = max(self.n, 1)
        m = self.s / n
        cov = symmetric(self.ss) / n - m[:, None] * m[None, :]
        var = torch.diagonal(cov)
        return correlation_from_moments(cov, var, var)


class JointCollector(ActivationCollector):
    """The matching pass's collector with pooled ``2d x 2d`` statistics."""

    stats_class = JointStats
    structured_outers = False  # ZipIt! zips channels, never within-block orders


def zip_pairs(corr: np.ndarray) -> list:
    """Greedy ZipIt! matching: the ``d`` disjoint pairs of the ``2d`` pooled
    features with the highest correlations, most correlated first."""
    n = corr.shape[0]
    d = n // 2
    iu, ju = np.triu_indices(n, k=1)
    order = np.argsort(-corr[iu, ju], kind="stable")
    used = np.zeros(n, dtype=bool)
    pairs = []
    for t in order:
        i, j = iu[t], ju[t]
        if used[i] or used[j]:
            continue
        used[i] = used[j] = True
        pairs.append((int(i), int(j)))
        if len(pairs) == d:
            break
    return pairs


def merge_matrices(pairs: list, d: int) -> tuple:
    """``M`` (``d x 2d``) and ``U`` (``2d x d``) of a list of pairs."""
    M = np.zeros((d, 2 * d))
    U = np.zeros((2 * d, d))
    for f, (i, j) in enumerate(pairs):
        M[f, i] = M[f, j] = 0.5
        U[i, f] = U[j, f] = 1.0
    return M, U


class ZipProjector:
    """Per-model axis matrices (``new x old``) for every IR layout under a
    ZipIt! plan: ``zipped[root uid] = (M, U)``; roots in ``separate`` keep
    both models' features side by side; every other root is averaged (the
    features are shared: pinned axes, heads, blocks)."""

    def __init__(self, zipped: dict, separate: set):
        self.zipped = zipped
        self.separate = separate

    def matrices(self, lay, contracted: bool) -> tuple:
        if isinstance(lay, Dep):
            return self._shared(lay.size)
        r = find(lay)
        s = r.structure
        if r.pinned:
            return self._shared(r.size)
        if r.uid in self.zipped:
            M, U = self.zipped[r.uid]
            d = r.size
            if contracted:
                return U[:d].T, U[d:].T
            return M[:, :d], M[:, d:]
        if s is None:
            if r.uid in self.separate:
                return self._apart(r.size)
            return self._shared(r.size)
        if isinstance(s, Concat):
            parts = [self.matrices(p, contracted) for p in s.parts]
            return tuple(block_diag(*[p[m] for p in parts]) for m in (0, 1))
        outer = find(s.outer)
        n = s.inner_size
        if outer.pinned:
            inners = [self.matrices(i, contracted) for i in s.inners]
            return tuple(block_diag(*[p[m] for p in inners]) for m in (0, 1))
        # blocks (heads, conv groups) move or stay whole: inner axes shared
        pa, pb = self.matrices(s.outer, contracted)
        eye = np.eye(n)
        return np.kron(pa, eye), np.kron(pb, eye)

    @staticmethod
    def _shared(d: int) -> tuple:
        return np.eye(d), np.eye(d)

    @staticmethod
    def _apart(d: int) -> tuple:
        z = np.zeros((d, d))
        e = np.eye(d)
        return np.vstack([e, z]), np.vstack([z, e])

    def merge_tensor(self, a: torch.Tensor, b: torch.Tensor, lays, in_axes) -> torch.Tensor:
        """``sum_m T_m x_axis P_axis,m``, normalised so every entry is a
        weighted average: along output axes each model's share of a new index
        is its row sum of ``P`` (``M`` splits 1 between a pair, a shared axis
        gives each model 1, a separate axis 1 to its own model), and an entry
        is divided by the summed product of its shares over the axes."""
        if not a.is_floating_point():
            return a.clone()
        if a.ndim == 0 or not lays:
            return 0.5 * (a + b)
        # per axis: both models' matrices, and None where they are the identity
        per_axis = []
        for axis, lay in enumerate(lays):
            pair = self.matrices(lay, axis in in_axes)
            per_axis.append(tuple(None if P.shape[0] == P.shape[1] and np.array_equal(P, np.eye(P.shape[0])) else
                                  torch.as_tensor(P, dtype=torch.float64, device=a.device) for P in pair))
        out = share = None
        for m, t in enumerate((a, b)):
            t = t.double()
            w = torch.ones((1,) * t.ndim, dtype=torch.float64, device=t.device)
            for axis, pair in enumerate(per_axis):
                P = pair[m]
                if axis not in in_axes and P is not None:  # identity rows give each model a share of 1
                    shape = [1] * t.ndim
                    shape[axis] = P.shape[0]
                    w = w * P.sum(1).reshape(shape)
                if P is not None:
                    t = torch.movedim(torch.tensordot(P, t, dims=([1], [axis])), 0, axis)
            out = t if out is None else out + t
            share = w if share is None else share + w
        share = share.expand_as(out)
        out = torch.where(share > 0, out / share.clamp_min(1e-12), torch.zeros_like(out))
        return out.to(a.dtype)


def root_order(pg) -> list:
    """Matchable atom roots in the order the graph first produces them (the
    output axis of each contraction, in graph order)."""
    seen, order = set(), []
    nodes = [n for n in pg.gm.graph.nodes if n.name in pg.contractions]
    for node in nodes:
        c = pg.contractions[node.name]
        for r, _ in occurrences(weight_layouts(pg, c)[1 if c.weight_in_axis == 0 else 0]):
            if r.uid not in seen and r.structure is None:
                seen.add(r.uid)
                order.append(r)
    return order


def zip_cut(model, order: list, budget: float, fixed: dict):
    """Partial zipping: the roots of ``model`` (a ``CostModel``) that come
    before the cut in ``order`` merge fully, the rest stay separate; the cut
    whose cost is closest to ``budget`` x model A wins. Returns
    ``(k per uid, cost ratio, (min, max) ratio)``."""
    src = model.source_cost()
    position = {u: i for i, u in enumerate(order)}
    last = len(order)
    rank = np.array([position.get(u, last) for u in model.uids])
    best = None
    costs = []
    for cut in range(last + 2):
        k = np.where(rank < cut, model.sizes, 0)
        for i, u in enumerate(model.uids):
            if u in fixed:
                k[i] = fixed[u]
        ratio = model.cost(k) / src
        costs.append(ratio)
        if best is None or abs(ratio - budget) < abs(best[1] - budget) - 1e-12:
            best = (k, ratio)
    return dict(zip(model.uids, best[0].tolist())), best[1], (min(costs), max(costs))
