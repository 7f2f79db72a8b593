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


def _rearranged(ctx, x, channel_axis: int):
    """Windows or blocks put back on the image grid (or the reverse): the
    channel axis passes through, every other axis is a new arrangement of
    the spatial positions, which never widen."""
    out = ctx.out_shape
    ctx.pin(*(lay for i, lay in enumerate(x.lays) if i != x.axis(channel_axis)))
    axis = channel_axis % len(out)
    return ctx.tl(tuple(x.lays[channel_axis] if i == axis else Dim(s, pinned=True) for i, s in enumerate(out)))


@RULES.function(*(f"timm.models.{m}.window_reverse" for m in ("swin_transformer", "swin_transformer_v2",
                                                                  "swin_transformer_v2_cr", "davit", "gcvit",
                                                                  "maxxvit")),
                "timm.models.maxxvit.grid_reverse", "timm.models.nest.deblockify")
@widening("spatial")
def channels_last_rearrangement(ctx, x, *args, **kwargs):
    return _rearranged(ctx, x, -1)


@RULES.function("timm.models.maxxvit.window_reverse_nchw", "timm.models.maxxvit.grid_reverse_nchw")
@widening("spatial")
def channels_first_rearrangement(ctx, x, *args, **kwargs):
    return _rearranged(ctx, x, 1)


@RULES.function(*(_fn(name, "pos_embed_sincos") for name in ("_build_grid", "get_mixed_grid", "make_coords_dinov3",
                                                              "_apply_coord_augs")))
@widening("spatial")
def position_grid(ctx, *args, **kwargs):
    """Coordinates of the token grid (rotary position embeddings), built
    from sizes: no channels, every axis a position."""
    if ctx.out_value is None:
        return None
    return ctx.fresh(pinned=True)
