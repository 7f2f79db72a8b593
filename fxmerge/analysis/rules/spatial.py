"""Spatial ops: pooling, resampling, padding, unfold/fold. They act on each
channel separately, so batch and channel axes pass through and spatial axes
are pinned."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxmerge.analysis.ir import Dim, as_product, product_dim
from .registry import RULES, TL, Opaque, widening

POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.LPPool3d, nn.FractionalMaxPool2d,
    nn.FractionalMaxPool3d,
)
_SPATIAL_RANK = {
    nn.MaxPool1d: 1, nn.AvgPool1d: 1, nn.AdaptiveAvgPool1d: 1, nn.AdaptiveMaxPool1d: 1, nn.LPPool1d: 1,
    nn.MaxPool3d: 3, nn.AvgPool3d: 3, nn.AdaptiveAvgPool3d: 3, nn.AdaptiveMaxPool3d: 3, nn.LPPool3d: 3,
    nn.FractionalMaxPool3d: 3,
}


def per_channel_spatial(ctx, x: TL, spatial: int) -> TL:
    out_shape = ctx.out_shape
    if len(out_shape) != x.ndim:
        raise Opaque("spatial op changed the rank")
    keep = x.ndim - spatial
    ctx.pin(*x.lays[keep:])
    return ctx.tl(x.lays[:keep] + tuple(Dim(s, pinned=True) for s in out_shape[keep:]))


def _spatial_from_input(x: TL) -> int:
    return max(x.ndim - 2, 1)


@RULES.module(*POOL_MODULES, "timm.layers.pool2d_same.MaxPool2dSame", "timm.layers.pool2d_same.AvgPool2dSame")
@widening("spatial")
def pool_module(ctx, x, *args, **kwargs):
    if getattr(ctx.module, "return_indices", False):
        raise Opaque("pooling that returns indices")
    return per_channel_spatial(ctx, x, _SPATIAL_RANK.get(type(ctx.module), _spatial_from_input(x)))


_POOL_FUNCTIONS = {
    F.max_pool1d: 1, F.avg_pool1d: 1, F.adaptive_avg_pool1d: 1, F.adaptive_max_pool1d: 1,
    F.max_pool2d: 2, F.avg_pool2d: 2, F.adaptive_avg_pool2d: 2, F.adaptive_max_pool2d: 2, F.lp_pool2d: 2,
    F.max_pool3d: 3, F.avg_pool3d: 3, F.adaptive_avg_pool3d: 3, F.adaptive_max_pool3d: 3,
    torch.max_pool1d: 1, torch.avg_pool1d: 1, torch.max_pool2d: 2, torch.adaptive_avg_pool1d: 1,
}


@RULES.function(*_POOL_FUNCTIONS)
@widening("spatial")
def pool_function(ctx, input, *args, **kwargs):
    if kwargs.get("return_indices"):
        raise Opaque("pooling that returns indices")
    return per_channel_spatial(ctx, input, _POOL_FUNCTIONS[ctx.node.target])


@RULES.function(F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear)
@widening("spatial")
def resample_function(ctx, input, *args, **kwargs):
    return per_channel_spatial(ctx, input, _spatial_from_input(input))


def pad_layout(ctx, x: TL, pad) -> TL:
    """Axes with nonzero padding are pinned (new entries appear at fixed
    positions); the others pass through."""
    pad = list(pad)
    out_shape = ctx.out_shape
    lays = list(x.lays)
    for i in range(len(pad) // 2):
        axis = x.ndim - 1 - i
        if pad[2 * i] or pad[2 * i + 1]:
            ctx.pin(lays[axis])
            lays[axis] = Dim(out_shape[axis], pinned=True)
    return ctx.tl(lays)


@RULES.function(F.pad, torch.constant_pad_nd)
@widening("spatial")
def pad_function(ctx, input, pad, *args, **kwargs):
    return pad_layout(ctx, input, pad)


@RULES.module(
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
    nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad2d,
    nn.ReplicationPad3d, nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d,
)
@widening("spatial")
def pad_module(ctx, x, *args, **kwargs):
    return pad_layout(ctx, x, ctx.module.padding)


def unfold_layout(ctx, x: TL) -> TL:
    """(B, C, H, W) -> (B, C*k, L): each channel's k patch taps are contiguous."""
    out_shape = ctx.out_shape
    c = x.shape[1]
    taps = Dim(out_shape[1] // c, pinned=True)
    ctx.pin(*x.lays[2:])
    ch = product_dim(x.lays[1], [taps] * c)
    return ctx.tl((x.lays[0], ch, Dim(out_shape[2], pinned=True)))


@RULES.module(nn.Unfold)
@widening("spatial")
def unfold_module(ctx, x, *args, **kwargs):
    return unfold_layout(ctx, x)


@RULES.function(F.unfold)
@widening("spatial")
def unfold_function(ctx, input, *args, **kwargs):
    return unfold_layout(ctx, input)


def fold_layout(ctx, x: TL) -> TL:
    out_shape = ctx.out_shape
    p = as_product(x.lays[1], out_shape[1])
    if p is None:
        raise Opaque("fold input channels do not factor")
    for inner in set(p.inners):
        ctx.pin(inner)
    ctx.pin(x.lays[2])
    return ctx.tl((x.lays[0], p.outer) + tuple(Dim(s, pinned=True) for s in out_shape[2:]))


@RULES.module(nn.Fold)
@widening("spatial")
def fold_module(ctx, x, *args, **kwargs):
    return fold_layout(ctx, x)


@RULES.function(F.fold)
@widening("spatial")
def fold_function(ctx, input, *args, **kwargs):
    return fold_layout(ctx, input)
