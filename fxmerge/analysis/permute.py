"""Permuting tensors by the IR: one permutation per root dim, composed over
the structure of every axis (``Concat`` parts side by side, ``Product``
blocks moving whole with their own within-block orders, ``Dep`` axes
permuted row by row).

``PermutationSampler`` draws (or, subclassed, looks up) a permutation per
root and turns a layout into a ``new -> old`` index array;
``permute_tensor`` applies those arrays to every axis of a tensor.
"""
from __future__ import annotations

import numpy as np
import torch

from .ir import Dep, Dim, Product, collapse, find, fold, side_by_side


class PermutationSampler:
    """Draws one permutation per root dim and composes them into index arrays
    (``new -> old``) for whole layouts."""

    def __init__(self, rng: np.random.Generator, active=None):
        self.rng = rng
        self.active = active  # None = every root; else a set of root uids
        self._atom: dict[int, np.ndarray] = {}
        self._cache: dict[int, np.ndarray] = {}

    def atom(self, r: Dim) -> np.ndarray:
        p = self._atom.get(r.uid)
        if p is None:
            n = r.size
            if r.pinned or n < 2 or (self.active is not None and r.uid not in self.active):
                p = np.arange(n)
            else:
                p = self.rng.permutation(n)
                while np.all(p == np.arange(n)):
                    p = self.rng.permutation(n)
            self._atom[r.uid] = p
        return p

    def index(self, d: Dim) -> np.ndarray:
        return fold(d, pinned=lambda r: np.arange(r.size), atom=self.atom, concat=self._parts, product=self._blocks,
                    cache=self._cache)

    def _parts(self, r: Dim, parts) -> np.ndarray:
        return side_by_side([self.index(p) for p in parts], [p.size for p in parts])

    def _blocks(self, r: Dim, s: Product) -> np.ndarray:
        """Blocks moved whole by the outer's order, each with its own inner order."""
        outer = self.index(s.outer)
        n = s.inner_size
        return np.concatenate([outer[p] * n + self.index(s.inners[outer[p]]) for p in range(len(outer))])


def provides(lay: Dim, key: Dim) -> bool:
    """Whether indexing axis ``lay`` tells the index along ``key`` (it is the
    key, or a product whose blocks are the key)."""
    r, k = find(lay), find(key)
    return r is k or (isinstance(r.structure, Product) and find(r.structure.outer) is k)


def permute_tensor(t: torch.Tensor, lays, sampler: PermutationSampler) -> torch.Tensor:
    """Apply the sampler's permutation to every axis of ``t`` (``new -> old``
    index arrays; dependent axes are permuted row by row)."""
    for axis, lay in enumerate(lays):
        if isinstance(lay, Dim):
            idx = sampler.index(lay)
            if not np.array_equal(idx, np.arange(len(idx))):
                t = t.index_select(axis, torch.as_tensor(idx, device=t.device))
    for axis, lay in enumerate(lays):
        if not isinstance(lay, Dep):
            continue
        b = next(i for i, l in enumerate(lays) if isinstance(l, Dim) and provides(l, lay.key))
        lb = find(lays[b])
        old = sampler.index(lb)
        if lb is find(lay.key):
            keys = old
        else:
            keys = old // lb.structure.inner_size
        rows = np.stack([sampler.index(collapse(lay.table[k])) for k in keys])
        moved = t.movedim((b, axis), (0, 1))
        ar = torch.arange(moved.shape[0], device=t.device)[:, None]
        moved = moved[ar, torch.as_tensor(rows, device=t.device)]
        t = moved.movedim((0, 1), (b, axis))
    return t
