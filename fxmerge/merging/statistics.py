"""Activation statistics for matching: the cross-correlation of A's and B's
features at every site where a root appears, gathered over the calibration
data in one lockstep pass (``ActivationCollector``) and summed across ranks.
"""
from __future__ import annotations

import zlib
from collections import defaultdict

import numpy as np
import torch
import torch.fx

from fxmerge.analysis.ir import Product, find, fold, is_pinned
from fxmerge.errors import InputError
from fxmerge.analysis.rules.registry import tensors_in
from fxmerge.runtime.runner import sample_positions
from fxmerge.runtime.tensors import matmul, positions_view, rows


def occurrences(lay, structured_outers: bool = False) -> list:
    """``(key, positions)`` for every matchable root inside a layout:
    ``key`` is the atom root, or the product root for an unpinned product
    (whose positions span all of its blocks). ``structured_outers``: also
    products whose blocks follow a structured dim (a depthwise multiplier
    after a concatenation), whose inner dims are matched once the parts are."""
    def parts(r, parts) -> list:
        out, off = [], 0
        for p in parts:
            out += [(key, positions + off) for key, positions in walk(p)]
            off += p.size
        return out

    def blocks(r, s) -> list:
        # blocks following a structured dim: its parts are matched where they occur
        whole = find(s.outer).structure is None or (structured_outers and s.inner_size > 1)
        return [(r, np.arange(r.size))] if whole else []

    def walk(x) -> list:
        return fold(x, dep=lambda l: [], pinned=lambda r: [], concat=parts, product=blocks,
                    atom=lambda r: [(r, np.arange(r.size))] if r.size > 1 else [])

    return walk(lay)


def site_nodes(pg) -> list:
    """Nodes whose values matching reads: the inputs and outputs of every
    contraction layer (what the next layer consumes and what a layer makes)."""
    names = []
    nodes = {n.name: n for n in pg.gm.graph.nodes}
    for c in pg.contractions.values():
        node = nodes[c.node]
        src = node.args[0] if node.args else None
        if src is not None and hasattr(src, "name"):
            names.append(src.name)
        names.append(node.name)
    seen, out = set(), []
    for n in names:
        if n not in seen:
            seen.add(n)
            out.append(n)
    return out


def correlation_from_moments(cov: torch.Tensor, var_a: torch.Tensor, var_b: torch.Tensor) -> np.ndarray:
    """Pearson correlations from a covariance block and both variances.

    A constant feature (zero variance) correlates with nothing, and rounding
    never pushes a correlation past [-1, 1]: out-of-range values would make
    the assignment prefer a numerical accident over a real match."""
    sd_a, sd_b = var_a.clamp_min(0).sqrt(), var_b.clamp_min(0).sqrt()
    corr = cov / (sd_a[:, None] * sd_b[None, :] + 1e-8)
    return corr.clamp(-1.0, 1.0).cpu().numpy()


class CorrelationStats:
    """Streaming float64 sums for the cross-correlation of A's and B's features
    at one site: memory is independent of the number of samples.

    Features are accumulated relative to their mean on the first batch (the
    shifted-data formula): the cross-product runs in the activations'
    precision, and a feature whose mean dwarfs its spread (a saturated gate,
    a biased channel) would otherwise lose its covariance to cancellation in
    ``E[ab] - E[a]E[b]``."""

    __slots__ = ("n", "shift_a", "shift_b", "sa", "sb", "saa", "sbb", "sab")

    def __init__(self, d: int, device):
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        self.n = 0
        self.shift_a = self.shift_b = None
        self.sa, self.sb, self.saa, self.sbb = z(d), z(d), z(d), z(d)
        self.sab = z(d, d)

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        if self.shift_a is None:
            self.shift_a, self.shift_b = a.mean(0), b.mean(0)
        a, b = a - self.shift_a, b - self.shift_b
        # the cross-product of one batch in the activations' precision (the
        # costly part), every sum over batches in float64
        self.n += a.shape[0]
        self.sab += matmul(a.T, b)
        self.sa += a.sum(0, dtype=torch.float64)
        self.sb += b.sum(0, dtype=torch.float64)
        self.saa += a.pow(2).sum(0, dtype=torch.float64)
        self.sbb += b.pow(2).sum(0, dtype=torch.float64)

    @staticmethod
    def nbytes(d: int) -> int:
        return 8 * (d * d + 4 * d)

    def reduce(self) -> None:
        _reduce_moments(self)

    def correlation(self) -> np.ndarray:
        n = max(self.n, 1)
        ma, mb = self.sa / n, self.sb / n
        cov = self.sab / n - ma[:, None] * mb[None, :]
        return correlation_from_moments(cov, self.saa / n - ma * ma, self.sbb / n - mb * mb)


class DiagonalStats:
    """Streaming float64 sums for the correlation of two aligned models'
    features at the same position only (``d`` values, not ``d x d``): what
    the N-model planner reads once every model is aligned."""

    __slots__ = ("n", "shift_a", "shift_b", "sa", "sb", "saa", "sbb", "sab")

    def __init__(self, d: int, device):
        z = lambda: torch.zeros(d, dtype=torch.float64, device=device)  # noqa: E731
        self.n = 0
        self.shift_a = self.shift_b = None
        self.sa, self.sb, self.saa, self.sbb, self.sab = z(), z(), z(), z(), z()

    @staticmethod
    def nbytes(d: int) -> int:
        return 8 * 5 * d

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        if self.shift_a is None:
            self.shift_a, self.shift_b = a.mean(0), b.mean(0)
        a, b = (a - self.shift_a).double(), (b - self.shift_b).double()
        self.n += a.shape[0]
        self.sa += a.sum(0)
        self.sb += b.sum(0)
        self.saa += (a * a).sum(0)
        self.sbb += (b * b).sum(0)
        self.sab += (a * b).sum(0)

    def reduce(self) -> None:
        _reduce_moments(self)

    def correlation(self) -> np.ndarray:
        n = max(self.n, 1)
        ma, mb = self.sa / n, self.sb / n
        cov = self.sab / n - ma * mb
        va, vb = (self.saa / n - ma * ma).clamp_min(0), (self.sbb / n - mb * mb).clamp_min(0)
        return (cov / (va.sqrt() * vb.sqrt() + 1e-8)).clamp(-1.0, 1.0).cpu().numpy()


class BlockDiagonal:
    """The part of a product root's correlation that matching reads when its
    blocks share one within-block order (a flattened ``C x H x W`` map: the
    spatial taps are fixed): per pair of blocks ``(a, b)`` the correlations
    of their entries at the same inner position, ``(blocks, blocks, inner)``.
    A full ``(C H W)^2`` matrix would be ``inner`` times larger."""

    def __init__(self, diag: np.ndarray):
        self.diag = diag

    @property
    def shape(self) -> tuple:
        g, _, n = self.diag.shape
        return (g * n, g * n)

    def __add__(self, other: "BlockDiagonal") -> "BlockDiagonal":
        return BlockDiagonal(self.diag + other.diag)

    def __truediv__(self, k) -> "BlockDiagonal":
        return BlockDiagonal(self.diag / k)


class BlockDiagonalStats:
    """Streaming float64 sums for ``BlockDiagonal`` correlations: A's and B's
    features ``(samples, blocks x inner)``, correlated block by block at equal
    inner positions (shifted by the first batch's mean, as
    ``CorrelationStats``)."""

    __slots__ = ("g", "n_inner", "n", "shift_a", "shift_b", "sa", "sb", "saa", "sbb", "sab")

    def __init__(self, blocks: int, inner: int, device):
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        self.g, self.n_inner, self.n = blocks, inner, 0
        self.shift_a = self.shift_b = None
        d = blocks * inner
        self.sa, self.sb, self.saa, self.sbb = z(d), z(d), z(d), z(d)
        self.sab = z(inner, blocks, blocks)

    @staticmethod
    def nbytes(blocks: int, inner: int) -> int:
        return 8 * (inner * blocks * blocks + 4 * blocks * inner)

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        if self.shift_a is None:
            self.shift_a, self.shift_b = a.mean(0), b.mean(0)
        a, b = a - self.shift_a, b - self.shift_b
        self.n += a.shape[0]
        ab = torch.einsum("sat,sbt->tab", a.reshape(-1, self.g, self.n_inner), b.reshape(-1, self.g, self.n_inner))
        self.sab += ab.double()
        a, b = a.double(), b.double()
        self.sa += a.sum(0)
        self.sb += b.sum(0)
        self.saa += (a * a).sum(0)
        self.sbb += (b * b).sum(0)

    def reduce(self) -> None:
        _reduce_moments(self)

    def correlation(self) -> BlockDiagonal:
        n = max(self.n, 1)
        ma, mb = self.sa / n, self.sb / n
        va, vb = self.saa / n - ma * ma, self.sbb / n - mb * mb
        g, t = self.g, self.n_inner
        ma, mb, va, vb = (v.reshape(g, t).T for v in (ma, mb, va, vb))  # (inner, blocks)
        cov = self.sab / n - ma[:, :, None] * mb[:, None, :]
        sd_a, sd_b = va.clamp_min(0).sqrt(), vb.clamp_min(0).sqrt()
        corr = (cov / (sd_a[:, :, None] * sd_b[:, None, :] + 1e-8)).clamp(-1.0, 1.0)
        return BlockDiagonal(corr.permute(1, 2, 0).cpu().numpy())


def _reduce_moments(st) -> None:
    """Sum a statistic's moments across ranks: every rank's sums move to
    rank 0's shift first (the sums are of features minus the shift)."""
    from fxmerge.runtime.distributed import all_sum, broadcast_object, sum_int, world_size

    if world_size() <= 1:
        return
    ref_a, ref_b = broadcast_object((st.shift_a.cpu(), st.shift_b.cpu()) if st.shift_a is not None else (None, None))
    if ref_a is not None and st.shift_a is not None:
        da, db = (st.shift_a - ref_a.to(st.shift_a.device)).double(), (st.shift_b - ref_b.to(st.shift_b.device)).double()
        n = st.n
        # sums of (x - ref) from sums of (x - shift): x - ref = (x - shift) + d
        if isinstance(st, BlockDiagonalStats):
            g, t = st.g, st.n_inner
            sa, sb = st.sa.reshape(g, t).T, st.sb.reshape(g, t).T
            dA, dB = da.reshape(g, t).T, db.reshape(g, t).T
            st.sab += sa[:, :, None] * dB[:, None, :] + dA[:, :, None] * sb[:, None, :] + n * dA[:, :, None] * dB[:, None, :]
        elif isinstance(st, DiagonalStats):
            st.sab += st.sa * db + da * st.sb + n * da * db
        else:
            st.sab += st.sa[:, None] * db[None, :] + da[:, None] * st.sb[None, :] + n * da[:, None] * db[None, :]
        st.saa += 2 * da * st.sa + n * da * da
        st.sbb += 2 * db * st.sb + n * db * db
        st.sa += n * da
        st.sb += n * db
    st.n = sum_int(st.n)
    all_sum(st.sa, st.sb, st.saa, st.sbb, st.sab)


class ActivationCollector:
    """The per-node callback of the matching pass."""

    stats_class = CorrelationStats
    structured_outers = True  # collect the inner dims of products over structured dims

    def __init__(self, pg, positions: int, seed: int, device, models: tuple = (), max_memory: int = 1 << 62):
        self.pg = pg
        self.max_memory = max_memory
        self.skipped: list = []  # sites whose statistics would not fit
        self.models = models  # (A, B) GraphModules: probes compute from their modules
        self.positions = positions
        self.seed = seed
        self.device = device
        self.sites = set(site_nodes(pg))
        self.stats: dict = {}  # (node, axis, root uid) -> CorrelationStats
        self.keys: dict = {}  # root uid -> root Dim
        self.batch = 0
        self._plan = {}
        self._free_axes = {}  # node name -> its non-batch axes that carry a permutation
        for node in pg.gm.graph.nodes:
            if node.name not in self.sites:
                continue
            name = node.name
            tls = tensors_in(pg.layouts.get(node))
            if len(tls) != 1:
                continue
            occ = []
            for axis, lay in enumerate(tls[0].lays):
                if axis == 0 and len(tls[0].lays) > 1:
                    continue  # the batch axis
                for root, pos in occurrences(lay, self.structured_outers):
                    occ.append((axis, root, pos))
            if occ:
                self._plan[name] = occ
                self._free_axes[name] = [axis for axis, lay in enumerate(tls[0].lays) if axis > 0 and not is_pinned(lay)]
        self._probes = {}  # node name -> [(Probe, occurrences)]
        for name, probes in getattr(pg, "probes", {}).items():
            if not models:
                break
            for probe in probes:
                occ = [(axis, root, pos) for axis, lay in enumerate(probe.lays) for root, pos in
                       occurrences(lay, self.structured_outers)]
                if occ:
                    self._probes.setdefault(name, []).append((probe, occ))

    def __call__(self, node, values, env=None) -> None:
        occ = self._plan.get(node.name)
        probes = self._probes.get(node.name, ())
        if occ is None and not probes:
            return
        # crc32, not hash(): str hashes change between processes, and equal
        # seeds must give bit-identical merges in any process
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.batch * 9973 + zlib.crc32(node.name.encode()) % 997)
        if occ is not None:
            vals = [v[0] if isinstance(v, (tuple, list)) else v for v in values]  # (output, attention weights)
            self._add(node.name, vals, occ, gen, self._free_axes[node.name])
        for i, (probe, pocc) in enumerate(probes):
            inputs = [env(x) for x in node.args if isinstance(x, torch.fx.Node)]
            vals = [probe.compute(gm.get_submodule(node.target), *[v[m] for v in inputs])
                    for m, gm in enumerate(self.models)]
            self._add(f"{node.name}:probe{i}", vals, pocc, gen)

    def _add(self, name, vals: list, occ, gen, free_axes=()) -> None:
        """Add one site's values (one per model: two, or the N of a pooled
        statistic) to the statistics of every root occurring there."""
        by_axis = defaultdict(list)
        for axis, root, pos in occ:
            by_axis[axis].append((root, pos))
        for axis, items in by_axis.items():
            # another axis that carries a permutation (the channels of a token
            # mixer's input) is in a different order in each model: its entries
            # are no common positions, so matching reads their mean, which no
            # permutation changes
            others = [x for x in free_axes if x != axis]
            views = [positions_view(v.mean(dim=others, keepdim=True) if others else v, axis) for v in vals]
            idx = sample_positions(views[0].shape[1], self.positions, gen, views[0].device)
            rs = [rows(v, idx) for v in views]
            # checked on the kept rows only: a full-tensor check costs a third
            # of the forward pass, and a non-finite value spreads downstream
            if not all(torch.isfinite(r).all() for r in rs):
                raise InputError(f"non-finite activations at node '{name}': check the models' weights and the "
                                 "calibration data")
            for root, pos in items:
                key = (name, axis, root.uid, int(pos[0]))
                st = self.stats.get(key)
                if st is None:
                    st = self._new_stats(key, root, len(pos))
                    if st is None:
                        continue
                    self.keys[root.uid] = root
                if len(pos) == rs[0].shape[1] and np.array_equal(pos, np.arange(len(pos))):
                    st.add(*rs)  # the root is the whole axis: no copy
                    continue
                p = torch.as_tensor(pos, device=rs[0].device)
                st.add(*[r.index_select(1, p) for r in rs])

    def stats_bytes(self, d: int) -> int:
        return self.stats_class.nbytes(d)

    def new_statistic(self, d: int):
        """The statistic of a root of ``d`` features at one site."""
        return self.stats_class(d, self.device)

    def _new_stats(self, key, root, d: int):
        """The statistic of one site, or None (with a warning) when it would
        not fit in ``max_memory``. A product whose blocks share one
        within-block order keeps only its block diagonals."""
        s = root.structure
        shared = False
        if isinstance(s, Product) and s.inner_size > 1:
            inners = {find(i).uid: find(i) for i in s.inners}
            outer = find(s.outer)
            # matching reads only the block diagonals: within-block orders fixed,
            # or a few orders shared by blocks that move freely; one free order
            # shared by every block keeps its blocks whole, since it may be
            # permuted itself (NesT's heads, read as the inner dim of the value order)
            one_free = len(inners) == 1 and not next(iter(inners.values())).pinned
            shared = all(r.pinned for r in inners.values()) or (
                outer.structure is None and len(inners) < outer.size and not one_free)
        if shared and self.stats_class is CorrelationStats:
            g, t = find(s.outer).size, s.inner_size
            size = BlockDiagonalStats.nbytes(g, t)
            make = lambda: BlockDiagonalStats(g, t, self.device)  # noqa: E731
        else:
            size, make = self.stats_bytes(d), lambda: self.new_statistic(d)  # noqa: E731
        if size > self.max_memory:
            if key[:3] not in {k[:3] for k in self.skipped}:
                self.skipped.append(key)
                import warnings

                from fxmerge.errors import MemoryWarning

                warnings.warn(f"matching skips '{key[0]}' axis {key[1]}: its statistics need {size / 2**30:.1f} GiB, "
                              f"above max_memory ({self.max_memory / 2**30:.1f} GiB)", MemoryWarning, stacklevel=4)
            return None
        st = self.stats[key] = make()
        return st

    def reduce(self) -> None:
        """Sum every statistic across ranks (before ``similarities``): each
        rank holds the same sites, so the collectives pair up."""
        from fxmerge.runtime.distributed import sync

        sync()
        for key in sorted(self.stats, key=str):
            self.stats[key].reduce()

    def similarities(self) -> dict:
        """Mean correlation matrix per root over all of its sites."""
        acc: dict = {}
        count: dict = defaultdict(int)
        for (_, _, uid, _), st in self.stats.items():
            c = st.correlation()
            acc[uid] = c if uid not in acc else acc[uid] + c
            count[uid] += 1
        return {uid: acc[uid] / count[uid] for uid in acc}


# ----------------------------------------------------------------------------
# solving
