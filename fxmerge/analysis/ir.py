"""The channel-axis IR.

Every axis of every tensor in a traced graph is described by a *layout*:

``Dim``
    A dimension variable of a fixed size. Dims live in a union-find forest: two
    axes whose dims share a root must be permuted by the same permutation. A
    root may carry *structure*, refining what "a permutation of this axis" may
    be:

    * ``Concat(parts)``: the axis is its parts side by side (``torch.cat``,
      ``split``); each part permutes on its own, parts never exchange places.
    * ``Product(outer, inners)``: the axis is ``outer x inner`` in outer-major
      order (``reshape(C -> heads, head_dim)``, grouped convolutions,
      GroupNorm). The outer dim permutes whole blocks; block ``o`` carries its
      own inner dim ``inners[o]`` (one within-head permutation per head).

    A root may also be *pinned*: its permutation is the identity. Pinning is
    how the analysis fails closed.

``Dep(key, table)``
    An axis whose dim depends on the index along another axis of the same
    tensor, the one whose dim is ``key`` (or whose dim is a product with outer
    ``key``). After ``reshape(B, N, H, D)`` the ``D`` axis is
    ``Dep(H, (D_0, ..., D_{H-1}))``: head ``h`` carries its own head-dim.

A tensor's layout is a tuple of layouts, one per axis. Layouts are immutable;
all mutation happens in the union-find forest of dims.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np


_ids = itertools.count()


class Dim:
    __slots__ = ("parent", "size", "pinned", "structure", "hints", "uid", "rank", "touched")

    def __init__(self, size: int, *, pinned: bool = False, hints: Iterable[str] = (), segment: bool = False):
        self.parent: Optional[Dim] = None
        self.size = int(size)
        # A dim of one entry has nothing to permute and is pinned, except a
        # segment of a channel axis (a concatenation cut at an odd place): it
        # still widens, each model keeping its own channel.
        self.pinned = pinned or (self.size <= 1 and not segment)
        self.structure: Optional[Union[Concat, Product]] = None
        self.hints = set(hints)
        self.uid = next(_ids)
        self.rank = 0
        self.touched = False  # ever unified with anything

    def __repr__(self) -> str:
        r = find(self)
        tag = "P" if r.pinned else ""
        return f"Dim#{r.uid}{tag}({r.size})"


@dataclass(frozen=True)
class Concat:
    parts: tuple  # tuple[Dim, ...]


@dataclass(frozen=True)
class Product:
    outer: Dim
    inners: tuple  # tuple[Dim, ...], one per outer index

    @property
    def inner_size(self) -> int:
        return self.inners[0].size


@dataclass(frozen=True)
class Dep:
    key: Dim
    table: tuple  # tuple[Layout, ...], indexed by the key axis' (outer) index

    @property
    def size(self) -> int:
        return layout_size(self.table[0])


Layout = Union[Dim, Dep]


class IRConflict(Exception):
    """Two layouts that must agree cannot be reconciled (the caller pins)."""


# ----------------------------------------------------------------------------
# union-find


def find(d: Dim) -> Dim:
    root = d
    while root.parent is not None:
        root = root.parent
    while d.parent is not None and d.parent is not root:
        d.parent, d = root, d.parent
    return root


def layout_size(lay: Layout) -> int:
    return lay.size if isinstance(lay, Dim) else lay.size


def pin(lay: Layout) -> None:
    """Pin a layout: every dim reachable from it becomes the identity. An
    axis that depends on a key (a pixel shuffle's spatial axis reads a
    different channel block per output channel) is fixed by fixing each of
    its entries: the key may still permute, carrying its entries along."""
    if isinstance(lay, Dep):
        for t in lay.table:
            pin(t)
        return
    # Structure below a pinned root is kept (its parts may be referenced by
    # other axes) and pinned too: a pinned root implies a pinned subtree.
    stack = [lay]
    while stack:
        r = find(stack.pop())
        if r.pinned:
            continue
        r.pinned = True
        s = r.structure
        if isinstance(s, Concat):
            stack.extend(s.parts)
        elif isinstance(s, Product):
            stack.append(s.outer)
            stack.extend(set(s.inners))


def is_pinned(lay: Layout) -> bool:
    if isinstance(lay, Dep):
        return all(is_pinned(t) for t in lay.table)
    r = find(lay)
    if r.pinned:
        return True
    s = r.structure
    if isinstance(s, Concat):
        return all(is_pinned(p) for p in s.parts)
    if isinstance(s, Product):
        return find(s.outer).pinned and all(is_pinned(i) for i in set(s.inners))
    return False


def unify(a: Layout, b: Layout) -> None:
    """Require two layouts to be permuted identically."""
    if a is b:
        return
    if isinstance(a, Dep) or isinstance(b, Dep):
        _unify_dep(a, b)
        return
    a.touched = b.touched = True
    ra, rb = find(a), find(b)
    if ra is rb:
        return
    if ra.size != rb.size:
        raise IRConflict(f"size mismatch {ra.size} vs {rb.size}")
    if ra.rank < rb.rank:
        ra, rb = rb, ra
    sa, sb = ra.structure, rb.structure
    rb.parent = ra
    if ra.rank == rb.rank:
        ra.rank += 1
    ra.hints |= rb.hints
    pinned = ra.pinned or rb.pinned
    ra.pinned = False  # re-pinned below, over the merged structure
    if sa is None:
        ra.structure = sb
    elif sb is not None:
        _unify_structures(ra, sa, sb)
    if pinned:
        pin(ra)


def _unify_dep(a: Layout, b: Layout) -> None:
    if isinstance(a, Dep) and isinstance(b, Dep):
        if len(a.table) != len(b.table):
            raise IRConflict("dependent axes over keys of different sizes")
        unify(a.key, b.key)
        for x, y in zip(a.table, b.table):
            unify(x, y)
        return
    dep, other = (a, b) if isinstance(a, Dep) else (b, a)
    # A dependent axis tied to an independent one: every table entry must agree
    # with it (a uniform family).
    for t in dep.table:
        unify(t, other)


def _unify_structures(root: Dim, sa, sb) -> None:
    if isinstance(sa, Concat) and isinstance(sb, Concat):
        pa, pb = _common_refinement(sa.parts, sb.parts)
        root.structure = Concat(tuple(pa))
        for x, y in zip(pa, pb):
            unify(x, y)
        return
    if isinstance(sa, Product) and isinstance(sb, Product):
        if sa.outer.size == sb.outer.size:
            root.structure = sa
            unify(sa.outer, sb.outer)
            for x, y in zip(sa.inners, sb.inners):
                unify(x, y)
            return
        raise IRConflict("products with different factorisations")
    prod, cat = (sa, sb) if isinstance(sa, Product) else (sb, sa)
    # A product seen as segments: its blocks can no longer move.
    pin(prod.outer)
    segs = Concat(tuple(prod.inners))
    pa, pb = _common_refinement(segs.parts, cat.parts)
    root.structure = Concat(tuple(pa))
    for x, y in zip(pa, pb):
        unify(x, y)


def _boundaries(parts: Sequence[Dim]) -> list[int]:
    out, pos = [], 0
    for p in parts:
        pos += p.size
        out.append(pos)
    return out


def _common_refinement(pa: Sequence[Dim], pb: Sequence[Dim]):
    cuts = sorted(set(_boundaries(pa)) | set(_boundaries(pb)))
    return _refine_parts(pa, cuts), _refine_parts(pb, cuts)


def _refine_parts(parts: Sequence[Dim], cuts: Sequence[int]) -> list[Dim]:
    out, pos = [], 0
    for p in parts:
        inner_cuts = [c - pos for c in cuts if pos < c < pos + p.size]
        out.extend(split_dim(p, inner_cuts))
        pos += p.size
    return out


def split_dim(d: Dim, cuts: Sequence[int]) -> list[Dim]:
    """Refine ``d`` so that it has segment boundaries at ``cuts``; return the
    dims of the resulting segments (in order)."""
    cuts = sorted(c for c in set(cuts) if 0 < c < d.size)
    r = find(d)
    if not cuts:
        return [r]
    edges = [0, *cuts, r.size]
    s = r.structure
    if s is None:
        parts = tuple(Dim(b - a, pinned=r.pinned, segment=True) for a, b in zip(edges, edges[1:]))
        r.structure = Concat(parts)
        return list(parts)
    if isinstance(s, Product):
        n = s.inner_size
        if all(c % n == 0 for c in cuts):
            pin(s.outer)
            r.structure = s = Concat(tuple(s.inners))
        else:
            pin(r)
            return [Dim(b - a, pinned=True) for a, b in zip(edges, edges[1:])]
    fine = _refine_parts(s.parts, cuts)
    r.structure = Concat(tuple(fine))
    # group fine parts into the requested segments
    result, cur, pos, k = [], [], 0, 1
    for p in fine:
        cur.append(p)
        pos += p.size
        if pos == edges[k]:
            result.append(cur[0] if len(cur) == 1 else concat_dim(cur))
            cur, k = [], k + 1
    return result


def concat_dim(parts: Sequence[Dim]) -> Dim:
    d = Dim(sum(p.size for p in parts))
    d.structure = Concat(tuple(parts))
    d.pinned = False
    return d


def product_dim(outer: Dim, inners: Sequence[Dim]) -> Dim:
    inners = tuple(inners)
    assert len(inners) == outer.size, (len(inners), outer.size)
    d = Dim(outer.size * inners[0].size)
    d.pinned = False
    d.structure = Product(outer, inners)
    if find(outer).pinned and all(find(i).pinned and find(i).structure is None for i in inners):
        d.pinned = True
    return d


def as_product(d: Dim, outer_size: int) -> Optional[Product]:
    """View ``d`` as ``outer_size x rest`` (refining it if it is an atom).
    Returns None when the existing structure cannot be factored that way."""
    r = find(d)
    n = r.size
    if outer_size <= 0 or n % outer_size:
        return None
    inner = n // outer_size
    s = r.structure
    if s is None:
        outer = Dim(outer_size, pinned=r.pinned)
        inners = tuple(Dim(inner, pinned=r.pinned) for _ in range(outer_size))
        r.structure = Product(outer, inners)
        return r.structure
    if isinstance(s, Product):
        if s.outer.size == outer_size:
            return s
        return None
    # concat: segments of equal size that align with the blocks
    parts = split_dim(r, [inner * i for i in range(1, outer_size)])
    s = find(d).structure
    if len(parts) == outer_size and all(p.size == inner for p in parts):
        outer = Dim(outer_size, pinned=True)
        return Product(outer, tuple(parts))
    return None


# ----------------------------------------------------------------------------
# dependent axes


def make_dep(key: Dim, table: Sequence[Layout]) -> Layout:
    """A layout that depends on ``key``; collapses to a plain dim when every
    entry is the same."""
    table = tuple(table)
    first = table[0]
    if all(_same(t, first) for t in table[1:]):
        return first
    if all(isinstance(t, Dim) and find(t).pinned for t in table):
        return first  # identity everywhere: no need to tell entries apart
    return Dep(key, table)


def _same(a: Layout, b: Layout) -> bool:
    if isinstance(a, Dim) and isinstance(b, Dim):
        return find(a) is find(b)
    return a is b


def resolve(lay: Layout, key: Dim, index: int) -> Layout:
    """The layout of ``lay`` on the slice where the ``key`` axis is ``index``."""
    if isinstance(lay, Dim):
        return lay
    if find(lay.key) is find(key):
        return lay.table[index]
    return make_dep(lay.key, [resolve(t, key, index) for t in lay.table])


def collapse(lay: Layout) -> Dim:
    """Turn a dependent layout into a single dim by requiring every entry to
    agree (used when the axis it depends on disappears)."""
    if isinstance(lay, Dim):
        return lay
    entries = [collapse(t) for t in lay.table]
    for e in entries[1:]:
        unify(entries[0], e)
    return entries[0]


def dep_keys(lay: Layout) -> Iterator[Dim]:
    if isinstance(lay, Dep):
        yield lay.key
        for t in lay.table:
            yield from dep_keys(t)


def provides_key(lay: Layout, key: Dim) -> bool:
    """True when indexing this axis determines the index of ``key``. A
    dependent axis does so when each of its entries does (the heads axis of
    a packed q/k/v tensor, one head root per projection, provides the key of
    each projection's per-head dims)."""
    if isinstance(lay, Dep):
        return all(provides_key(t, key) for t in lay.table) or any(find(t) is find(key) for t in lay.table if isinstance(t, Dim))
    r, k = find(lay), find(key)
    if r is k:
        return True
    return isinstance(r.structure, Product) and find(r.structure.outer) is k


def localize(lays: Sequence[Layout]) -> tuple:
    """Collapse dependencies on keys that no axis of the tensor provides."""
    out = []
    for lay in lays:
        for k in list(dep_keys(lay)):
            if not any(provides_key(o, k) for o in lays):
                lay = _collapse_key(lay, k)
        out.append(lay)
    return tuple(out)


def _collapse_key(lay: Layout, key: Dim) -> Layout:
    if isinstance(lay, Dim):
        return lay
    table = [_collapse_key(t, key) for t in lay.table]
    if find(lay.key) is find(key):
        merged = table[0]
        for t in table[1:]:
            unify(merged, t)
        return merged
    return make_dep(lay.key, table)


# ----------------------------------------------------------------------------
# walking


def roots_in(lay: Layout, seen: Optional[set] = None) -> Iterator[Dim]:
    """Every root that carries a permutation inside a layout, once: atoms and
    products (a product, then what is inside its outer and its inners),
    through concatenations and the tables of dependent axes. ``seen``
    (root uids) is shared across calls to visit each root once overall."""
    seen = set() if seen is None else seen
    stack = [lay]
    while stack:
        x = stack.pop()
        if isinstance(x, Dep):
            stack.extend(x.table)
            continue
        r = find(x)
        if r.uid in seen:
            continue
        seen.add(r.uid)
        s = r.structure
        if s is None:
            yield r
        elif isinstance(s, Concat):
            stack.extend(s.parts)
        else:
            yield r
            stack.append(s.outer)
            stack.extend(set(s.inners))


def fold(lay: Layout, *, atom: Callable, concat: Callable, product: Callable, pinned: Optional[Callable] = None,
         dep: Optional[Callable] = None, cache: Optional[dict] = None):
    """The one case split over an axis layout: ``atom(root)`` for a root
    without structure, ``concat(root, parts)`` for a concatenation and for a
    product whose outer is pinned (its blocks stay in place, so its inners
    sit side by side like parts), ``product(root, structure)`` for a product
    whose blocks move, ``pinned(root)`` for a pinned root (default: by its
    structure) and ``dep(layout)`` for a dependent axis. The callbacks
    recurse by folding the parts they are given. ``cache`` keeps each
    root's result by uid."""
    if isinstance(lay, Dep):
        if dep is None:
            raise TypeError("a dependent axis has no single layout: resolve or collapse it first")
        return dep(lay)
    r = find(lay)
    if cache is not None and r.uid in cache:
        return cache[r.uid]
    s = r.structure
    if r.pinned and pinned is not None:
        out = pinned(r)
    elif s is None:
        out = atom(r)
    elif isinstance(s, Concat):
        out = concat(r, s.parts)
    elif find(s.outer).pinned:
        out = concat(r, s.inners)
    else:
        out = product(r, s)
    if cache is not None:
        cache[r.uid] = out
    return out


def side_by_side(indices: Sequence, sizes: Sequence[int]):
    """Index arrays of consecutive segments, each shifted to where its
    segment starts."""
    offsets = np.cumsum([0] + list(sizes[:-1]))
    return np.concatenate([np.asarray(i) + o for i, o in zip(indices, offsets)])
