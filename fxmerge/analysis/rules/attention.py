"""Contractions and attention: matmul, einsum, scaled_dot_product_attention,
nn.MultiheadAttention.

A contraction is invariant when both operands permute the contracted axis
alike; attention adds no other constraint. Head structure is not declared
here: it comes from the reshapes that produce q, k and v, so one head
permutation ends up shared by q, k, v and the output projection, q and k
share the within-head permutation of each head, and v shares its own with
the output projection.
"""
from __future__ import annotations

import operator
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxmerge.analysis.ir import Dim, as_product, split_dim
from .elementwise import broadcast_layouts
from fxmerge.runtime.layers import WidenedMultiheadAttention, packed_attention

from .registry import RESIZE, ROW_BLOCKS, RULES, TL, Opaque, widening


def _is_activation(t: TL) -> bool:
    return t.member is None


@RULES.function(operator.matmul, torch.matmul, torch.bmm, torch.mm)
@RULES.method("matmul", "bmm", "mm", "__matmul__")
@widening("attention")
def matmul(ctx, a, b):
    if not isinstance(a, TL) or not isinstance(b, TL):
        raise Opaque("matmul with a non-tensor operand")
    if not (_is_activation(a) and _is_activation(b)):
        return _matmul_weight(ctx, a, b)
    if a.ndim == 1 or b.ndim == 1:
        if a.ndim == 1 and b.ndim == 1:
            ctx.unify(a.lays[0], b.lays[0])
            return ctx.tl(())
        if a.ndim == 1:
            ctx.unify(a.lays[0], b.lays[-2])
            return ctx.tl(b.lays[:-2] + (b.lays[-1],))
        ctx.unify(a.lays[-1], b.lays[0])
        return ctx.tl(a.lays[:-1])
    ctx.unify(a.lays[-1], b.lays[-2])
    # the product sums over the contracted features: within a head they
    # never widen; over a widened channel axis it runs once per model view
    ctx.mixing(a.lays[-1])
    if a.ndim >= 3 and b.ndim >= 3 and _is_activation(a) and _is_activation(b):
        # activation x activation: attention scores (q k^T) or mixing (attn v)
        ctx.hint(a.lays[-1], "qk")
        ctx.hint(b.lays[-1], "v")
    out_shape = ctx.out_shape
    batch = broadcast_layouts(ctx, [TL(a.lays[:-2], a.shape[:-2]), TL(b.lays[:-2], b.shape[:-2])], out_shape[:-2])
    out = batch + (a.lays[-2], b.lays[-1])
    if _is_activation(a) and _is_activation(b):
        ctx.activation_product(out + (a.lays[-1],), tuple(out_shape) + (a.shape[-1],))
    return ctx.tl(out)


def _matmul_weight(ctx, a: TL, b: TL) -> TL:
    """``x @ W`` or ``W @ x`` with a 2-d weight: a linear map of ``x``'s
    contracted axis, recorded as a contraction (widened as row blocks)."""
    if _is_activation(b) == _is_activation(a):
        raise Opaque("matmul of two weights")
    w, x = (b, a) if _is_activation(a) else (a, b)
    if w.ndim != 2 or x.ndim < 2:
        raise Opaque("matmul with a weight of rank other than 2")
    out_shape = ctx.out_shape
    if w is b:  # x (..., n, d) @ W (d, m): W's axis 0 is the input
        ctx.unify(x.lays[-1], w.lays[0])
        ctx.contraction(w, weight_in_axis=0, input_axis=x.ndim - 1, output_axis=len(out_shape) - 1)
        return ctx.tl(x.lays[:-1] + (w.lays[1],))
    ctx.unify(w.lays[1], x.lays[-2])  # W (m, d) @ x (..., d, n)
    ctx.contraction(w, weight_in_axis=1, input_axis=x.ndim - 2, output_axis=len(out_shape) - 2)
    return ctx.tl(x.lays[:-2] + (w.lays[0], x.lays[-1]))


@RULES.function(F.scaled_dot_product_attention)
@widening("attention")
def sdpa(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    q, k, v = query, key, value
    if q.shape[:-2] != k.shape[:-2] or k.shape[:-2] != v.shape[:-2]:
        raise Opaque("attention with broadcast or grouped heads")
    for i in range(q.ndim - 2):
        ctx.unify(q.lays[i], k.lays[i])
        ctx.unify(q.lays[i], v.lays[i])
    ctx.unify(q.lays[-1], k.lays[-1])
    ctx.unify(k.lays[-2], v.lays[-2])
    ctx.mixing(q.lays[-1])  # scores sum over the query/key features: they widen only with whole heads
    ctx.hint(q.lays[-1], "qk")
    ctx.hint(v.lays[-1], "v")
    if isinstance(attn_mask, TL):
        scores = TL(q.lays[:-1] + (k.lays[-2],), q.shape[:-1] + (k.shape[-2],))
        broadcast_layouts(ctx, [scores, attn_mask], scores.shape)
    rows = q.lays[:-1] + (k.lays[-2],)
    rows_shape = tuple(q.shape[:-1]) + (k.shape[-2],)
    ctx.activation_product(rows + (q.lays[-1],), rows_shape + (q.shape[-1],), part="scores")
    ctx.activation_product(rows + (v.lays[-1],), rows_shape + (v.shape[-1],), part="values")
    return ctx.tl(q.lays[:-1] + (v.lays[-1],))


_EINSUM_TERM = re.compile(r"^[a-zA-Z.]*$")


@RULES.function(torch.einsum)
@widening("attention")
def einsum(ctx, equation, *operands):
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    if not all(isinstance(o, TL) for o in operands):
        raise Opaque("einsum with a non-tensor operand")
    if not all(_is_activation(o) for o in operands):
        raise Opaque("einsum with a weight operand")
    eq = equation.replace(" ", "")
    if "->" not in eq:
        raise Opaque("implicit einsum output")
    lhs, rhs = eq.split("->")
    terms = lhs.split(",")
    if len(terms) != len(operands) or "." in eq:
        raise Opaque("einsum with ellipsis")
    letters: dict[str, list] = {}
    for term, op in zip(terms, operands):
        if len(term) != op.ndim:
            raise Opaque("einsum term does not match operand rank")
        for ch, lay, size in zip(term, op.lays, op.shape):
            letters.setdefault(ch, []).append((lay, size))
    out = []
    for ch, entries in letters.items():
        real = [l for l, s in entries if s != 1]
        for other in real[1:]:
            ctx.unify(real[0], other)
        if ch not in rhs and real:
            ctx.mixing(real[0])  # summed over: once per model view where it widens
            if len(entries) > 1 and len(operands) > 1:
                ctx.hint(real[0], "qk")
    for ch in rhs:
        entries = letters[ch]
        real = [l for l, s in entries if s != 1]
        out.append(real[0] if real else Dim(1))
    if len(operands) > 1 and all(_is_activation(o) for o in operands):
        spans = [(next((l for l, s in e if s != 1), e[0][0]), max(s for _, s in e)) for e in letters.values()]
        ctx.activation_product([l for l, _ in spans], [s for _, s in spans])
    return ctx.tl(out)


@RULES.module(nn.MultiheadAttention)
@widening("attention")
def multihead_attention(ctx, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                        average_attn_weights=True, is_causal=False):
    m = ctx.module
    if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
        raise Opaque("MultiheadAttention with separate q/k/v projections or extra key/value bias")
    if key is not query or value is not query:
        raise Opaque("cross-attention (key or value other than the query)")
    if isinstance(attn_mask, TL) and attn_mask.ndim != 2:
        raise Opaque("per-head attention mask")
    E, H = m.embed_dim, m.num_heads
    w_in = ctx.param("in_proj_weight")
    b_in = ctx.param("in_proj_bias")
    w_out = ctx.param("out_proj.weight")
    b_out = ctx.param("out_proj.bias")
    # packed projections: [q | k | v], each heads x head_dim
    q_d, k_d, v_d = split_dim(w_in.lays[0], [E, 2 * E])
    pq, pk, pv = as_product(q_d, H), as_product(k_d, H), as_product(v_d, H)
    if pq is None or pk is None or pv is None:
        raise Opaque("packed projection does not factor into heads")
    ctx.unify(pq.outer, pk.outer)
    ctx.unify(pq.outer, pv.outer)
    for a, b in zip(pq.inners, pk.inners):
        ctx.unify(a, b)
    for i in pq.inners:
        ctx.hint(i, "qk")
    for i in pv.inners:
        ctx.hint(i, "v")
    if b_in is not None:
        ctx.unify(b_in.lays[0], w_in.lays[0])
    ctx.unify(w_out.lays[1], v_d)
    if b_out is not None:
        ctx.unify(b_out.lays[0], w_out.lays[0])
    for t in (query, key, value):
        ctx.unify(t.lays[-1], w_in.lays[1])
    # token and batch axes
    tok = 1 if (m.batch_first and query.ndim == 3) else 0
    for i in range(query.ndim - 1):
        if i != tok:
            ctx.unify(query.lays[i], key.lays[i])
    for i in range(key.ndim - 1):
        ctx.unify(key.lays[i], value.lays[i])
    out = ctx.tl(query.lays[:-1] + (w_out.lays[0],), ctx.out_shapes()[0])
    # for the cost model: the packed input and the output projection, and the
    # attention inside (scores over q's heads x head_dim, values over v's)
    ctx.contraction(w_in, weight_in_axis=1, input_axis=query.ndim - 1, output_axis=query.ndim - 1, part="in_proj",
                    taps=_in_proj_taps)
    ctx.contraction(w_out, weight_in_axis=1, input_axis=query.ndim - 1, output_axis=query.ndim - 1, part="out_proj",
                    taps=_out_proj_taps)
    # matching sees the packed q/k/v (heads and head dims) through a probe:
    # the node itself only shows the residual widths
    ctx.probe(_packed_projection, query.lays[:-1] + (w_in.lays[0],))
    rows = query.lays[:-1] + (key.lays[tok],)
    rows_shape = tuple(query.shape[:-1]) + (key.shape[tok],)
    ctx.activation_product(rows + (q_d,), rows_shape + (E,), part="scores")
    ctx.activation_product(rows + (v_d,), rows_shape + (E,), part="values")
    weights_shape = ctx.out_shapes()[1]
    if weights_shape is None:
        return (out, None)
    # attention weights are a function of tokens only (heads averaged) or
    # carry the head axis
    lays = [Dim(s, pinned=True) for s in weights_shape]
    if len(weights_shape) == query.ndim + 1:
        lays[-3] = pq.outer
    return (out, ctx.tl(lays, weights_shape))


def _packed_projection(module, query, *rest):
    """``[q | k | v]`` of a packed attention module for its query."""
    if getattr(module, "in_proj", None) is not None:
        return module.in_proj(query)
    return F.linear(query, module.in_proj_weight, module.in_proj_bias)


def _in_proj_taps(module, query, *rest, output, **kwargs):
    """Input and output of the packed q/k/v projection."""
    return query, _packed_projection(module, query)


def _out_proj_taps(module, query, key=None, value=None, key_padding_mask=None, need_weights=True, attn_mask=None,
                   average_attn_weights=True, is_causal=False, *, output):
    """Input and output of the output projection: the heads' attention
    context, computed with the node's masks, and the node's output."""
    context = packed_attention(module, query, key_padding_mask, attn_mask, is_causal)
    return context, (output[0] if isinstance(output, (tuple, list)) else output) if output is not None else None


@ROW_BLOCKS.register(WidenedMultiheadAttention)
def packed_row_blocks(m):
    """A module with packed projections splits its own."""
    return None, 1


@RESIZE.register(nn.MultiheadAttention)
def resize_multihead_attention(m, old_shapes):
    """A widened packed attention cannot stay an ``nn.MultiheadAttention``
    (its input width must equal heads x head_dim): it becomes a
    ``WidenedMultiheadAttention`` with the same parameters."""
    head_dim = old_shapes["in_proj_weight"][0] // 3 // m.num_heads
    m.out_proj.out_features, m.out_proj.in_features = m.out_proj.weight.shape
    return WidenedMultiheadAttention(m, head_dim)
