"""Matching more than two models into one shared order of features.

Pairwise matching of N models is not consistent in general: the
permutation A->B followed by B->C need not be A->C. fxmerge aligns every
model to one *universe* instead, so any two models' correspondence is read
through it and is consistent by construction:

1. every model is matched to model A (activation matching from one lockstep
   pass of all models);
2. (``universe="mean"``, the default; ``"reference"`` stops at 1)
   every model is re-matched to the universe, the mean of every model's
   aligned features, all in one pass, and re-aligned; rounds repeat until no
   assignment changes (at most ``UNIVERSE_ROUNDS``). A leave-one-out mean
   (each model against the others only) was tried: on random networks its
   assignments oscillate and never settle within the rounds;
3. one last pass measures, per feature, how alike every pair of models is
   once aligned (``similarity``: what the cluster planner reads).

With ``matching="weight"`` step 1-2 are Git Re-Basin's MergeMany (each model
weight-matched to the mean of the others' weights until nothing changes) and
step 3 reads the cosine of the aligned weights; no data is used.

The report gives the rounds, and per group the *agreement*: the mean, over
pairs of models and features, of how alike two aligned models' features are
(their correlation, or under weight matching the cosine of their weights).
The last pass keeps per pair only the correlation at equal positions (``d``
numbers, not ``d x d``), so the statistics grow linearly with N: N
universe statistics per round, then N(N-1)/2 vectors.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from fxmerge import constants as C
from fxmerge.analysis.ir import Product, find
from fxmerge.runtime.runner import LockstepRunner
from fxmerge.runtime.tensors import tensor_state

from .matching import Matching, matchable_roots, activation_matching, permuted, weight_matching
from .pipeline import MergeState, lockstep_pass
from .statistics import ActivationCollector, DiagonalStats, occurrences


@dataclass
class Universe:
    """Every model aligned to one shared order (``aligned[m]``: model ``m``'s
    weights in A's graph, permuted), and per planner unit (atom or block
    root) the ``(N, N, units)`` similarity of every pair of models there."""

    aligned: list
    similarity: dict
    rounds: int
    agreement: dict = field(default_factory=dict)  # unit uid -> mean similarity of aligned features
    # per model, per plain root (an atom): its own feature at each position of the shared order
    perms: list = field(default_factory=list)

    def report(self, pg) -> dict:
        groups = {}
        for g in pg.groups:
            uid = g.roots[0].uid
            if uid in self.agreement:
                groups[str(g.id)] = round(float(self.agreement[uid]), 4)
        shares = list(self.agreement.values())
        return {"rounds": self.rounds, "agreement": float(np.mean(shares)) if shares else 1.0,
                "agreement_per_group": groups}


class AlignedCollector(ActivationCollector):
    """The last pass's collector: correlations at equal positions only."""

    stats_class = DiagonalStats


class PairFeeds:
    """Several pair collectors fed by one lockstep pass of every model:
    ``pick(values)`` gives each collector its ``(a, b)`` values."""

    def __init__(self, feeds: list):
        self.feeds = feeds  # (collector, pick)
        self.batch = 0

    def __call__(self, node, values, env=None) -> None:
        for collector, pick in self.feeds:
            collector.batch = self.batch
            collector(node, pick(values), (lambda x, pick=pick: pick(env(x))) if env is not None else None)


def _tensor(v):
    return v[0] if isinstance(v, (tuple, list)) else v


def pair(i: int, j: int):
    return lambda values: [values[i], values[j]]


def universe_and(k: int):
    """Model ``k``'s values against the universe's: every model's mean (a
    value that is no tensor, a size or a missing attention map, is passed
    on as it is: no statistic reads it)."""
    def pick(values):
        every = [_tensor(v) for v in values]
        if not all(isinstance(v, torch.Tensor) and v.is_floating_point() for v in every):
            return [values[0], values[k]]
        return [sum(every) / len(every), every[k]]

    return pick


def collect(st: MergeState, gms: list, feeds: list, desc: str) -> None:
    o = st.opts
    lockstep_pass(LockstepRunner(gms), PairFeeds(feeds), st.batches(), o.progress, desc)
    for collector, _ in feeds:
        collector.reduce()


def changed(m: Matching) -> bool:
    return any(not np.array_equal(p, np.arange(len(p))) for p in m.perms.values())


def compose(perms: dict, m: Matching, roots: dict) -> None:
    """Follow one more alignment of a model: a plain root's feature at shared
    position ``i`` was at ``p[i]`` before it (blocks of heads move with their
    within-block orders, which ``perms`` does not follow)."""
    for uid, p in m.perms.items():
        if uid in roots:
            perms[uid] = perms.get(uid, np.arange(len(p)))[p]


def match_universe(st: MergeState) -> Universe:
    """Align every model of ``st.sources`` into one shared order."""
    if st.opts.matching == "weight":
        return merge_many(st)
    o, pg, n = st.opts, st.pg, st.n_models
    gms = list(st.sources)
    new = lambda models=(): ActivationCollector(pg, o.positions, o.seed, o.device, models=models,  # noqa: E731
                                                max_memory=o.max_memory)
    # 1. every model to A
    feeds = [(new((gms[0], gms[k])), pair(0, k)) for k in range(1, n)]
    collect(st, gms, feeds, "matching")
    direct = {(0, k): activation_matching(c, exclude=st.output_roots) for k, (c, _) in zip(range(1, n), feeds)}
    plain = plain_roots(pg)
    perms = [{} for _ in range(n)]
    for k in range(1, n):
        gms[k] = permuted(pg, pg.gm, gms[k], direct[(0, k)].sampler())
        compose(perms[k], direct[(0, k)], plain)
    # 2. every model to the mean of all, until nothing moves; the
    # universe's features are means of activations (no module computes
    # them), so features seen only inside an opaque module keep step 1's order
    rounds = 0
    for rounds in range(1, C.UNIVERSE_ROUNDS + 1 if o.universe == "mean" else 1):
        feeds = [(new(), universe_and(k)) for k in range(n)]
        collect(st, gms, feeds, f"universe round {rounds}")
        moves = [activation_matching(c, exclude=st.output_roots) for c, _ in feeds]
        if not any(changed(m) for m in moves):
            break
        gms = [permuted(pg, pg.gm, gm, m.sampler()) for gm, m in zip(gms, moves)]
        for p, m in zip(perms, moves):
            compose(p, m, plain)
    # 3. how alike every pair is, feature by feature, once aligned
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    feeds = [(AlignedCollector(pg, o.positions, o.seed, o.device, models=(gms[i], gms[j]), max_memory=o.max_memory),
              pair(i, j)) for i, j in pairs]
    collect(st, gms, feeds, "agreement")
    similarity = pairwise_similarity({p: aligned_similarity(c) for p, (c, _) in zip(pairs, feeds)}, n)
    return Universe(gms, similarity, rounds, agreement_of(similarity, st.output_roots), perms)


def agreement_of(similarity: dict, exclude: set) -> dict:
    """Per unit root, the mean similarity of every pair of aligned models."""
    out = {}
    for uid, s in similarity.items():
        if uid in exclude:
            continue
        n = s.shape[0]
        off = ~np.eye(n, dtype=bool)
        out[uid] = float(s[off].mean())
    return out


def plain_roots(pg) -> dict:
    """The groups' roots without structure (plain channel groups)."""
    return {g.roots[0].uid: g.roots[0] for g in pg.all_groups if g.roots[0].structure is None}


def merge_many(st: MergeState) -> Universe:
    """Git Re-Basin's MergeMany: each model weight-matched to the mean of the
    others' weights, in a random order, until no assignment changes."""
    o, pg, n = st.opts, st.pg, st.n_models
    gms = list(st.sources)
    states = [tensor_state(gm) for gm in gms]
    rng = np.random.default_rng(o.seed)
    plain = plain_roots(pg)
    perms = [{} for _ in range(n)]
    rounds = 0
    for rounds in range(1, C.UNIVERSE_ROUNDS + 1):
        moved = False
        for k in rng.permutation(n).tolist():
            mean = {name: sum(states[j][name].double() for j in range(n) if j != k) / (n - 1)
                    if states[k][name].is_floating_point() else states[k][name] for name in states[k]}
            m = weight_matching(pg, mean, states[k], seed=o.seed + rounds, exclude=st.output_roots)
            if changed(m):
                moved = True
                gms[k] = permuted(pg, pg.gm, gms[k], m.sampler())
                states[k] = tensor_state(gms[k])
                compose(perms[k], m, plain)
        if not moved:
            break
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    similarity = pairwise_similarity({(i, j): weight_similarity(pg, states[i], states[j]) for i, j in pairs}, n)
    return Universe(gms, similarity, rounds, agreement_of(similarity, st.output_roots), perms)


def pairwise_similarity(by_pair: dict, n: int) -> dict:
    """``{(i, j): {unit uid: similarity per unit}}`` as ``{unit uid: (n, n,
    units)}``, each model alike itself."""
    out: dict = {}
    for (i, j), sims in by_pair.items():
        for uid, s in sims.items():
            if uid not in out:
                out[uid] = np.ones((n, n, len(s)))
            out[uid][i, j] = out[uid][j, i] = s
    return out


def aligned_similarity(collector: AlignedCollector) -> dict:
    """Per planner unit (an atom root's features, a product's blocks), the
    correlation of two aligned models' features at the same position (an
    ``AlignedCollector``'s)."""
    sums: dict = {}
    for uid, sim in collector.similarities().items():
        r = collector.keys[uid]
        s = r.structure
        if s is None:
            add_unit(sums, uid, sim)
        elif isinstance(s, Product) and find(s.outer).structure is None:
            add_unit(sums, find(s.outer).uid, sim.reshape(find(s.outer).size, -1).mean(1))
    return {uid: total / count for uid, (total, count) in sums.items()}


def add_unit(sums: dict, uid: int, values: np.ndarray) -> None:
    total, count = sums.get(uid, (0.0, 0))
    sums[uid] = (total + values, count + 1)


def weight_similarity(pg, state_a: dict, state_b: dict) -> dict:
    """Per planner unit, the cosine of two aligned models' weights at the same
    position, over every parameter the unit's root indexes."""
    dot: dict = {}
    norm_a: dict = {}
    norm_b: dict = {}
    units: dict = {}
    roots = matchable_roots(pg)
    for name, lays in pg.members.items():
        if not pg.member_is_param.get(name, False) or name not in state_a:
            continue
        wa, wb = state_a[name].detach().double(), state_b[name].detach().double()
        for axis, lay in enumerate(lays):
            for r, pos in occurrences(lay, structured_outers=True):
                if r.uid not in roots:
                    continue
                p = torch.as_tensor(pos)
                fa = wa.index_select(axis, p).movedim(axis, 0).reshape(len(pos), -1)
                fb = wb.index_select(axis, p).movedim(axis, 0).reshape(len(pos), -1)
                s = r.structure
                if s is None:
                    uid, blocks = r.uid, len(pos)
                elif isinstance(s, Product) and find(s.outer).structure is None:
                    uid, blocks = find(s.outer).uid, find(s.outer).size
                else:
                    continue
                units[uid] = blocks
                for acc, v in ((dot, (fa * fb).sum(1)), (norm_a, (fa * fa).sum(1)), (norm_b, (fb * fb).sum(1))):
                    v = v.reshape(blocks, -1).sum(1).numpy()
                    acc[uid] = acc.get(uid, 0.0) + v
    return {uid: dot[uid] / np.sqrt(norm_a[uid] * norm_b[uid] + 1e-24) for uid in units}
