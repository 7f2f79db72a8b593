"""Elementwise ops: every axis of the output is the matching (broadcast) axis
of the inputs."""
from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxmerge.analysis.ir import Dep, Dim
from .registry import RULES, TL, Opaque, tensors_in, widening

_tv_stochastic_depth = "torchvision.ops.stochastic_depth.stochastic_depth"  # by name: torchvision loads lazily

UNARY_MODULES = (
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardsigmoid, nn.Hardswish,
    nn.Hardtanh, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.LogSigmoid, nn.Hardshrink, nn.Softshrink, nn.Threshold, nn.RReLU, nn.FeatureAlphaDropout,
)

UNARY_FUNCTIONS = [
    F.relu, F.relu6, F.gelu, F.silu, F.sigmoid, F.tanh, F.hardsigmoid, F.hardswish, F.hardtanh,
    F.leaky_relu, F.elu, F.selu, F.celu, F.mish, F.softplus, F.softsign, F.logsigmoid,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
    F.relu_, F.elu_, F.leaky_relu_, F.hardtanh_, F.hardshrink, F.softshrink, F.threshold, F.rrelu,
    F.feature_alpha_dropout,
    torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.exp, torch.log, torch.sqrt, torch.rsqrt,
    torch.abs, torch.neg, torch.square, torch.sin, torch.cos, torch.erf, torch.clamp, torch.clip,
    torch.reciprocal, torch.sign, torch.floor, torch.ceil, torch.round,
    torch.detach, torch.clone, torch.nan_to_num,
    operator.neg, operator.pos, operator.abs, operator.invert, torch.logical_not, torch.bitwise_not,
    _tv_stochastic_depth,
]

UNARY_METHODS = [
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "exp_", "log", "sqrt", "rsqrt",
    "abs", "neg", "square", "sin", "cos", "erf", "clamp", "clamp_", "clamp_min", "clamp_max", "clip",
    "float", "half", "double", "bfloat16", "to", "type", "type_as", "contiguous", "clone", "detach",
    "cpu", "cuda", "requires_grad_", "sign", "floor", "ceil", "round", "long", "int", "bool", "logical_not",
    "reciprocal", "nan_to_num", "gelu", "silu", "hardswish", "hardsigmoid", "sigmoid", "mish",
]

BINARY_FUNCTIONS = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow,
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.mod,
    operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.divide,
    torch.true_divide, torch.pow, torch.maximum, torch.minimum, torch.where, torch.addcmul,
    torch.addcdiv, torch.lerp, torch.eq, torch.ne, torch.gt, torch.lt, torch.ge, torch.le,
    torch.masked_fill, torch.fmod, torch.remainder,
]

BINARY_METHODS = [
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow", "pow_", "maximum", "minimum",
    "where", "addcmul", "addcmul_", "addcdiv", "lerp", "masked_fill", "masked_fill_", "eq", "ne",
    "gt", "lt", "ge", "le", "fmod", "remainder", "true_divide", "__add__", "__mul__", "__radd__", "__rmul__",
]

ADD_OPS = {operator.add, operator.iadd, torch.add, "add", "add_"}


@RULES.module(*UNARY_MODULES)
@RULES.function(*[f for f in UNARY_FUNCTIONS if f is not None])
@RULES.method(*UNARY_METHODS)
@widening("elementwise")
def unary(ctx, x, *args, **kwargs):
    if not isinstance(x, TL):
        raise Opaque("first argument is not a tensor")
    if any(isinstance(t, TL) for t in tensors_in((args, kwargs))) and ctx.node.target not in ("type_as", "to"):
        # e.g. clamp(x, min=tensor): a broadcasting op after all
        return broadcast(ctx, x, *args, **kwargs)
    return ctx.like(x)


def broadcast_layouts(ctx, operands, out_shape):
    """Unify the axes of broadcasting operands (aligned from the right) and
    return the output's layouts."""
    nd = len(out_shape)
    lays = []
    for k in range(nd):
        size = out_shape[nd - 1 - k]
        axis_lays = []
        for t in operands:
            if k < t.ndim and t.shape[t.ndim - 1 - k] == size and size != 1:
                axis_lays.append(t.lays[t.ndim - 1 - k])
            elif k < t.ndim and t.shape[t.ndim - 1 - k] == 1 and size != 1:
                # a one-channel segment of a channel axis broadcast across
                # another axis (FocalNet's gates[:, l:l + 1]): widened, it
                # would hold one entry per model and no longer broadcast, so
                # the product runs once per model view (pinned size-1 axes need no record)
                ctx.mixing(t.lays[t.ndim - 1 - k])
        if not axis_lays:
            if size != 1:
                # every operand broadcasts along this axis (size-1 to size n)
                axis_lays = [Dim(size)]
            else:
                axis_lays = [Dim(1)]
        for other in axis_lays[1:]:
            ctx.unify(axis_lays[0], other)
        lays.append(axis_lays[0])
    return tuple(reversed(lays))


@RULES.function(*BINARY_FUNCTIONS)
@RULES.method(*BINARY_METHODS)
@widening("elementwise")
def broadcast(ctx, *args, **kwargs):
    operands = tensors_in((args, kwargs))
    if not operands:
        raise Opaque("no tensor operand")
    out_shape = ctx.out_shape
    lays = broadcast_layouts(ctx, operands, out_shape)
    target = ctx.node.target
    full = [t for t in operands if t.shape == out_shape]
    if target in ADD_OPS and len(full) >= 2:
        # two full-size tensors summed: a residual join
        for lay in lays:
            ctx.hint(lay, "residual")
    return ctx.tl(lays)


# ops shaped like their input that combine the entries along one axis
ALONG_AXIS_MODULES = (nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Softmax2d)
ALONG_AXIS_FUNCTIONS = [F.softmax, F.log_softmax, F.softmin, F.normalize, torch.softmax, torch.log_softmax]
ALONG_AXIS_METHODS = ["softmax", "log_softmax"]


def _along_axis_dim(ctx, x: TL, args, kwargs):
    if ctx.module is not None:
        if isinstance(ctx.module, nn.Softmax2d):
            return -3
        return ctx.module.dim if ctx.module.dim is not None else (0 if x.ndim in (0, 1, 3) else 1)
    target = ctx.node.target
    if target is F.normalize:
        return kwargs.get("dim", args[1] if len(args) > 1 else 1)
    dim = kwargs.get("dim", args[0] if args else None)
    if dim is None:  # the legacy implicit dim of F.softmax
        return 0 if x.ndim in (0, 1, 3) else 1
    return dim


@RULES.module(*ALONG_AXIS_MODULES)
@RULES.function(*ALONG_AXIS_FUNCTIONS)
@RULES.method(*ALONG_AXIS_METHODS)
@widening("mixes")
def along_axis(ctx, x, *args, **kwargs):
    """softmax, log_softmax, softmin, normalize: the output is shaped like
    the input and each entry is permuted with its input, but the values mix
    every entry along ``dim``."""
    if not isinstance(x, TL):
        raise Opaque("first argument is not a tensor")
    dim = _along_axis_dim(ctx, x, args, kwargs)
    ctx.mixing(x.lays[dim % x.ndim])
    return ctx.like(x)


@RULES.module(nn.PReLU)
@widening("elementwise")
def prelu(ctx, x, *args, **kwargs):
    """A learned slope per channel (axis 1), or one shared by all."""
    w = ctx.param("weight")
    if w is not None and w.shape[0] > 1:
        ctx.unify(w.lays[0], x.lays[1])
    return ctx.like(x)


@RULES.module(nn.GLU)
@RULES.function(F.glu)
@widening("elementwise")
def glu(ctx, x, *args, **kwargs):
    """``a * sigmoid(b)`` for the two halves of ``dim``: the halves permute
    alike and the output is one half."""
    dim = ctx.module.dim if ctx.module is not None else kwargs.get("dim", args[0] if args else -1)
    d = dim % x.ndim
    half = x.shape[d] // 2
    from fxmerge.analysis.ir import split_dim

    a, b = split_dim(x.lays[d], [half]) if not isinstance(x.lays[d], Dep) else (None, None)
    if a is None:
        raise Opaque("GLU over a dependent axis")
    ctx.unify(a, b)
    lays = list(x.lays)
    lays[d] = a
    return ctx.tl(lays)
