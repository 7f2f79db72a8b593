"""Normalisation layers. Statistics over a set of axes are symmetric in those
axes, so normalisation is permutation-equivariant; its affine parameters and
running statistics join the channel's group."""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from fxmerge.analysis.ir import as_product
from .elementwise import UNARY_MODULES
from fxmerge.runtime.layers import SplitLayerNorm
from fxmerge.runtime.tensors import replace_module

from .registry import RESIZE, RULES, SPLIT_NORM, TL, Opaque, widening


def _per_channel(ctx, x: TL, axis: int, *stats) -> TL:
    for s in stats:
        if s is not None:
            ctx.unify(s.lays[0], x.lays[axis])
    # the statistics run over every other axis: batch and positions for
    # activations, but the input channels of a weight standardised this way
    for i, lay in enumerate(x.lays):
        if i != axis:
            ctx.mixing(lay)
    return ctx.like(x)


@RULES.module(
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
)
@widening("per_channel")
def batch_norm_module(ctx, x, *args, **kwargs):
    return _per_channel(ctx, x, 1, *(ctx.param(n) for n in ("weight", "bias", "running_mean", "running_var")))


@RULES.function(F.batch_norm)
@widening("per_channel")
def batch_norm_function(ctx, input, running_mean=None, running_var=None, weight=None, bias=None, *args, **kwargs):
    return _per_channel(ctx, input, 1, running_mean, running_var, weight, bias)


@RULES.function(F.instance_norm)
@widening("per_channel")
def instance_norm_function(ctx, input, running_mean=None, running_var=None, weight=None, bias=None, *args, **kwargs):
    return _per_channel(ctx, input, 1, running_mean, running_var, weight, bias)


def _trailing(ctx, x: TL, k: int, *params, rms: bool = False) -> TL:
    ctx.normalization(k, rms=rms)
    for p in params:
        if p is not None:
            for i in range(1, k + 1):
                if p.ndim >= i:
                    ctx.unify(p.lays[-i], x.lays[-i])
    return ctx.like(x)


@RULES.module(nn.LayerNorm, nn.RMSNorm)
@widening("normalizes")
def layer_norm_module(ctx, x, *args, **kwargs):
    k = len(ctx.module.normalized_shape)
    return _trailing(ctx, x, k, ctx.param("weight"), ctx.param("bias"), rms=isinstance(ctx.module, nn.RMSNorm))


@RULES.function(F.layer_norm)
@widening("normalizes")
def layer_norm_function(ctx, input, normalized_shape, weight=None, bias=None, eps=1e-5):
    return _trailing(ctx, input, len(normalized_shape), weight, bias)


@RULES.function(getattr(F, "rms_norm", None))
@widening("normalizes")
def rms_norm_function(ctx, input, normalized_shape, weight=None, eps=None):
    return _trailing(ctx, input, len(normalized_shape), weight, rms=True)


def group_norm_layout(ctx, x: TL, groups: int, *params) -> TL:
    """Channels form ``groups`` blocks normalised together: blocks permute as
    wholes, channels permute within their block."""
    c = x.shape[1]
    if 1 < groups < c:
        if as_product(x.lays[1], groups) is None:
            raise Opaque("channel layout does not factor into the norm's groups")
    elif groups == 1 and c > 1:
        ctx.mixing(x.lays[1])  # one group: statistics over every channel
    return _per_channel(ctx, x, 1, *params)


@RULES.module(nn.GroupNorm)
@widening("per_channel")
def group_norm_module(ctx, x, *args, **kwargs):
    return group_norm_layout(ctx, x, ctx.module.num_groups, ctx.param("weight"), ctx.param("bias"))


@RULES.function(F.group_norm)
@widening("per_channel")
def group_norm_function(ctx, input, num_groups, weight=None, bias=None, eps=1e-5):
    return group_norm_layout(ctx, input, num_groups, weight, bias)


# -- timm norm + activation leaves -----------------------------------------


def _elementwise_children(ctx) -> None:
    for name in ("drop", "act"):
        child = getattr(ctx.module, name, None)
        if child is not None and not isinstance(child, UNARY_MODULES):
            raise Opaque(f"'{name}' is {type(child).__name__}, not a known elementwise module")


@RULES.module(
    "timm.layers.norm_act.BatchNormAct2d",
    "timm.layers.norm_act.SyncBatchNormAct",
    "timm.layers.norm_act.FrozenBatchNormAct2d",
)
@widening("per_channel")
def batch_norm_act(ctx, x, *args, **kwargs):
    _elementwise_children(ctx)
    return batch_norm_module(ctx, x)


@RULES.module("timm.layers.norm_act.GroupNormAct", "timm.layers.norm_act.GroupNorm1Act")
@widening("per_channel")
def group_norm_act(ctx, x, *args, **kwargs):
    _elementwise_children(ctx)
    return group_norm_layout(ctx, x, ctx.module.num_groups, ctx.param("weight"), ctx.param("bias"))


@RULES.module("timm.layers.norm_act.LayerNormAct")
@widening("normalizes")
def layer_norm_act(ctx, x, *args, **kwargs):
    _elementwise_children(ctx)
    return layer_norm_module(ctx, x)


@RESIZE.register(nn.modules.batchnorm._NormBase)
def resize_batch_norm(m, old_shapes):
    for name in ("weight", "running_mean"):
        t = getattr(m, name, None)
        if t is not None:
            m.num_features = t.shape[0]
            return


@RESIZE.register(nn.LayerNorm, nn.RMSNorm)
def resize_layer_norm(m, old_shapes):
    if getattr(m, "weight", None) is not None:
        m.normalized_shape = tuple(m.weight.shape)


@RESIZE.register(nn.GroupNorm)
def resize_group_norm(m, old_shapes):
    if getattr(m, "weight", None) is not None:
        old = old_shapes["weight"][0]
        m.num_groups = m.num_groups * m.weight.shape[0] // old
        m.num_channels = m.weight.shape[0]


def _split_module(gm, node, norm, roles, calls) -> None:
    """A LayerNorm/RMSNorm module with per-model statistics: replaced where
    one node calls it; where several do, each call gets its own split,
    reading the module's affine parameters."""
    mod = gm.get_submodule(node.target)
    if calls[node.target] == 1:
        replace_module(gm, node.target, SplitLayerNorm(roles, mod.eps, norm.rms, getattr(mod, "weight", None),
                                                       getattr(mod, "bias", None)))
        return
    target = f"fxm_split_{node.name}"
    gm.add_submodule(target, SplitLayerNorm(roles, mod.eps, norm.rms))
    with gm.graph.inserting_before(node):
        params = [gm.graph.get_attr(f"{node.target}.{p}") if getattr(mod, p, None) is not None else None
                  for p in ("weight", "bias")]
    node.op, node.target = "call_module", target
    node.args = (node.args[0], *params)
    node.kwargs = {}


# modules whose forward is the plain op (a subclass may normalise otherwise)
_split_module.applies = lambda m: type(m).forward in (nn.LayerNorm.forward, nn.RMSNorm.forward, SplitLayerNorm.forward)
SPLIT_NORM.register(nn.LayerNorm, nn.RMSNorm, SplitLayerNorm)(_split_module)


@SPLIT_NORM.register(*[f for f in (F.layer_norm, getattr(F, "rms_norm", None)) if f is not None])
def split_function(gm, node, norm, roles, calls) -> None:
    """``F.layer_norm(input, normalized_shape, weight, bias, eps)`` /
    ``F.rms_norm(input, shape, weight, eps)`` as a ``SplitLayerNorm`` call."""
    names = ["input", "normalized_shape", "weight"] + ([] if norm.rms else ["bias"]) + ["eps"]
    bound = dict(zip(names, node.args))
    bound.update(node.kwargs)
    eps = bound.get("eps", None if norm.rms else 1e-5)
    target = f"fxm_split_{node.name}"
    gm.add_submodule(target, SplitLayerNorm(roles, eps, norm.rms))
    node.op, node.target = "call_module", target
    node.args = (bound["input"], bound.get("weight"), bound.get("bias"))
    node.kwargs = {}
