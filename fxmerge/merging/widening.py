"""Widening: the channel layout of the merged model.

After matching, every model but the first is *aligned*: its weights are
permuted so that its feature ``i`` of every group sits opposite the other
models' feature ``i`` (a function-preserving change). A merge plan then says,
per root dim of the IR, which aligned features merge. With two models the
merged model's axis for a root of size ``d`` with ``k`` merged pairs has
width ``2d - k`` and the layout

    [ A-only (d-k) | merged (k) | B-only (d-k) ]

Every widened index carries a *role*: the bit set of the source models it
reads (model ``m`` is bit ``1 << m``: ``ROLE_A = 1``, ``ROLE_B = 2``, merged
``ROLE_M = 3`` for two models), and the aligned source index ``src`` it
comes from. With ``N`` models a plan gives every feature a partition of the
models (``Widening.from_partition``): one widened channel per cluster, read
by the cluster's models. Pinned roots keep their width and are shared (every
model's bit, ``src = arange(d)``). Product roots (heads, conv groups) widen
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
ROLE_DTYPE = np.int16  # a role is a bit set over the source models (at most MAX_MODELS)


def model_bit(m: int) -> int:
    """The role bit of source model ``m``."""
    return 1 << m


def every_model(n_models: int) -> int:
    """The role of a channel every one of ``n_models`` models reads."""
    return (1 << n_models) - 1


def role_order(role: int) -> tuple:
    """Where channels of a role sit in a widened axis: by the first model
    they read, then the last, so two models give ``[A-only | merged | B-only]``."""
    bits = [m for m in range(16) if role >> m & 1]
    return (bits[0], bits[-1], role)


def popcount(roles: np.ndarray) -> np.ndarray:
    """How many models read each channel."""
    roles = np.asarray(roles, dtype=np.int64)
    return np.array([bin(int(r)).count("1") for r in roles.reshape(-1)], dtype=np.int64).reshape(roles.shape)


@dataclass(frozen=True)
class Widening:
    """One widened axis: per new index, the aligned source index and role."""

    src: np.ndarray  # int64, index into the source axis (every model, aligned)
    role: np.ndarray  # ROLE_DTYPE, the bit set of the models each channel reads

    @property
    def size(self) -> int:
        return len(self.src)

    def reads(self, bit: int) -> np.ndarray:
        """Mask of the new indices that carry model ``bit``'s feature."""
        return (self.role & bit) != 0

    @staticmethod
    def shared(d: int, role: int = ROLE_M) -> "Widening":
        return Widening(np.arange(d), np.full(d, role, dtype=ROLE_DTYPE))

    @staticmethod
    def from_mask(merged: np.ndarray) -> "Widening":
        """The layout ``[A-only | merged | B-only]`` for a boolean merge mask."""
        merged = np.asarray(merged, dtype=bool)
        alone = np.flatnonzero(~merged)
        both = np.flatnonzero(merged)
        src = np.concatenate([alone, both, alone]).astype(np.int64)
        role = np.concatenate([
            np.full(len(alone), ROLE_A), np.full(len(both), ROLE_M), np.full(len(alone), ROLE_B)
        ]).astype(ROLE_DTYPE)
        return Widening(src, role)

    @staticmethod
    def from_partition(labels: np.ndarray) -> "Widening":
        """The layout of a partition of the models per feature (``labels[m,
        i]``: model ``m``'s cluster at feature ``i``): one channel per
        cluster, channels of one role side by side (``role_order``), each
        role's in feature order. Two models, merged where their labels
        agree, give ``from_mask``'s layout."""
        labels = np.asarray(labels)
        entries = []
        for i in range(labels.shape[1]):
            roles: dict = {}
            for m, lab in enumerate(labels[:, i].tolist()):
                roles[lab] = roles.get(lab, 0) | model_bit(m)
            entries += [(role_order(r), i, r) for r in roles.values()]
        entries.sort()
        return Widening(np.array([e[1] for e in entries], dtype=np.int64),
                        np.array([e[2] for e in entries], dtype=ROLE_DTYPE))

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
    atom roots and product outers of two models, ``{root uid: partition}``
    (``(n_models, size)`` cluster labels) for more; roots without an entry
    merge fully)."""

    def __init__(self, masks: dict, n_models: int = 2):
        self.masks = masks
        self.n_models = n_models
        self.shared_role = every_model(n_models)
        self._cache: dict = {}

    @property
    def view_bits(self) -> tuple:
        """The role bit of every source model, in order."""
        return tuple(model_bit(m) for m in range(self.n_models))

    def mask(self, root: Dim) -> Optional[np.ndarray]:
        return self.masks.get(root.uid)

    def widen(self, lay) -> Widening:
        return fold(lay, dep=self._widen_dep, pinned=lambda r: Widening.shared(r.size, self.shared_role),
                    atom=self._widen_atom,
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
        return Widening.shared(lay.size, self.shared_role)

    def _widen_atom(self, r: Dim) -> Widening:
        m = self.mask(r)
        if m is not None and m.ndim == 2:
            return Widening.from_partition(m)
        return Widening.shared(r.size, self.shared_role) if m is None or m.all() else Widening.from_mask(m)

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


def widen_tensor(sources: list, lays, in_axes, widener: LayoutWidener) -> torch.Tensor:
    """The merged value of a parameter from every model's aligned value.

    Output-like axes (every axis but the contracted ``in_axes``) decide how the
    models mix: an entry whose channels no model reads on all of those axes
    (A-only on one, B-only on another) is a structural zero; one that several
    models read is their average. Along an input (contracted) axis a model's
    weight is placed only on the columns that carry that model's feature:
    merged columns receive every reader's, the other models' columns zero.
    """
    first = sources[0]
    for other in sources[1:]:
        if other.shape != first.shape:
            raise ValueError(f"shape mismatch {tuple(first.shape)} vs {tuple(other.shape)}")
    dtype = first.dtype
    if not first.is_floating_point():
        return first.clone()  # counters and index buffers: the first model's value
    ws = [widener.widen(l) for l in lays]
    gathered = []
    for t in sources:
        for axis, w in enumerate(ws):
            t = _gather(t, axis, w.src)
        gathered.append(t)
    nd = first.ndim
    has, read = [], []
    for m in range(len(sources)):
        bit = model_bit(m)
        h = torch.ones((1,) * nd, dtype=torch.bool, device=first.device)
        r = h.clone()
        for axis, w in enumerate(ws):
            mask = _axis_mask(w.reads(bit), nd, axis, first.device)
            if axis in in_axes:
                r = r & mask
            else:
                h = h & mask
        has.append(h)
        read.append(r)
    count = sum(h.to(torch.float64) for h in has)
    out = 0
    for h, r, g in zip(has, read, gathered):
        c = torch.where(count > 1, 1.0 / count.clamp_min(1), h.to(torch.float64)) * h * r
        out = out + c.to(dtype) * g
    # Exact zeros where a model does not contribute (no 0 * inf = nan).
    return out


def widen_features(xs: list, axis: int, w: Widening) -> torch.Tensor:
    """Permuted-ensemble features: each channel the mean of the features of
    the models it reads (a model's own feature on its own channels)."""
    share = 1.0 / np.maximum(popcount(w.role), 1)
    out = 0
    for m, x in enumerate(xs):
        c = _axis_mask(np.where(w.reads(model_bit(m)), share, 0.0), x.ndim, axis, x.device)
        out = out + c.to(x.dtype) * _gather(x, axis, w.src)
    return out


def row_blocks(w_out, w_in) -> list:
    """Row classes of a widened dense contraction, as ``(input columns,
    output rows)`` pairs: the rows of one role read the columns of any of
    its models (two models: A-only rows read A's and the merged columns,
    merged rows every column, B-only rows B's and the merged ones)."""
    blocks = []
    for role in sorted({int(r) for r in w_out.role}, key=role_order):
        out_rows = np.flatnonzero(w_out.role == role)
        cols = np.flatnonzero(w_in.reads(role))
        blocks.append((cols, out_rows))
    return blocks
