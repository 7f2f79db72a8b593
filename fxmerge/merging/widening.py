"""Widening: the channel layout of the merged model.

After matching, model B is *aligned*: its weights are permuted so that its
feature ``i`` of every group sits opposite model A's feature ``i`` (a
function-preserving change). A merge plan then says, per root dim of the IR,
which aligned pairs merge. The merged model's axis for a root of size ``d``
with ``k`` merged pairs has width ``2d - k`` and the layout

    [ A-only (d-k) | merged (k) | B-only (d-k) ]

Every widened index carries a *role*: a bit set of the source models it reads
(``ROLE_A = 1``, ``ROLE_B = 2``, merged ``ROLE_M = 3``), and the aligned source
index ``src`` it comes from. Pinned roots keep their width and are shared
(role ``M``, ``src = arange(d)``). Product roots (heads, conv groups) widen
block by block; the inner axes of a merged block are merged whole.

``LayoutWidener`` turns any IR layout into a ``Widening`` (the composition
over ``Concat`` and ``Product`` structure); ``widen_tensor`` builds a merged
parameter from A's and aligned B's, ``widen_features`` builds the
permuted-ensemble features that least squares fits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from fxmerge.analysis.ir import Dep, Dim, Product, fold

ROLE_A, ROLE_B, ROLE_M = 1, 2, 3


@dataclass(frozen=True)
class Widening:
    """One widened axis: per new index, the aligned source index and role."""

    src: np.ndarray  # int64, index into the source axis (both models, aligned)
    role: np.ndarray  # int8, ROLE_A / ROLE_B / ROLE_M

    @property
    def size(self) -> int:
        return len(self.src)

    def reads(self, bit: int) -> np.ndarray:
        """Mask of the new indices that carry model ``bit``'s feature."""
        return (self.role & bit) != 0

    @staticmethod
    def shared(d: int) -> "Widening":
        return Widening(np.arange(d), np.full(d, ROLE_M, dtype=np.int8))

    @staticmethod
    def from_mask(merged: np.ndarray) -> "Widening":
        """The layout ``[A-only | merged | B-only]`` for a boolean merge mask."""
        merged = np.asarray(merged, dtype=bool)
        alone = np.flatnonzero(~merged)
        both = np.flatnonzero(merged)
        src = np.concatenate([alone, both, alone]).astype(np.int64)
        role = np.concatenate([
            np.full(len(alone), ROLE_A), np.full(len(both), ROLE_M), np.full(len(alone), ROLE_B)
        ]).astype(np.int8)
        return Widening(src, role)

    @staticmethod
    def concat(parts, sizes) -> "Widening":
        srcs, roles, off = [], [], 0
        for w, n in zip(parts, sizes):
            srcs.append(w.src + off)
            roles.append(w.role)
            off += n
        return Widening(np.concatenate(srcs), np.concatenate(roles))


class LayoutWidener:
    """Widenings of IR layouts under one plan (``{root uid: merge mask}`` for
    atom roots and product outers; roots without an entry merge fully)."""

    def __init__(self, masks: dict):
        self.masks = masks
        self._cache: dict = {}

    def mask(self, root: Dim) -> Optional[np.ndarray]:
        return self.masks.get(root.uid)

    def widen(self, lay) -> Widening:
        return fold(lay, dep=self._widen_dep, pinned=lambda r: Widening.shared(r.size), atom=self._widen_atom,
                    concat=lambda r, parts: Widening.concat([self.widen(p) for p in parts], [p.size for p in parts]),
                    product=self._widen_blocks, cache=self._cache)

    def _widen_dep(self, lay: Dep) -> Widening:
        # A dependent axis (the heads of a packed q/k/v after reshape) has
        # one layout per index of its key axis. The planner only lets
        # them widen when they widen alike; otherwise they sit inside
        # merged-whole blocks and keep their width and order.
        ws = [self.widen(t) for t in lay.table]
        first = ws[0]
        if all(np.array_equal(w.src, first.src) and np.array_equal(w.role, first.role) for w in ws[1:]):
            return first
        return Widening.shared(lay.size)

    def _widen_atom(self, r: Dim) -> Widening:
        m = self.mask(r)
        return Widening.shared(r.size) if m is None or m.all() else Widening.from_mask(m)

    def _widen_blocks(self, r: Dim, s: Product) -> Widening:
        """Blocks widen whole (A-only, merged, B-only blocks), inner order kept."""
        n = s.inner_size
        blocks = self.widen(s.outer)
        src = (blocks.src[:, None] * n + np.arange(n)[None, :]).reshape(-1)
        role = np.repeat(blocks.role, n)
        return Widening(src, role)

    def size(self, lay) -> int:
        return self.widen(lay).size


def _gather(t: torch.Tensor, axis: int, idx: np.ndarray) -> torch.Tensor:
    if len(idx) == t.shape[axis] and np.array_equal(idx, np.arange(len(idx))):
        return t
    return t.index_select(axis, torch.as_tensor(idx, dtype=torch.long, device=t.device))


def _axis_mask(bits: np.ndarray, ndim: int, axis: int, device) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = len(bits)
    return torch.as_tensor(bits, device=device).reshape(shape)


def widen_tensor(a: torch.Tensor, b: torch.Tensor, lays, in_axes, widener: LayoutWidener) -> torch.Tensor:
    """The merged value of a parameter from A's value and aligned B's.

    Output-like axes (every axis but the contracted ``in_axes``) decide how the
    two models mix: an entry that is A-only on some axis and B-only on another
    is a structural zero; one that reads both is their average. Along an input
    (contracted) axis a model's weight is placed only on the columns that carry
    that model's feature: merged columns receive both, the other model's
    columns zero.
    """
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    dtype = a.dtype
    if not a.is_floating_point():
        return a.clone()  # counters and index buffers: A's value
    ws = [widener.widen(l) for l in lays]
    ga, gb = a, b
    for axis, w in enumerate(ws):
        ga = _gather(ga, axis, w.src)
        gb = _gather(gb, axis, w.src)
    nd = a.ndim
    has_a = torch.ones((1,) * nd, dtype=torch.bool, device=a.device)
    has_b = has_a.clone()
    read_a = has_a.clone()
    read_b = has_a.clone()
    for axis, w in enumerate(ws):
        ma = _axis_mask(w.reads(ROLE_A), nd, axis, a.device)
        mb = _axis_mask(w.reads(ROLE_B), nd, axis, a.device)
        if axis in in_axes:
            read_a, read_b = read_a & ma, read_b & mb
        else:
            has_a, has_b = has_a & ma, has_b & mb
    both = has_a & has_b
    ca = torch.where(both, 0.5, has_a.to(torch.float64)) * read_a
    cb = torch.where(both, 0.5, has_b.to(torch.float64)) * read_b
    out = ca.to(dtype) * ga + cb.to(dtype) * gb
    # Exact zeros where a model does not contribute (no 0 * inf = nan).
    return out


def widen_features(xa: torch.Tensor, xb: torch.Tensor, axis: int, w: Widening) -> torch.Tensor:
    """Permuted-ensemble features: A's feature on A-only channels, aligned B's
    on B-only channels, their average on merged ones."""
    ga = _gather(xa, axis, w.src)
    gb = _gather(xb, axis, w.src)
    ca = _axis_mask(np.where(w.role == ROLE_M, 0.5, (w.role == ROLE_A).astype(np.float64)), xa.ndim, axis, xa.device)
    cb = _axis_mask(np.where(w.role == ROLE_M, 0.5, (w.role == ROLE_B).astype(np.float64)), xa.ndim, axis, xa.device)
    return ca.to(xa.dtype) * ga + cb.to(xa.dtype) * gb


def row_blocks(w_out, w_in) -> list:
    """Row classes of a widened dense contraction, as ``(input columns,
    output rows)`` pairs: A-only rows read A's and the merged columns,
    merged rows every column, B-only rows B's and the merged ones."""
    blocks = []
    for bit in (ROLE_A, None, ROLE_B):
        if bit is None:
            out_rows = np.flatnonzero(w_out.role == ROLE_M)
            cols = np.arange(w_in.size)
        else:
            out_rows = np.flatnonzero(w_out.role == bit)
            cols = np.flatnonzero(w_in.reads(bit))
        if len(out_rows):
            blocks.append((cols, out_rows))
    return blocks
