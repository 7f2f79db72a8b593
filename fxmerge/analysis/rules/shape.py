"""Layout ops: reshape (split and merge axes), permute, expand, repeat, cat,
stack, split/chunk/unbind and indexing."""
from __future__ import annotations

import operator

import torch
import torch.nn as nn

from fxmerge.analysis.ir import (
    Dep, Dim, Layout, as_product, collapse, concat_dim, dep_keys, find, is_pinned, layout_size,
    make_dep, pin, product_dim, resolve, split_dim,
)
from .registry import RULES, TL, Opaque, tensors_in, widening

# ----------------------------------------------------------------------------
# reshape


def make_product(outer: Layout, inner: Layout) -> Layout:
    """The layout of two adjacent axes merged into one (``outer`` major)."""
    size = layout_size(outer) * layout_size(inner)
    if is_pinned(outer) and is_pinned(inner):
        return Dim(size, pinned=True)
    if isinstance(outer, Dep):
        return make_dep(outer.key, [make_product(t, resolve(inner, outer.key, j)) for j, t in enumerate(outer.table)])
    keys = [k for k in dep_keys(inner) if find(k) is not find(outer)]
    if keys:
        k = keys[0]
        return make_dep(k, [make_product(outer, resolve(inner, k, j)) for j in range(k.size)])
    if isinstance(inner, Dep):  # depends on ``outer`` only
        entries = inner.table
    else:
        entries = (inner,) * outer.size
    return product_dim(outer, entries)


def split_layout(lay: Layout, factors: list) -> list:
    """Split one axis into ``factors`` (outer first); refines the dims."""
    if len(factors) == 1:
        return [lay]
    if isinstance(lay, Dep):
        per_entry = [split_layout(t, factors) for t in lay.table]
        return [make_dep(lay.key, [pe[i] for pe in per_entry]) for i in range(len(factors))]
    if is_pinned(lay):
        return [Dim(f, pinned=True) for f in factors]
    p = as_product(lay, factors[0])
    if p is None:
        pin(lay)
        return [Dim(f, pinned=True) for f in factors]
    rest = [split_layout(inner, factors[1:]) for inner in p.inners]
    return [p.outer] + [make_dep(p.outer, [r[i] for r in rest]) for i in range(len(factors) - 1)]


def reshape_layouts(x: TL, out_shape: tuple) -> tuple:
    """Layouts of ``x`` reshaped to ``out_shape``: axes are matched in runs of
    equal product; each run is merged and split again."""
    in_shape = x.shape
    if 0 in in_shape or 0 in out_shape:
        raise Opaque("reshape of an empty tensor")
    ins = [i for i, s in enumerate(in_shape) if s != 1]
    outs = [j for j, s in enumerate(out_shape) if s != 1]
    result: list = [Dim(1) if s == 1 else None for s in out_shape]
    a = b = 0
    while a < len(ins) or b < len(outs):
        ga, gb = [ins[a]], [outs[b]]
        pa, pb = in_shape[ins[a]], out_shape[outs[b]]
        a, b = a + 1, b + 1
        while pa != pb:
            if pa < pb:
                ga.append(ins[a]); pa *= in_shape[ins[a]]; a += 1
            else:
                gb.append(outs[b]); pb *= out_shape[outs[b]]; b += 1
        merged = x.lays[ga[-1]]
        for i in reversed(ga[:-1]):
            merged = make_product(x.lays[i], merged)
        parts = split_layout(merged, [out_shape[j] for j in gb])
        for j, lay in zip(gb, parts):
            result[j] = lay
    return tuple(result)


@RULES.method("reshape", "view", "view_as", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze")
@RULES.function(torch.reshape, torch.flatten, torch.unflatten, torch.squeeze, torch.unsqueeze)
@RULES.module(nn.Flatten, nn.Unflatten)
@widening("layout")
def reshape(ctx, x, *args, **kwargs):
    free = [lay for lay in x.lays if not is_pinned(lay)]
    out = reshape_layouts(x, ctx.out_shape)
    if any(is_pinned(lay) for lay in free):
        ctx.record_pin("splits channels joined with another axis where no block of them ends (channels folded "
                       "into the batch or the positions): their order is fixed")
    return ctx.tl(out)


# ----------------------------------------------------------------------------
# axis order


def _norm_axes(dims, ndim):
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = dims[0]
    return [d + ndim if d < 0 else d for d in dims]


@RULES.method("permute")
@RULES.function(torch.permute)
@widening("layout")
def permute(ctx, x, *dims, **kwargs):
    dims = _norm_axes(dims or kwargs.get("dims"), x.ndim)
    return ctx.tl(tuple(x.lays[d] for d in dims))


@RULES.method("transpose", "swapaxes", "swapdims")
@RULES.function(torch.transpose, torch.swapaxes, torch.swapdims)
@widening("layout")
def transpose(ctx, x, dim0, dim1):
    a, b = _norm_axes((dim0, dim1), x.ndim)
    lays = list(x.lays)
    lays[a], lays[b] = lays[b], lays[a]
    return ctx.tl(lays)


@RULES.method("movedim", "moveaxis")
@RULES.function(torch.movedim, torch.moveaxis)
@widening("layout")
def movedim(ctx, x, source, destination):
    src = _norm_axes(source if isinstance(source, (list, tuple)) else [source], x.ndim)
    dst = _norm_axes(destination if isinstance(destination, (list, tuple)) else [destination], x.ndim)
    order = [i for i in range(x.ndim) if i not in src]
    for d, s in sorted(zip(dst, src)):
        order.insert(d, s)
    return ctx.tl(tuple(x.lays[i] for i in order))


@RULES.method("t")
@RULES.function(torch.t)
@widening("layout")
def t_(ctx, x):
    return ctx.tl(tuple(reversed(x.lays)))


@RULES.function(getattr)
@widening("layout")
def tensor_attribute(ctx, x, name):
    if name == "T":
        return ctx.tl(tuple(reversed(x.lays)))
    if name == "mT":
        return ctx.tl(x.lays[:-2] + (x.lays[-1], x.lays[-2]))
    if name in ("data",):
        return ctx.like(x)
    raise Opaque(f"tensor attribute '{name}'")


# ----------------------------------------------------------------------------
# broadcast copies


@RULES.method("expand", "expand_as", "broadcast_to")
@RULES.function(torch.broadcast_to)
@widening("layout")
def expand(ctx, x, *args, **kwargs):
    out_shape = ctx.out_shape
    lead = len(out_shape) - x.ndim
    lays = [Dim(s) for s in out_shape[:lead]]
    for i, lay in enumerate(x.lays):
        size = out_shape[lead + i]
        # an expanded axis holds copies: any permutation of it is harmless
        lays.append(lay if x.shape[i] == size else Dim(size))
    return ctx.tl(lays)


@RULES.method("repeat", "tile")
@RULES.function(torch.tile)
@widening("layout")
def repeat(ctx, x, *args, **kwargs):
    out_shape = ctx.out_shape
    lead = len(out_shape) - x.ndim
    lays = [Dim(s) for s in out_shape[:lead]]
    for i, lay in enumerate(x.lays):
        size, reps = out_shape[lead + i], out_shape[lead + i] // x.shape[i]
        if reps == 1:
            lays.append(lay)
        elif x.shape[i] == 1:
            lays.append(Dim(size))
        else:  # copies side by side, each permuted like the original
            lays.append(concat_dim([collapse(lay)] * reps))
    return ctx.tl(lays)


@RULES.method("repeat_interleave")
@RULES.function(torch.repeat_interleave)
@widening("layout")
def repeat_interleave(ctx, x, repeats, dim=None, **kwargs):
    if dim is None or not isinstance(repeats, int):
        raise Opaque("repeat_interleave without an axis or with tensor repeats")
    d = _norm_axes([dim], x.ndim)[0]
    lays = list(x.lays)
    base = collapse(lays[d])
    lays[d] = product_dim(base, [Dim(repeats, pinned=True)] * base.size)
    return ctx.tl(lays)


# ----------------------------------------------------------------------------
# concatenation and splitting


@RULES.function(torch.cat, torch.concat, torch.concatenate)
@widening("layout")
def cat(ctx, tensors, dim=0, axis=None, **kwargs):
    if axis is not None:
        dim = axis
    ts = [t for t in tensors if isinstance(t, TL) and 0 not in t.shape]
    if not ts:
        raise Opaque("cat of no tensors")
    nd = ts[0].ndim
    d = _norm_axes([dim], nd)[0]
    for t in ts[1:]:
        for i in range(nd):
            if i != d:
                ctx.unify(ts[0].lays[i], t.lays[i])
    parts = [collapse(t.lays[d]) for t in ts]
    if len(parts) == 1:
        out = parts[0]
    else:
        for p in parts:
            ctx.hint(p, "concat")
        out = concat_dim(parts)
    lays = list(ts[0].lays)
    lays[d] = out
    return ctx.tl(lays)


@RULES.function(torch.stack)
@widening("layout")
def stack(ctx, tensors, dim=0, **kwargs):
    ts = [t for t in tensors if isinstance(t, TL)]
    nd = ts[0].ndim
    d = _norm_axes([dim], nd + 1)[0]
    key = Dim(len(ts), pinned=True)  # which tensor: a fixed position
    lays = [make_dep(key, [t.lays[i] for t in ts]) for i in range(nd)]
    lays.insert(d, key)
    return ctx.tl(lays)


def _split_axis(lay: Layout, cuts: list) -> list:
    if isinstance(lay, Dep):
        per = [_split_axis(t, cuts) for t in lay.table]
        return [make_dep(lay.key, [p[i] for p in per]) for i in range(len(cuts) + 1)]
    return split_dim(lay, cuts)


def split_outputs(ctx, x: TL, d: int, sizes: list) -> tuple:
    cuts, pos = [], 0
    for s in sizes[:-1]:
        pos += s
        cuts.append(pos)
    pieces = _split_axis(x.lays[d], cuts)
    if len(pieces) != len(sizes):
        raise Opaque("split produced a different number of pieces")
    outs = []
    for piece, s in zip(pieces, sizes):
        lays = list(x.lays)
        lays[d] = piece
        shape = list(x.shape)
        shape[d] = s
        outs.append(ctx.tl(lays, shape))
    return tuple(outs)


@RULES.method("split", "chunk", "tensor_split", "split_with_sizes")
@RULES.function(torch.split, torch.chunk, torch.tensor_split)
@widening("layout")
def split(ctx, x, *args, dim=0, **kwargs):
    shapes = ctx.out_shapes()
    if len(args) >= 2:
        dim = args[1]
    d = _norm_axes([dim], x.ndim)[0]
    return split_outputs(ctx, x, d, [s[d] for s in shapes])


def index_axis(x_lays: tuple, d: int, j: int) -> tuple:
    """Layouts after taking index ``j`` of axis ``d`` (which is pinned)."""
    lay = x_lays[d]
    if isinstance(lay, Dep):
        lay = collapse(lay)
    pin(lay)
    key = find(lay)
    rest = x_lays[:d] + x_lays[d + 1:]
    return tuple(resolve(l, key, j) for l in rest)


@RULES.method("unbind")
@RULES.function(torch.unbind)
@widening("layout")
def unbind(ctx, x, dim=0):
    d = _norm_axes([dim], x.ndim)[0]
    shape = x.shape[:d] + x.shape[d + 1:]
    return tuple(ctx.tl(index_axis(x.lays, d, j), shape) for j in range(x.shape[d]))


@RULES.method("select")
@RULES.function(torch.select)
@widening("layout")
def select(ctx, x, dim, index):
    d = _norm_axes([dim], x.ndim)[0]
    return ctx.tl(index_axis(x.lays, d, index % x.shape[d]))


@RULES.method("narrow")
@RULES.function(torch.narrow)
@widening("layout")
def narrow(ctx, x, dim, start, length):
    d = _norm_axes([dim], x.ndim)[0]
    return ctx.tl(_slice_axis(x, d, slice(start, start + length)))


def _slice_axis(x: TL, d: int, sl: slice) -> tuple:
    n = x.shape[d]
    start, stop, step = sl.indices(n)
    lays = list(x.lays)
    if (start, stop, step) == (0, n, 1):
        return tuple(lays)
    if step != 1 or stop <= start:
        pin(lays[d])
        lays[d] = Dim(len(range(start, stop, step)), pinned=True)
        return tuple(lays)
    pieces = _split_axis(lays[d], [c for c in (start, stop) if 0 < c < n])
    lays[d] = pieces[1] if start > 0 else pieces[0]
    return tuple(lays)


@RULES.function(operator.getitem)
@widening("layout")
def getitem(ctx, x, idx):
    if not isinstance(x, TL):
        # a tuple/list of values (split, unbind, multi-output modules)
        if isinstance(x, (list, tuple)):
            return x[idx]
        raise Opaque("indexing a non-tensor value")
    items = list(idx) if isinstance(idx, tuple) else [idx]
    if any(isinstance(it, (TL, list)) or tensors_in(it) for it in items):
        return _index_by_tensor(ctx, x, items)
    # expand the ellipsis
    n_axes = sum(1 for it in items if it is not None and it is not Ellipsis)
    if Ellipsis in items:
        k = items.index(Ellipsis)
        items[k:k + 1] = [slice(None)] * (x.ndim - n_axes)
    items += [slice(None)] * (x.ndim - sum(1 for it in items if it is not None))
    lays = list(x.lays)
    shape = list(x.shape)
    # integer indices first (they remove axes and resolve dependencies)
    ax = 0
    plan = []
    for it in items:
        if it is None:
            plan.append(("new", None))
        elif isinstance(it, int):
            plan.append(("int", ax, it))
            ax += 1
        elif isinstance(it, slice):
            plan.append(("slice", ax, it))
            ax += 1
        else:
            raise Opaque(f"index of type {type(it).__name__}")
    kept = []
    for p in plan:
        if p[0] == "slice":
            kept.append(p[1])
    # resolve integer indices
    removed = []
    for p in plan:
        if p[0] == "int":
            d, j = p[1], p[2] % x.shape[p[1]]
            lay = lays[d]
            if isinstance(lay, Dep):
                lay = collapse(lay)
            pin(lay)
            key = find(lay)
            lays = [resolve(l, key, j) if i != d else l for i, l in enumerate(lays)]
            removed.append(d)
    sliced = TL(tuple(lays), tuple(shape))
    out = []
    for p in plan:
        if p[0] == "new":
            out.append(Dim(1))
        elif p[0] == "slice":
            out.append(_slice_axis(sliced, p[1], p[2])[p[1]])
    return ctx.tl(out)


def _index_by_tensor(ctx, x: TL, items: list) -> TL:
    """``x[idx]`` / ``x[:, idx]`` with one integer tensor of positions (a
    relative position bias table read by an index buffer): the indexed axis
    is read at fixed positions (pinned), the index's own axes are new
    positions, every other axis passes through."""
    index_nodes = ctx.node.args[1] if isinstance(ctx.node.args[1], tuple) else (ctx.node.args[1],)
    tensors = [(i, it) for i, it in enumerate(items) if isinstance(it, TL)]
    rest = [it for it in items if not isinstance(it, TL)]
    if len(tensors) != 1 or any(not (it == slice(None) or it is Ellipsis) for it in rest) or items.count(Ellipsis) > 1:
        raise Opaque("advanced indexing other than one integer tensor along one axis")
    pos, index = tensors[0]
    meta = getattr(index_nodes[pos], "meta", {}).get("fxm_value")
    if meta is None or meta.dtype in (torch.bool, torch.uint8) or meta.dtype.is_floating_point:
        raise Opaque("indexing by a mask or a non-integer tensor")
    if Ellipsis in items:
        k = items.index(Ellipsis)
        items = items[:k] + [slice(None)] * (x.ndim - (len(items) - 1)) + items[k + 1:]
        pos = next(i for i, it in enumerate(items) if isinstance(it, TL))
    ctx.pin(x.lays[pos], index)  # which entries are read depends on the positions in the index
    out = x.lays[:pos] + tuple(Dim(sz, pinned=True) for sz in index.shape) + x.lays[pos + 1:]
    return ctx.tl(out)


@RULES.method("unfold")
@widening("layout")
def tensor_unfold(ctx, x, dimension, size, step):
    """``x.unfold(dim, size, step)``: windows along one (spatial) axis, which
    is pinned; the window axis is new and pinned; other axes pass through."""
    d = _norm_axes([dimension], x.ndim)[0]
    ctx.pin(x.lays[d])
    out_shape = ctx.out_shape
    lays = list(x.lays)
    lays[d] = Dim(out_shape[d], pinned=True)
    return ctx.tl(lays + [Dim(size, pinned=True)])


@RULES.module(nn.Embedding)
@RULES.function(torch.nn.functional.embedding)
@widening("layout")
def embedding(ctx, input, *args, **kwargs):
    """Rows of a table read by index: the indices are positions (pinned),
    the table's feature axis becomes the output's last axis."""
    weight = ctx.param("weight") if ctx.module is not None else (args[0] if args else kwargs["weight"])
    ctx.pin(input, weight.lays[0])
    return ctx.tl(tuple(Dim(s, pinned=True) for s in input.shape) + (weight.lays[1],))


def _through_reshapes(ctx, x: TL, steps: list) -> TL:
    """Layouts through a chain of reshapes and axis permutations (the way
    the pixel/channel shuffles are defined)."""
    for kind, arg in steps:
        if kind == "reshape":
            x = TL(reshape_layouts(x, arg), arg)
        else:
            x = TL(tuple(x.lays[i] for i in arg), tuple(x.shape[i] for i in arg))
    return ctx.tl(x.lays)


@RULES.module(nn.PixelShuffle)
@RULES.function(torch.nn.functional.pixel_shuffle)
@widening("layout")
def pixel_shuffle(ctx, x, *args, **kwargs):
    r = ctx.module.upscale_factor if ctx.module is not None else (args[0] if args else kwargs["upscale_factor"])
    *lead, c, h, w = x.shape
    steps = [("reshape", (*lead, c // (r * r), r, r, h, w)), ("perm", tuple(range(len(lead))) + tuple(
        len(lead) + i for i in (0, 3, 1, 4, 2))), ("reshape", (*lead, c // (r * r), h * r, w * r))]
    return _through_reshapes(ctx, x, steps)


@RULES.module(nn.PixelUnshuffle)
@RULES.function(torch.nn.functional.pixel_unshuffle)
@widening("layout")
def pixel_unshuffle(ctx, x, *args, **kwargs):
    r = ctx.module.downscale_factor if ctx.module is not None else (args[0] if args else kwargs["downscale_factor"])
    *lead, c, h, w = x.shape
    steps = [("reshape", (*lead, c, h // r, r, w // r, r)), ("perm", tuple(range(len(lead))) + tuple(
        len(lead) + i for i in (0, 2, 4, 1, 3))), ("reshape", (*lead, c * r * r, h // r, w // r))]
    return _through_reshapes(ctx, x, steps)


@RULES.module(nn.ChannelShuffle)
@RULES.function(torch.nn.functional.channel_shuffle, getattr(torch, "channel_shuffle", None))
@widening("mixes")
def channel_shuffle(ctx, x, *args, **kwargs):
    g = ctx.module.groups if ctx.module is not None else (args[0] if args else kwargs["groups"])
    b, c, *rest = x.shape
    n = len(rest)
    split = TL(reshape_layouts(x, (b, g, c // g, *rest)), (b, g, c // g, *rest))
    # the rewrite keeps the module's ``groups`` constant and has no widened
    # layout for an interleaving of two free axes: the channels permute
    # (blocks and within blocks); widened, the shuffle runs once per model view
    ctx.mixing(split.lays[1], split.lays[2])
    steps = [("perm", (0, 2, 1) + tuple(3 + i for i in range(n))), ("reshape", (b, c, *rest))]
    return _through_reshapes(ctx, split, steps)

