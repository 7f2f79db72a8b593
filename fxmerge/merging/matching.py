"""Matching: which feature of model B corresponds to which feature of model A.

The unit of matching is a root dim of the IR: an atom (a plain channel group)
or the outer of a product (heads, convolution groups). Products are matched on
two levels: within every pair of blocks (Hungarian on the inner features),
then blocks as units on their summed within-block similarity.

*Activation matching* accumulates, over all calibration batches, the
cross-correlation of A's and B's features at every site where a root appears
(inputs and outputs of the contraction layers). *Weight matching* (Git
Re-Basin's iterative scheme) needs no data: each root's similarity is the
inner product of A's weights with B's along that axis, under the current
permutations of every other axis.

The result is a ``Matching``: one ``new -> old`` permutation of B per root
(product inners included) and, per atom or block, the similarity of the pair
it matched. ``MatchSampler`` turns it into index arrays for ``permute_state``.
"""
from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch
import torch.fx
from scipy.optimize import linear_sum_assignment

from fxmerge.analysis.ir import Concat, Dep, Dim, Product, find
from fxmerge.analysis.permute import PermutationSampler, permute_tensor
from fxmerge.runtime.tensors import set_tensor, tensor_state

from .statistics import ActivationCollector, BlockDiagonal, occurrences


class MatchSampler(PermutationSampler):
    """A sampler whose permutations are fixed: ``perms[root uid]``."""

    def __init__(self, perms: dict):
        super().__init__(np.random.default_rng(0))
        self.perms = perms

    def atom(self, r: Dim) -> np.ndarray:
        p = self.perms.get(r.uid)
        return np.arange(r.size) if p is None or r.pinned else p


@dataclass
class Matching:
    perms: dict = field(default_factory=dict)  # root uid -> B index per A index
    sims: dict = field(default_factory=dict)  # atom/outer uid -> similarity per A unit

    def sampler(self) -> MatchSampler:
        return MatchSampler(self.perms)


# ----------------------------------------------------------------------------
# where roots occur


def _lsa(sim: np.ndarray):
    rows_, cols = linear_sum_assignment(sim, maximize=True)
    perm = np.empty(sim.shape[0], dtype=np.int64)
    perm[rows_] = cols
    return perm, sim[np.arange(sim.shape[0]), perm]


def _assign_within(inner: Dim, sim: np.ndarray) -> tuple:
    """The assignment inside one block pair of a product: ``({root uid: perm},
    similarity per A position)``. An atom inner dim is one Hungarian problem;
    a structured one (a head's ``[q | k | v]`` when q and k share their order)
    one per atom root it is made of, its occurrences' similarities summed, so
    the assignment never moves a feature across the parts; positions of
    anything else keep their order."""
    r = find(inner)
    if r.pinned:
        return {}, np.diagonal(sim).copy()
    if r.structure is None:
        perm, val = _lsa(sim)
        return {r.uid: perm}, val
    occ = occurrences(r)
    if not occ or any(root.structure is not None for root, _ in occ):
        return {}, np.diagonal(sim).copy()
    by_root: dict = {}
    for root, pos in occ:
        block = sim[np.ix_(pos, pos)]
        by_root[root.uid] = block if root.uid not in by_root else by_root[root.uid] + block
    perms = {uid: _lsa(block)[0] for uid, block in by_root.items()}
    val = np.diagonal(sim).copy()
    for root, pos in occ:
        val[pos] = sim[pos, pos[perms[root.uid]]]
    return perms, val


def solve(sims_by_root: dict, roots: dict, *, exclude: set = frozenset(), given: dict | None = None) -> Matching:
    """Assignments from per-root similarity matrices (A rows, B columns).

    Atoms: one Hungarian problem. Products: group every product root by its
    outer; score each block pair by the Hungarian optimum of its inner
    similarity (summed over the products that share the outer), assign blocks,
    and keep the inner assignments of the chosen pairs. Products over a
    structured outer pair their blocks as the outer's parts are assigned (in
    this solve, else in ``given``).
    """
    m = Matching()
    by_outer: dict = defaultdict(list)
    structured: dict = defaultdict(list)  # products whose outer is a structured dim
    for uid, sim in sims_by_root.items():
        r = roots[uid]
        if uid in exclude:
            continue
        s = r.structure
        if s is None:
            perm, val = _lsa(sim)
            m.perms[uid], m.sims[uid] = perm, val
        elif isinstance(s, Product):
            o = find(s.outer)
            (by_outer if o.structure is None else structured)[o.uid].append((r, sim))
    for ouid, items in by_outer.items():
        if ouid in exclude:
            continue
        outer = find(items[0][0].structure.outer)
        g = outer.size
        families, inner_dims = _families(items)
        score = np.zeros((g, g))
        inner: dict = {}
        for fam, sim in families.items():
            n = sim.shape[0] // g
            free = len(set(fam)) == g  # one inner root per block: free within-block permutations
            if isinstance(sim, BlockDiagonal):  # shared within-block order: only the diagonals were kept
                score += sim.diag.sum(-1)
                continue
            # one order shared by every block: each pair scored at its best
            # order (the shared one is assigned once the pairs are chosen)
            shared = len(set(fam)) == 1 and not inner_dims[fam[0]].pinned
            blocks = _block_pairs(sim, g)
            for a in range(g):
                for b in range(g):
                    if (free or shared) and n > 1:
                        perms, val = _assign_within(inner_dims[fam[b]], blocks[a, b])
                    else:
                        perms, val = {}, np.diagonal(blocks[a, b]).copy()
                    score[a, b] += val.sum()
                    inner[(fam, a, b)] = perms
        perm, val = _lsa(score)
        m.perms[ouid] = perm
        n_total = sum(sim.shape[0] // g for sim in families.values())
        m.sims[ouid] = val / max(n_total, 1)
        for fam, sim in families.items():
            if len(set(fam)) == g:
                for a in range(g):
                    m.perms.update(inner[(fam, a, perm[a])])
            elif len(set(fam)) == 1 and fam[0] not in m.perms and not isinstance(sim, BlockDiagonal):
                # one order shared by every block (ResNeSt's splits): assigned
                # over the chosen block pairs, unless the dim was matched where
                # it occurs on its own
                m.perms.update(_assign_shared(inner_dims[fam[0]], _block_pairs(sim, g), perm))
    _match_inners_of_structured(m, structured, exclude, given or {})
    return m


def _match_inners_of_structured(m: Matching, structured: dict, exclude: set, given: dict) -> None:
    """Inner dims of products over a structured outer: the block pairing is
    fixed by the outer's parts (already matched), so only the inner dims of
    each pair are assigned; a shared inner dim gets one assignment over all pairs.
    Outers nested in other products (depthwise multipliers in a row) wait for
    the inner dims they are made of: shallowest outers first, and each pairing
    read from the assignments made so far."""
    if not structured:
        return
    outers = {ouid: find(items[0][0].structure.outer) for ouid, items in structured.items()}
    for ouid in sorted(structured, key=lambda u: _nesting_depth(outers[u])):
        if ouid in exclude:
            continue
        items, outer = structured[ouid], outers[ouid]
        pair = MatchSampler({**given, **m.perms}).index(outer)  # B block per A block
        g = outer.size
        families, inner_dims = _families(items)
        for fam, sim in families.items():
            if sim.shape[0] // g < 2:
                continue
            blocks = _block_pairs(sim, g)
            if len(set(fam)) == g:
                for a in range(g):
                    m.perms.update(_assign_within(inner_dims[fam[pair[a]]], blocks[a, pair[a]])[0])
            elif len(set(fam)) == 1 and fam[0] not in m.perms:
                m.perms.update(_assign_shared(inner_dims[fam[0]], blocks, pair))


def _families(items) -> tuple:
    """Products over one outer grouped by their inner roots (q and k heads
    share theirs and sum their evidence): ``({inner uids: summed similarity},
    {inner uid: inner dim})``."""
    families: dict = defaultdict(lambda: None)
    inner_dims: dict = {}
    for r, sim in items:
        fam = tuple(find(i).uid for i in r.structure.inners)
        families[fam] = sim if families[fam] is None else families[fam] + sim
        inner_dims.update({find(i).uid: find(i) for i in r.structure.inners})
    return families, inner_dims


def _block_pairs(sim: np.ndarray, g: int) -> np.ndarray:
    """A product's similarity as ``[A block, B block, A inner, B inner]``."""
    n = sim.shape[0] // g
    return sim.reshape(g, n, g, n).transpose(0, 2, 1, 3)


def _assign_shared(inner: Dim, blocks: np.ndarray, pair) -> dict:
    """One order shared by every block, assigned over the paired blocks."""
    return _assign_within(inner, sum(blocks[a, pair[a]] for a in range(len(pair))))[0]


def _nesting_depth(d) -> int:
    """How many products and concatenations a dim is built of, nested: 0 for
    an atom."""
    if isinstance(d, Dep):
        return 0
    s = find(d).structure
    if s is None:
        return 0
    if isinstance(s, Concat):
        return 1 + max(_nesting_depth(p) for p in s.parts)
    return 1 + max([_nesting_depth(s.outer)] + [_nesting_depth(i) for i in s.inners])


# ----------------------------------------------------------------------------
# weight matching


def matchable_roots(pg) -> dict:
    """Atom roots and product roots that carry parameter axes."""
    roots = {}
    for name, lays in pg.members.items():
        if not pg.member_is_param.get(name, False):
            continue
        for lay in lays:
            for r, _ in occurrences(lay, structured_outers=True):
                roots[r.uid] = r
    return roots


def weight_matching(pg, state_a: dict, state_b: dict, *, iters: int = 30, seed: int = 0, exclude: Iterable = ()) -> Matching:
    """Git Re-Basin weight matching: coordinate ascent over roots, each step a
    Hungarian problem on ``sum_members <W_A, P(W_B)>`` along that root's axis."""
    roots = {u: r for u, r in matchable_roots(pg).items() if u not in set(exclude)}
    members_of: dict = defaultdict(list)
    for name, lays in pg.members.items():
        if not pg.member_is_param.get(name, False) or name not in state_a:
            continue
        for axis, lay in enumerate(lays):
            for r, pos in occurrences(lay, structured_outers=True):
                members_of[r.uid].append((name, axis, pos))
    rng = np.random.default_rng(seed)
    perms: dict = {}
    m = Matching()
    order = sorted(roots)
    for _ in range(iters):
        changed = False
        for uid in rng.permutation(order):
            r = roots[uid]
            sim = np.zeros((r.size, r.size))
            saved = _without(perms, r)
            sampler = MatchSampler(saved)
            for name, axis, pos in members_of[uid]:
                lays = pg.members[name]
                wb = permute_tensor(state_b[name].detach().double(), lays, sampler)
                wa = state_a[name].detach().double()
                p = torch.as_tensor(pos)
                fa = wa.index_select(axis, p).movedim(axis, 0).reshape(len(pos), -1)
                fb = wb.index_select(axis, p).movedim(axis, 0).reshape(len(pos), -1)
                sim += (fa @ fb.T).cpu().numpy()
            # B's columns back in their own order: a product over a structured
            # outer still has the outer's parts permuted here (they are its
            # block pairing, which solve reads from ``saved``)
            order_b = sampler.index(r)
            if not np.array_equal(order_b, np.arange(r.size)):
                sim = sim[:, np.argsort(order_b)]
            sub = solve({uid: sim}, {uid: r}, given=saved)
            new = dict(saved)
            new.update(sub.perms)
            if any(not np.array_equal(new.get(k, np.arange(len(v))), perms.get(k, np.arange(len(v)))) for k, v in new.items()):
                changed = True
            perms = new
            m.sims.update(sub.sims)
        if not changed:
            break
    m.perms = perms
    # similarities for the planner: normalised inner products of matched rows
    for uid, r in roots.items():
        if uid in m.sims:
            v = m.sims[uid]
            scale = np.abs(v).max() or 1.0
            m.sims[uid] = v / scale
    return m


def _without(perms: dict, r: Dim) -> dict:
    """Current permutations with root ``r`` (and its inner roots) reset."""
    out = dict(perms)
    out.pop(r.uid, None)
    s = r.structure
    if isinstance(s, Product):
        out.pop(find(s.outer).uid, None)
        for i in s.inners:
            out.pop(find(i).uid, None)
    return out


def permuted(pg, template: torch.fx.GraphModule, gm: torch.fx.GraphModule, sampler) -> torch.fx.GraphModule:
    """A copy of ``template`` holding ``gm``'s tensors permuted by ``sampler``
    along every group axis (a function-preserving change)."""
    out = copy.deepcopy(template)
    for k, v in tensor_state(gm).items():
        lays = pg.members.get(k)
        set_tensor(out, k, permute_tensor(v, lays, sampler) if lays is not None else v)
    return out


def activation_matching(collector: ActivationCollector, exclude: Iterable = ()) -> Matching:
    return solve(collector.similarities(), collector.keys, exclude=set(exclude))
