"""ZipIt!: merging features within and across the two models.

ZipIt! (Stoica et al., 2024) does not pair A's features with B's: it pools
both models' ``2d`` features of a group, correlates all of them, and merges
the ``d`` most correlated pairs wherever they come from (two of A's features
may merge). Per root this gives a merge matrix ``M`` (``d x 2d``, each row
averages one pair) for the axes that produce the features and an unmerge
matrix ``U`` (``2d x d``, each pair's two features read their merged one)
for the axes that consume them:

    merged = sum over models m of  T_m x_axis P_axis,m   (every channel axis)

with ``P`` the model's slice of ``M`` on output axes and of ``U^T`` on
contracted (input) axes.

Heads and convolution groups move as units. ZipIt!'s paper has no notion of
them (its authors report that transformers failed on head misalignment);
like its successors (MuDSC), fxmerge aligns them first with the engine's
two-level matching (``align_products``: within each pair of blocks, then
blocks as units) and merges the aligned blocks.

Partial zipping (``choose_cut``, ``emit_partial_zip``) is the paper's: the
layers before a cut are zipped, everything after it stays separate (both
models' later layers side by side, each reading the zipped features unzipped
to its own, outputs averaged or concatenated). The cut is the one whose cost
is highest without exceeding the budget.
"""
from __future__ import annotations

import copy
import operator

import numpy as np
import torch
from scipy.linalg import block_diag

from fxmerge.analysis.ir import Dep, Product, find, fold, is_pinned, side_by_side
from fxmerge.runtime.tensors import add_gram_upper, symmetric
from .statistics import ActivationCollector, correlation_from_moments
from fxmerge.analysis.rules.registry import tensors_in
from fxmerge.analysis.tracing import TensorInfo


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
        add_gram_upper(self.ss, x)  # mirrored in correlation()
        self.s += x.sum(0, dtype=torch.float64)

    @staticmethod
    def nbytes(d: int) -> int:
        return 8 * (4 * d * d + 2 * d)

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
        zipped = self._zipped(lay)
        if zipped is not None:
            M, U = zipped
            d = find(lay).size
            if contracted:
                return U[:d].T, U[d:].T
            return M[:, :d], M[:, d:]

        def parts(r, parts) -> tuple:
            mats = [self.matrices(p, contracted) for p in parts]
            return tuple(block_diag(*[p[m] for p in mats]) for m in (0, 1))

        def blocks(r, s) -> tuple:
            # blocks (heads, conv groups) move or stay whole: inner axes shared
            pa, pb = self.matrices(s.outer, contracted)
            eye = np.eye(s.inner_size)
            return np.kron(pa, eye), np.kron(pb, eye)

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


def align_products(pg, sims: dict, keys: dict, exclude: set):
    """Heads and convolution groups aligned as units, as ZipIt!'s successors
    (MuDSC) do: the cross-model block of each product root's pooled
    correlation goes through the engine's two-level matching (within every
    pair of blocks, then blocks as units). Returns the ``Matching`` (its
    perms move B's blocks and within-block orders opposite A's)."""
    from .matching import solve

    cross = {}
    for uid, corr in sims.items():
        r = keys[uid]
        s = r.structure
        if isinstance(s, Product) and s.inner_size > 1 and not find(s.outer).pinned and uid not in exclude:
            d = r.size
            cross[uid] = corr[:d, d:]
    return solve(cross, keys)


def zipped_atoms(sims: dict, keys: dict, exclude: set) -> dict:
    """ZipIt!'s pairs for every atom root (merging within or across models)
    and for depthwise blocks (one channel per block): ``{root uid: (M, U)}``."""
    zipped = {}
    for uid, corr in sims.items():
        r = keys[uid]
        s = r.structure
        if uid in exclude or corr.shape[0] != 2 * r.size:
            continue
        if s is None or (isinstance(s, Product) and s.inner_size == 1):
            zipped[uid] = merge_matrices(zip_pairs(corr), r.size)
    return zipped


# ----------------------------------------------------------------------------
# partial zipping: everything after the cut separate


def crossing_values(nodes: list, cut: int) -> list:
    """Nodes before position ``cut`` whose values nodes at or after it read."""
    prefix = {n.name for n in nodes[:cut]}
    crossing = []
    for n in nodes[cut:]:
        for i in n.all_input_nodes:
            if i.name in prefix and i not in crossing:
                crossing.append(i)
    return crossing


def cut_points(pg) -> list:
    """Where a cut may go: before each contraction, in graph order, where
    every value crossing the cut has a layout the unzip can gather (no
    per-head dependent axes), and at the end (everything zipped)."""
    nodes = list(pg.gm.graph.nodes)
    index = {n.name: i for i, n in enumerate(nodes)}
    points = []
    for c in sorted({c.node for c in pg.contractions.values()}, key=index.get):
        cut = index[c]
        ok = all(not any(isinstance(lay, Dep) for tl in tensors_in(pg.layouts.get(v)) for lay in tl.lays)
                 for v in crossing_values(nodes, cut))
        if ok and (not points or points[-1] != cut):
            points.append(cut)
    points.append(len(nodes))
    return points


def choose_cut(pg, costs: dict, budget: float, full_cost: float) -> tuple:
    """Partial zipping's cut: the prefix before it zipped (1x), everything
    after it separate (both models, 2x). The cut whose cost is highest
    without exceeding ``budget`` wins (the cheapest when none fits). Returns
    ``(cut position, cost ratio, (min, max) ratio)`` in multiples of model
    A's cost; ``full_cost`` is the cost ratio with nothing cut."""
    nodes = list(pg.gm.graph.nodes)
    total = sum(costs.values()) or 1.0
    options = []
    for cut in cut_points(pg):
        if cut == len(nodes):
            ratio = full_cost
        else:
            before = sum(costs.get(n.name, 0.0) for n in nodes[:cut])
            ratio = (before + 2 * (total - before)) / total
        options.append((cut, ratio))
    fitting = [o for o in options if o[1] <= budget + 1e-9]
    cut, ratio = max(fitting, key=lambda o: o[1]) if fitting else min(options, key=lambda o: o[1])
    ratios = [r for _, r in options]
    return cut, ratio, (min(ratios), max(ratios))


def unzip_index(lay, zipped: dict, align, side: int) -> np.ndarray:
    """Where each of one model's features sits in the zipped features of a
    layout (gather index, per entry of that model's own axis): zipped atoms
    by their merge pairs, aligned blocks by the inverse of B's alignment."""
    r = None if isinstance(lay, Dep) else find(lay)
    if r is not None and not r.pinned and r.uid in zipped:
        U = zipped[r.uid][1]
        d = r.size
        return np.argmax(U[:d] if side == 0 else U[d:], axis=1)

    def blocks(r, s) -> np.ndarray:
        if side == 0:
            return np.arange(r.size)
        idx = align.index(r)  # aligned position -> B's own index
        inverse = np.empty_like(idx)
        inverse[idx] = np.arange(len(idx))
        return inverse

    return fold(lay, dep=lambda l: np.arange(l.size), pinned=lambda r: np.arange(r.size),
                atom=lambda r: np.arange(r.size), product=blocks,
                concat=lambda r, parts: side_by_side([unzip_index(p, zipped, align, side) for p in parts],
                                                     [p.size for p in parts]))


def _copy_attr(src: torch.nn.Module, dst: torch.nn.Module, target: str, new_target: str) -> None:
    """Copy the module or tensor ``target`` of ``src`` to ``new_target`` of
    ``dst``, creating the modules on the way."""
    obj = src
    for part in target.split("."):
        obj = getattr(obj, part)
    *path, leaf = new_target.split(".")
    mod = dst
    for part in path:
        if not hasattr(mod, part):
            mod.add_module(part, torch.nn.Module())
        mod = getattr(mod, part)
    if isinstance(obj, torch.nn.Module):
        mod.add_module(leaf, copy.deepcopy(obj))
    elif isinstance(obj, torch.nn.Parameter):
        mod.register_parameter(leaf, torch.nn.Parameter(obj.detach().clone(), requires_grad=obj.requires_grad))
    elif isinstance(obj, torch.Tensor):
        mod.register_buffer(leaf, obj.detach().clone())
    else:
        setattr(mod, leaf, copy.deepcopy(obj))


def emit_partial_zip(zipped_gm: torch.fx.GraphModule, gm_a: torch.fx.GraphModule, gm_b: torch.fx.GraphModule,
                     pg, cut: int, zipped: dict, align, labels: str) -> torch.fx.GraphModule:
    """The partially zipped model: the nodes before ``cut`` from the zipped
    model, the nodes after it twice, with model A's and model B's own weights
    (``side_a.*``, ``side_b.*``), each reading the zipped values unzipped to
    its own features; the two outputs are averaged (shared labels) or
    concatenated (disjoint labels)."""
    ref = list(pg.gm.graph.nodes)
    if cut >= len(ref):
        return zipped_gm
    root = torch.nn.Module()
    graph = torch.fx.Graph()
    zipped_nodes = {n.name: n for n in zipped_gm.graph.nodes}
    env: dict = {}
    for n in ref[:cut]:
        zn = zipped_nodes[n.name]
        if zn.op in ("call_module", "get_attr"):
            _copy_attr(zipped_gm, root, zn.target, zn.target)
        env[n.name] = graph.node_copy(zn, lambda a: env[a.name])
    sides = []
    for side, (gm, prefix) in enumerate(((gm_a, "side_a"), (gm_b, "side_b"))):
        local: dict = {}
        for v in crossing_values(ref, cut):
            tls = tensors_in(pg.layouts.get(v))
            value = env[v.name]
            if len(tls) == 1 and isinstance(v.meta.get("fxm_value"), TensorInfo):
                for axis, lay in enumerate(tls[0].lays):
                    if is_pinned(lay):
                        continue  # (every other axis gets a gather, identity or not: fxmerge.load rebuilds it)
                    idx = unzip_index(lay, zipped, align, side)
                    name = f"zip_unzip.{v.name}_{prefix}_{axis}"
                    _copy_attr_tensor(root, name, torch.as_tensor(idx, dtype=torch.long))
                    index = graph.get_attr(name)
                    value = graph.call_method("index_select", (value, axis, index))
            local[v.name] = value
        gm_nodes = {n.name: n for n in gm.graph.nodes}
        out = None
        for n in ref[cut:]:
            node = gm_nodes[n.name]
            if node.op == "output":
                out = fx_map(node.args[0], lambda a: local[a.name])
                continue
            if node.op in ("call_module", "get_attr"):
                _copy_attr(gm, root, node.target, f"{prefix}.{node.target}")
            copied = graph.node_copy(node, lambda a: local[a.name])
            if node.op in ("call_module", "get_attr"):
                copied.target = f"{prefix}.{node.target}"
            local[n.name] = copied
        sides.append(out)
    combined = _combine(graph, sides[0], sides[1], labels)
    graph.output(combined)
    gm = torch.fx.GraphModule(root, graph, type(zipped_gm).__name__)
    from .rewrite import model_device

    return gm.to(model_device(zipped_gm))


def _copy_attr_tensor(root: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    *path, leaf = name.split(".")
    mod = root
    for part in path:
        if not hasattr(mod, part):
            mod.add_module(part, torch.nn.Module())
        mod = getattr(mod, part)
    mod.register_buffer(leaf, value)


def fx_map(value, fn):
    return torch.fx.node.map_arg(value, fn)


def _combine(graph, a, b, labels: str):
    """Both sides' outputs: averaged (shared labels) or concatenated along
    the last axis (each model's own classes)."""
    if isinstance(a, (tuple, list)):
        return type(a)(_combine(graph, x, y, labels) for x, y in zip(a, b))
    if isinstance(a, dict):
        return {k: _combine(graph, a[k], b[k], labels) for k in a}
    if not isinstance(a, torch.fx.Node):
        return a
    if labels == "disjoint":
        return graph.call_function(torch.cat, ([a, b],), {"dim": -1})
    return graph.call_function(operator.mul, (graph.call_function(operator.add, (a, b)), 0.5))
