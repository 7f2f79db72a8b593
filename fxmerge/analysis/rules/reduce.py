"""Reductions. A symmetric reduction (sum, mean, max, var, norm, ...) does not
care about the order along the reduced axes, so it adds no constraint there;
the kept axes pass through. Under widening it would combine both models'
features, so where the reduced axes widen it runs once per model view
(``mixes``). Order-dependent
scans (cumsum, argmax, sort, ...) pin the axis they scan."""
from __future__ import annotations

import torch
import torch.nn as nn

from fxmerge.analysis.ir import Dim
from .registry import RULES, TL, Opaque, widening

SYMMETRIC_METHODS = ["mean", "sum", "amax", "amin", "std", "var", "prod", "logsumexp", "nansum", "nanmean", "all", "any"]
SYMMETRIC_FUNCTIONS = [torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var, torch.prod,
                       torch.logsumexp, torch.nansum, torch.nanmean, torch.all, torch.any]


def _reduce(ctx, x: TL, dims, keepdim: bool, *, pin_reduced: bool = False) -> TL:
    if dims is None:
        dims = list(range(x.ndim))
    elif isinstance(dims, int):
        dims = [dims]
    dims = {d + x.ndim if d < 0 else d for d in dims}
    lays = []
    for i, lay in enumerate(x.lays):
        if i in dims:
            if pin_reduced:
                ctx.pin(lay)
            else:
                ctx.mixing(lay)
            if keepdim:
                lays.append(Dim(1))
        else:
            lays.append(lay)
    return ctx.tl(lays)


def _dims_arg(args, kwargs, pos=0):
    for key in ("dim", "axis"):
        if key in kwargs:
            return kwargs[key]
    return args[pos] if len(args) > pos and not isinstance(args[pos], torch.dtype) else None


@RULES.method(*SYMMETRIC_METHODS)
@RULES.function(*SYMMETRIC_FUNCTIONS)
@widening("mixes")
def symmetric_reduction(ctx, x, *args, **kwargs):
    dims = _dims_arg(args, kwargs)
    keepdim = kwargs.get("keepdim", args[1] if len(args) > 1 and isinstance(args[1], bool) else False)
    return _reduce(ctx, x, dims, keepdim)


@RULES.method("norm")
@RULES.function(torch.norm, torch.linalg.vector_norm)
@widening("mixes")
def norm_reduction(ctx, x, p="fro", dim=None, keepdim=False, *args, **kwargs):
    dim = kwargs.get("dim", dim)
    return _reduce(ctx, x, dim, kwargs.get("keepdim", keepdim))


@RULES.method("max", "min")
@RULES.function(torch.max, torch.min)
@widening("mixes")
def max_min(ctx, x, *args, **kwargs):
    if args and isinstance(args[0], TL):  # elementwise maximum of two tensors
        from .elementwise import broadcast

        return broadcast(ctx, x, *args, **kwargs)
    dim = kwargs.get("dim", args[0] if args else None)
    keepdim = kwargs.get("keepdim", args[1] if len(args) > 1 else False)
    if dim is None:
        return _reduce(ctx, x, None, False)
    # (values, indices): indices are positions along the reduced axis
    values = _reduce(ctx, x, dim, keepdim, pin_reduced=True)
    return (values, ctx.tl(values.lays, values.shape))


@RULES.method("cumsum", "cumprod", "argmax", "argmin", "argsort", "sort", "topk", "flip", "roll")
@RULES.function(torch.cumsum, torch.cumprod, torch.argmax, torch.argmin, torch.argsort, torch.sort,
                torch.topk, torch.flip, torch.roll)
@widening("pins")
def order_dependent(ctx, x, *args, **kwargs):
    """Ops whose result depends on the order along some axes: pin those axes.
    Without a clear axis argument every axis is pinned."""
    name = getattr(ctx.node.target, "__name__", ctx.node.target)
    dims = kwargs.get("dims", kwargs.get("dim"))
    if dims is None:
        if name == "roll" and len(args) >= 2:
            dims = args[1]
        elif name == "flip" and args:
            dims = args[0]
        elif name in ("cumsum", "cumprod", "argsort", "sort") and args:
            dims = args[0]
        elif name in ("argmax", "argmin") and args:
            dims = args[0]
        elif name == "topk":
            dims = args[1] if len(args) > 1 else -1
    if name in ("sort", "argsort") and dims is None:
        dims = -1
    if dims is None:
        dims = list(range(x.ndim))
    dims = [dims] if isinstance(dims, int) else list(dims)
    for d in dims:
        ctx.pin_axis(x.lays[d], "depends on the order of the entries")
    out = ctx.out_value
    if isinstance(out, (tuple, list)):
        return tuple(ctx.tl(_same_rank(x, o.shape), o.shape) for o in out)
    return ctx.tl(_same_rank(x, out.shape))


def _same_rank(x: TL, shape) -> tuple:
    if tuple(shape) == x.shape:
        return x.lays
    if len(shape) == x.ndim:
        return tuple(l if s == xs else Dim(s, pinned=True) for l, s, xs in zip(x.lays, shape, x.shape))
    raise Opaque("order-dependent op changed the rank")


@RULES.module(nn.CosineSimilarity, nn.PairwiseDistance)
@RULES.function(torch.nn.functional.cosine_similarity, torch.nn.functional.pairwise_distance)
@widening("mixes")
def similarity(ctx, x1, x2, *args, **kwargs):
    """A similarity of two tensors reduced over ``dim`` (both operands'
    features permute alike; the reduced axis is combined)."""
    m = ctx.module
    dim = m.dim if isinstance(m, nn.CosineSimilarity) else (-1 if m is not None else kwargs.get("dim", args[0] if args else 1))
    if ctx.node.target is torch.nn.functional.pairwise_distance:
        dim = -1
    keep = kwargs.get("keepdim", getattr(m, "keepdim", False))
    from .elementwise import broadcast_layouts

    lays = broadcast_layouts(ctx, [x1, x2], tuple(max(a, b) for a, b in zip(x1.shape, x2.shape)))
    shape = tuple(max(a, b) for a, b in zip(x1.shape, x2.shape))
    return _reduce(ctx, TL(lays, shape), dim, keep)


@RULES.module(nn.LocalResponseNorm, nn.CrossMapLRN2d)
@widening("pins")
def local_response_norm(ctx, x, *args, **kwargs):
    """Normalised over a window of neighbouring channels: the channel order
    matters (pinned)."""
    ctx.pin_axis(x.lays[1], "normalises over neighbouring channels")
    return ctx.like(x)
