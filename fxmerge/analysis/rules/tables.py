"""Rules for tensors no channel flows into: new tensors of given sizes,
constants shaped like an input, and tables written in place."""
from __future__ import annotations

import operator

import torch

from fxmerge.analysis.ir import is_pinned
from .registry import RULES, Opaque, tensors_in, widening


@RULES.method("new_zeros", "new_ones", "new_full", "new_empty", "new_tensor")
@widening("layout")
def new_tensor(ctx, x, *args, **kwargs):
    """A new tensor of given sizes on the input's device: nothing of the
    input flows into it (an attention mask built next to the features)."""
    return ctx.fresh(pinned=True)


@RULES.function(torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like)
@widening("elementwise")
def constant_like(ctx, x, *args, **kwargs):
    """A constant of the input's shape: its axes are the input's (a widened
    input gives a widened constant), none of its values are."""
    return ctx.like(x)


@RULES.function(operator.setitem)
@widening("layout")
def set_entries(ctx, target, key, value):
    """Entries written in place into a table no channel of the model flows
    through (relative position indices, an attention mask): nothing to
    permute. Writing into features is opaque."""
    for tl in tensors_in((target, key, value)):
        if not all(is_pinned(lay) for lay in tl.lays):
            raise Opaque("writes into part of a tensor that carries channels")
    return None
