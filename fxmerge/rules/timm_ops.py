"""Rules for functions timm registers as no-trace (opaque under fx)."""
from __future__ import annotations

from .elementwise import broadcast
from .registry import RULES, TL, widening

try:
    from timm.layers import attention as _timm_attention
except Exception:  # pragma: no cover - timm missing or without these helpers
    _timm_attention = None


def _fn(name):
    return getattr(_timm_attention, name, None) if _timm_attention is not None else None


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
