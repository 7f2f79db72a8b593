"""Weighted layers: linear and convolution (grouped and depthwise included)."""
from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxmerge.analysis.ir import Dim, Dep, as_product, find, make_dep
from fxmerge.runtime.layers import PartialConv, PartialLinear

from .registry import LEAST_SQUARES, RESIZE, ROW_BLOCKS, RULES, TL, Opaque, widening


def linear_layout(ctx, x: TL, w: TL, b: TL | None) -> TL:
    ctx.unify(x.lays[-1], w.lays[1])
    ctx.contraction(w, weight_in_axis=1, input_axis=x.ndim - 1, output_axis=len(ctx.out_shape) - 1)
    if b is not None:
        ctx.unify(b.lays[0], w.lays[0])
    return ctx.tl(x.lays[:-1] + (w.lays[0],))


@RULES.module(nn.Linear, "timm.layers.linear.Linear")
@widening("contraction")
def linear_module(ctx, x, *args, **kwargs):
    return linear_layout(ctx, x, ctx.param("weight"), ctx.param("bias"))


@RULES.function(F.linear)
@widening("contraction")
def linear_function(ctx, input, weight, bias=None):
    return linear_layout(ctx, input, weight, bias)


def conv_layout(ctx, x: TL, w: TL, b: TL | None, groups: int, *, transposed: bool = False) -> TL:
    """Channel semantics of a convolution. Spatial axes are pinned (the kernel
    reads neighbours). With ``groups > 1`` channels form ``groups`` blocks that
    permute as wholes, each with its own within-block permutation."""
    spatial = w.ndim - 2
    ca = x.ndim - 1 - spatial  # channel axis of the input (batched or not)
    out_shape = ctx.out_shape
    in_axis, out_axis = (0, 1) if transposed else (1, 0)
    for i in range(spatial):
        ctx.pin(x.lays[ca + 1 + i], w.lays[2 + i])
    out_spatial = tuple(Dim(s, pinned=True) for s in out_shape[ca + 1:])
    if groups == 1:
        ctx.unify(x.lays[ca], w.lays[in_axis])
        out_ch = w.lays[out_axis]
    else:
        if transposed:
            raise Opaque("grouped transposed convolution")
        cin, cout = x.shape[ca], w.shape[0]
        if cin == groups and cout == groups:  # depthwise: channels map one to one
            ctx.unify(x.lays[ca], w.lays[0])
        else:
            p_out = as_product(_dim(w.lays[0]), groups)
            if p_out is None:
                raise Opaque("output channels do not factor into the convolution's groups")
            if cin == groups:  # depthwise with a channel multiplier
                ctx.unify(x.lays[ca], p_out.outer)
            else:
                p_in = as_product(_dim(x.lays[ca]), groups)
                if p_in is None:
                    raise Opaque("input channels do not factor into the convolution's groups")
                if find(p_in.outer).pinned and len({find(i).uid for i in p_in.inners}) > 1:
                    # the groups cut through a concatenation: each block of
                    # weights reads differently structured inputs, which the
                    # output axis cannot index once it is unified with them
                    raise Opaque("groups cut through a concatenation of its inputs")
                ctx.unify(p_in.outer, p_out.outer)
                # weight axis 1 of output block g reads the inputs of block g
                ctx.set_member_axis(w, 1, make_dep(p_out.outer, p_in.inners))
        out_ch = w.lays[0]
    if b is not None:
        ctx.unify(b.lays[0], out_ch)
    ctx.contraction(w, weight_in_axis=in_axis, input_axis=ca, output_axis=ca, groups=groups)
    return ctx.tl(x.lays[:ca] + (out_ch,) + out_spatial)


def _dim(lay):
    if isinstance(lay, Dep):
        raise Opaque("convolution over a dependent channel axis")
    return lay


@RULES.module(
    nn.Conv1d, nn.Conv2d, nn.Conv3d,
    "timm.layers.conv2d_same.Conv2dSame",
    "timm.layers.std_conv.StdConv2d", "timm.layers.std_conv.StdConv2dSame",
    "timm.layers.std_conv.ScaledStdConv2d", "timm.layers.std_conv.ScaledStdConv2dSame",
)
@widening("contraction")
def conv_module(ctx, x, *args, **kwargs):
    # Weight standardisation (StdConv) normalises each output filter over all
    # of its inputs: symmetric in the input channels, so the rule is the same
    # for permutations, but a widened input would be standardised over both
    # models' weights at once: where they widen, it runs once per model view.
    m = ctx.module
    w = ctx.param("weight")
    out = conv_layout(ctx, x, w, ctx.param("bias"), m.groups)
    if "std_conv" in type(m).__module__:
        ctx.mixing(x.lays[x.ndim - 1 - (w.ndim - 2)])
    gain = ctx.param("gain")
    if gain is not None:
        ctx.unify(gain.lays[0], w.lays[0])
    return out


@RULES.module(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
@widening("contraction")
def conv_transpose_module(ctx, x, *args, **kwargs):
    return conv_layout(ctx, x, ctx.param("weight"), ctx.param("bias"), ctx.module.groups, transposed=True)


@RULES.function(F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d)
@widening("contraction")
def conv_function(ctx, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return conv_layout(ctx, input, weight, bias, groups)


@RESIZE.register(nn.Linear)
def resize_linear(m, old_shapes):
    m.out_features, m.in_features = m.weight.shape


@RESIZE.register(nn.modules.conv._ConvNd)
def resize_conv(m, old_shapes):
    # The per-group widths never change (blocks are merged or kept whole), so
    # the number of groups grows with the channels.
    w = m.weight
    if m.transposed:
        per_group_out = w.shape[1]
        m.in_channels = w.shape[0]
        if m.groups > 1:
            m.groups = m.groups * m.in_channels // old_shapes["weight"][0]
        m.out_channels = per_group_out * m.groups
    else:
        m.out_channels = w.shape[0]
        if m.groups > 1:
            m.groups = m.groups * m.out_channels // old_shapes["weight"][0]
        m.in_channels = w.shape[1] * m.groups


CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@ROW_BLOCKS.register(*CONVS)
def conv_row_blocks(m):
    # subclasses may compute something else in forward (timm's same-padding convolutions)
    return (PartialConv, 0 if m.transposed else 1) if type(m) in CONVS else None


@ROW_BLOCKS.register(nn.Linear)
def linear_row_blocks(m):
    return (PartialLinear, 1) if type(m).forward is nn.Linear.forward else None


_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
ROW_BLOCKS.register(F.linear)(("linear", ("input", "weight", "bias")))
ROW_BLOCKS.register(F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d)(("conv", _CONV_ARGS))
ROW_BLOCKS.register(operator.matmul, torch.matmul)(("matmul", ("input", "weight")))


@LEAST_SQUARES.register(nn.Linear)
def linear_least_squares(m) -> bool:
    return type(m).forward is nn.Linear.forward or type(m).__module__.startswith("timm.layers.linear")


@LEAST_SQUARES.register(nn.Conv2d)
def conv_least_squares(m) -> bool:
    return type(m) is nn.Conv2d and m.padding_mode == "zeros"


@LEAST_SQUARES.register(nn.ConvTranspose2d)
def transposed_conv_least_squares(m) -> bool:
    return type(m) is nn.ConvTranspose2d and m.padding_mode == "zeros" and m.groups == 1
