"""ZipIt!: merging features within and across the models.

ZipIt! (Stoica et al., 2024) does not pair A's features with B's: it pools
both models' ``2d`` features of a group, correlates all of them, and merges
the ``d`` most correlated pairs wherever they come from (two of A's features
may merge). With N models it pools their ``N d`` features and merges, most
correlated first, until ``d`` remain (``zip_clusters``: a merged feature's
correlation with the others is the least of its members', scaled by
``ZIP_ALPHA``; merges within one model are limited by ``ZIP_BETA``, the
paper's alpha and beta). Per root this gives a merge matrix ``M`` (``d x
N d``, each row averages one cluster) for the axes that produce the
features and an unmerge matrix ``U`` (``N d x d``, each cluster's features
read their merged one) for the axes that consume them:

    merged = sum over models m of  T_m x_axis P_axis,m   (every channel axis)

with ``P`` the model's slice of ``M`` on output axes and of ``U^T`` on
contracted (input) axes.

Heads and convolution groups move as units. ZipIt!'s paper has no notion of
them (its authors report that transformers failed on head misalignment);
like its successors (MuDSC), fxmerge aligns them first with the engine's
two-level matching (``align_products``: within each pair of blocks, then
blocks as units) and merges the aligned blocks.

Partial zipping (``zip_cut``) is the paper's: the layers before a cut are
zipped, everything after it stays separate.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.linalg import block_diag

from fxmerge.analysis.ir import Dep, Product, find, fold
from fxmerge.runtime.tensors import add_gram_upper, symmetric
from .statistics import ActivationCollector, correlation_from_moments


ZIP_ALPHA, ZIP_BETA = 0.3, 0.125  # ZipIt!'s alpha and beta (its section 4.3 and code defaults)


class JointStats:
    """Streaming float64 sums for the correlation of the pooled features
    ``[A | B | ...]`` at one site (``N d x N d``), relative to their
    first-batch mean as in ``CorrelationStats``."""

    __slots__ = ("n", "shift", "s", "ss")

    def __init__(self, d: int, device, n_models: int = 2):
        self.n = 0
        self.shift = None
        self.s = torch.zeros(n_models * d, dtype=torch.float64, device=device)
        self.ss = torch.zeros(n_models * d, n_models * d, dtype=torch.float64, device=device)

    def add(self, *xs: torch.Tensor) -> None:
        x = torch.cat(xs, dim=1)
        if self.shift is None:
            self.shift = x.mean(0)
        x = x - self.shift
        self.n += x.shape[0]
        add_gram_upper(self.ss, x)  # mirrored in correlation()
        self.s += x.sum(0, dtype=torch.float64)

    @staticmethod
    def nbytes(d: int, n_models: int = 2) -> int:
        return 8 * (n_models * n_models * d * d + n_models * d)

    def reduce(self) -> None:
        from fxmerge.runtime.distributed import all_sum, broadcast_object, sum_int, world_size

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

    def covariance(self) -> torch.Tensor:
        n = max(self.n, 1)
        m = self.s / n
        return symmetric(self.ss) / n - m[:, None] * m[None, :]

    def correlation(self) -> np.ndarray:
        cov = self.covariance()
        var = torch.diagonal(cov)
        return correlation_from_moments(cov, var, var)


class JointCollector(ActivationCollector):
    """The matching pass's collector with pooled ``N d x N d`` statistics."""

    stats_class = JointStats
    structured_outers = False  # ZipIt! zips channels, never within-block orders

    def __init__(self, *args, n_models: int = 2, **kwargs):
        super().__init__(*args, **kwargs)
        self.n_models = n_models

    def stats_bytes(self, d: int) -> int:
        return JointStats.nbytes(d, self.n_models)

    def new_statistic(self, d: int) -> JointStats:
        return JointStats(d, self.device, self.n_models)

    def covariances(self) -> dict:
        """Mean pooled covariance per root over all of its sites (CCA Merge's statistic)."""
        acc: dict = {}
        count: dict = {}
        for (_, _, uid, _), st in self.stats.items():
            c = st.covariance().cpu().numpy()
            acc[uid] = c if uid not in acc else acc[uid] + c
            count[uid] = count.get(uid, 0) + 1
        return {uid: acc[uid] / count[uid] for uid in acc}


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


def zip_clusters(corr: np.ndarray, n_models: int, alpha: float = ZIP_ALPHA, beta: float = ZIP_BETA) -> list:
    """ZipIt!'s matching of ``n_models`` models' pooled features (``corr``:
    ``N d x N d``): merge the most correlated pair of clusters until ``d``
    remain; a merged cluster correlates with each other one as the least of
    its two parts did, times ``alpha``. A model may merge its own features
    with each other (two clusters of its features only) ``beta`` times its
    share of the merges; beyond that its own clusters merge only with
    others'."""
    n = corr.shape[0]
    d = n // n_models
    sims = corr.astype(np.float64).copy()
    np.fill_diagonal(sims, -np.inf)
    clusters = [[i] for i in range(n)]
    owners = [{i // d} for i in range(n)]  # the models whose features each cluster holds
    budget = [int((n - d) // n_models * beta + 1e-4)] * n_models
    alive = np.ones(n, dtype=bool)
    for _ in range(n - d):
        single = np.array([len(o) == 1 and budget[next(iter(o))] <= 0 for o in owners])
        spent = np.array([next(iter(o)) if len(o) == 1 else -1 for o in owners])
        blocked = single[:, None] & single[None, :] & (spent[:, None] == spent[None, :])
        usable = alive[:, None] & alive[None, :] & ~np.eye(n, dtype=bool)
        masked = np.where(usable & ~blocked, sims, -np.inf)
        if not np.isfinite(masked).any():
            masked = np.where(usable, sims, -np.inf)  # nothing else is left to merge
        if not np.isfinite(masked).any():
            masked = np.where(usable, 0.0, -np.inf)
        i, j = sorted(divmod(int(np.argmax(masked)), n))
        if len(owners[i]) == 1 and owners[i] == owners[j]:
            budget[next(iter(owners[i]))] -= 1
        clusters[i] += clusters[j]
        owners[i] = owners[i] | owners[j]
        alive[j] = False
        row = np.minimum(sims[i], sims[j]) * alpha
        sims[i], sims[:, i] = row, row
        sims[i, i] = -np.inf
        sims[j], sims[:, j] = -np.inf, -np.inf
    return [sorted(clusters[i]) for i in range(n) if alive[i]]


def merge_matrices(groups: list, d: int, n_models: int = 2) -> tuple:
    """``M`` (``d x N d``) and ``U`` (``N d x d``) of ``d`` clusters (pairs
    for two models) of pooled features."""
    M = np.zeros((d, n_models * d))
    U = np.zeros((n_models * d, d))
    for f, members in enumerate(groups):
        for i in members:
            M[f, i] = 1.0 / len(members)
            U[i, f] = 1.0
    return M, U


class ZipProjector:
    """Per-model axis matrices (``new x old``) for every IR layout under a
    ZipIt! plan: ``zipped[root uid] = (M, U)``; roots in ``separate`` keep
    both models' features side by side; every other root is averaged (the
    features are shared: pinned axes, heads, blocks)."""

    def __init__(self, zipped: dict, separate: set, n_models: int = 2, linear_maps: bool = False):
        self.zipped = zipped
        self.separate = separate
        self.n_models = n_models
        # the zipped matrices map each model's features into one space
        # (CCA Merge) rather than average clusters: every model counts 1 there
        self.linear_maps = linear_maps

    def matrices(self, lay, contracted: bool) -> tuple:
        """Every model's matrix (``new x old``) for one axis."""
        n = self.n_models
        zipped = self._zipped(lay)
        if zipped is not None:
            M, U = zipped
            d = find(lay).size
            if contracted:
                return tuple(U[m * d:(m + 1) * d].T for m in range(n))
            return tuple(M[:, m * d:(m + 1) * d] for m in range(n))

        def parts(r, parts) -> tuple:
            mats = [self.matrices(p, contracted) for p in parts]
            return tuple(block_diag(*[p[m] for p in mats]) for m in range(n))

        def blocks(r, s) -> tuple:
            # blocks (heads, conv groups) move or stay whole: inner axes shared
            eye = np.eye(s.inner_size)
            return tuple(np.kron(p, eye) for p in self.matrices(s.outer, contracted))

        return fold(lay, dep=lambda l: self._shared(l.size), pinned=lambda r: self._shared(r.size),
                    atom=lambda r: self._apart(r.size) if r.uid in self.separate else self._shared(r.size),
                    concat=parts, product=blocks)

    def _zipped(self, lay):
        """The merge and unmerge matrices of a zipped root (an atom, or
        depthwise blocks), else None."""
        if isinstance(lay, Dep):
            return None
        r = find(lay)
        return None if r.pinned else self.zipped.get(r.uid)

    def _shared(self, d: int) -> tuple:
        return tuple(np.eye(d) for _ in range(self.n_models))

    def _apart(self, d: int) -> tuple:
        z = np.zeros((d, d))
        return tuple(np.vstack([np.eye(d) if k == m else z for k in range(self.n_models)])
                     for m in range(self.n_models))

    def merge_tensor(self, tensors: list, lays, in_axes) -> torch.Tensor:
        """``sum_m T_m x_axis P_axis,m``, normalised so every entry is a
        weighted average: along output axes each model's share of a new index
        is its row sum of ``P`` (``M`` splits 1 between a pair, a shared axis
        gives each model 1, a separate axis 1 to its own model), and an entry
        is divided by the summed product of its shares over the axes."""
        a = tensors[0]
        if not a.is_floating_point():
            return a.clone()
        if a.ndim == 0 or not lays:
            return sum(tensors) / len(tensors) if len(tensors) > 2 else 0.5 * (a + tensors[1])
        # per axis: both models' matrices, and None where they are the identity
        per_axis = []
        for axis, lay in enumerate(lays):
            pair = self.matrices(lay, axis in in_axes)
            per_axis.append(tuple(None if P.shape[0] == P.shape[1] and np.array_equal(P, np.eye(P.shape[0])) else
                                  torch.as_tensor(P, dtype=torch.float64, device=a.device) for P in pair))
        out = share = None
        for m, t in enumerate(tensors):
            t = t.double()
            w = torch.ones((1,) * t.ndim, dtype=torch.float64, device=t.device)
            for axis, pair in enumerate(per_axis):
                P = pair[m]
                if axis not in in_axes and P is not None and not self.linear_maps:  # identity rows: a share of 1
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


def align_products(pg, sims: dict, keys: dict, exclude: set, model: int = 1):
    """Heads and convolution groups aligned as units, as ZipIt!'s successors
    (MuDSC) do: the block of each product root's pooled correlation between
    A and ``model`` goes through the engine's two-level matching (within
    every pair of blocks, then blocks as units). Returns the ``Matching``
    (its perms move that model's blocks and within-block orders opposite
    A's)."""
    from .matching import solve

    cross = {}
    for uid, corr in sims.items():
        r = keys[uid]
        s = r.structure
        if isinstance(s, Product) and s.inner_size > 1 and not find(s.outer).pinned and uid not in exclude:
            d = r.size
            cross[uid] = corr[:d, model * d:(model + 1) * d]
    return solve(cross, keys)


def zippable(pooled: dict, keys: dict, exclude: set, n_models: int):
    """``(uid, size, statistic)`` of every root whose channels are merged
    one by one: atom roots and depthwise blocks (one channel per block),
    from a pooled statistic per root (``N d x N d``)."""
    for uid, stat in pooled.items():
        r = keys[uid]
        s = r.structure
        if uid in exclude or stat.shape[0] != n_models * r.size:
            continue
        if s is None or (isinstance(s, Product) and s.inner_size == 1):
            yield uid, r.size, stat


def zipped_atoms(sims: dict, keys: dict, exclude: set, n_models: int = 2) -> dict:
    """ZipIt!'s pairs (two models) or clusters (more) for every root
    ``zippable`` gives (merging within or across models): ``{root uid: (M, U)}``."""
    zipped = {}
    for uid, size, corr in zippable(sims, keys, exclude, n_models):
        groups = zip_pairs(corr) if n_models == 2 else zip_clusters(corr, n_models)
        zipped[uid] = merge_matrices(groups, size, n_models)
    return zipped
