"""Rules for functions timm registers as no-trace (opaque under fx)."""
from __future__ import annotations

from .elementwise import broadcast
from fxmerge.analysis.ir import Dim
from .registry import RULES, TL, widening


def _fn(name, module="attention"):
    """A timm function by qualified name: timm is not imported for this."""
    return f"timm.layers.{module}.{name}"


@RULES.function(_fn("maybe_add_mask"))
@widening("elementwise")
def maybe_add_mask(ctx, scores, attn_mask=None):
    # scores + mask when a mask is given, else scores unchanged
    if isinstance(attn_mask, TL):
        return broadcast(ctx, scores, attn_mask)
    return ctx.like(scores)


@RULES.function(_fn("resolve_self_attn_mask"))
@widening("layout")
def resolve_self_attn_mask(ctx, *args, **kwargs):
    # Builds the additive mask (from tokens only) or returns None.
    if ctx.out_value is None:
        return None
    return ctx.fresh(pinned=True)


@RULES.function(_fn("resample_abs_pos_embed", "pos_embed"))
@widening("spatial")
def resample_abs_pos_embed(ctx, posemb, *args, **kwargs):
    """Position embeddings resized to another grid (dynamic-size ViTs): each
    channel is interpolated over the token grid on its own; the channels
    pass through, the tokens are new positions."""
    out = ctx.out_shape
    ctx.pin(*posemb.lays[:-1])
    return ctx.tl(tuple(Dim(s, pinned=True) for s in out[:-1]) + (posemb.lays[-1],))


@RULES.function(_fn("resample_abs_pos_embed_nhwc", "pos_embed"))
@widening("spatial")
def resample_abs_pos_embed_nhwc(ctx, posemb, *args, **kwargs):
    out = ctx.out_shape
    ctx.pin(*posemb.lays[:-1])
    return ctx.tl(tuple(Dim(s, pinned=True) for s in out[:-1]) + (posemb.lays[-1],))
