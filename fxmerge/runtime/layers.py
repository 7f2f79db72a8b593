"""Modules the rewrite emits.

``PartialConv`` and ``PartialLinear`` compute a widened contraction as row
blocks, each an ordinary ``nn.Conv2d`` / ``nn.Linear`` that reads only the
input channels it may read. The structurally-zero blocks of the merged weight
(A-only outputs x B-only inputs and the reverse) are neither stored nor
computed, so the layer's real cost is the planned one. With the usual layout
``[A-only | merged | B-only]`` every block reads a contiguous slice and the
outputs concatenate in order; other layouts gather by index.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import copy

import torch
import torch.nn as nn


def _as_slice(idx: np.ndarray) -> Optional[tuple]:
    if len(idx) and np.array_equal(idx, np.arange(idx[0], idx[0] + len(idx))):
        return int(idx[0]), int(len(idx))
    return None


def _copy_rows(part: nn.Module, dense: nn.Module, in_idx, out_idx) -> nn.Module:
    """Fill ``part`` with the rows ``out_idx`` and input columns ``in_idx`` of
    ``dense``'s weight (and those rows of its bias)."""
    ii, oi = torch.as_tensor(np.asarray(in_idx)), torch.as_tensor(np.asarray(out_idx))
    with torch.no_grad():
        part.weight.copy_(dense.weight[oi][:, ii])
        if dense.bias is not None:
            part.bias.copy_(dense.bias[oi])
    return part


class _RowBlocks(nn.Module):
    channel_axis = -1

    def _setup(self, parts: Sequence[nn.Module], in_index: Sequence[np.ndarray], out_index: Sequence[np.ndarray], n_in: int):
        self.parts = nn.ModuleList(parts)
        self.n_in = n_in
        self._slices = []
        for i, idx in enumerate(in_index):
            sl = _as_slice(np.asarray(idx))
            self._slices.append(sl if sl is None or sl != (0, n_in) else "all")
            self.register_buffer(f"in_index_{i}", torch.as_tensor(np.asarray(idx), dtype=torch.long), persistent=False)
        order = np.concatenate([np.asarray(o) for o in out_index])
        inverse = np.argsort(order)
        self.reorder = not np.array_equal(inverse, np.arange(len(inverse)))
        self.register_buffer("out_order", torch.as_tensor(inverse, dtype=torch.long), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        """The dense widened weight, zero where a row reads none of a block's
        inputs: what the layer computes, for code that reads ``.weight`` (a
        model that takes its dtype and device from a layer's weight)."""
        if not len(self.parts):
            raise AttributeError(f"{type(self).__name__} slices its weight from an input: it holds none")
        first = self.parts[0].weight
        out_axis, in_axis = (1, 0) if getattr(self, "transposed", False) else (0, 1)
        rows = torch.argsort(self.out_order)  # concatenated row -> its place
        shape = list(first.shape)
        shape[out_axis], shape[in_axis] = len(rows), self.n_in
        dense = first.new_zeros(shape)
        start = 0
        for i, part in enumerate(self.parts):
            n = part.weight.shape[out_axis]
            block = dense.index_select(out_axis, rows[start:start + n])
            block.index_copy_(in_axis, getattr(self, f"in_index_{i}"), part.weight)
            dense.index_copy_(out_axis, rows[start:start + n], block)
            start += n
        return dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = self.channel_axis if self.channel_axis >= 0 else x.ndim + self.channel_axis
        outs = []
        for i, part in enumerate(self.parts):
            sl = self._slices[i]
            if sl == "all":
                xi = x
            elif sl is not None:
                xi = x.narrow(axis, sl[0], sl[1])
            else:
                xi = x.index_select(axis, getattr(self, f"in_index_{i}"))
            outs.append(part(xi))
        y = torch.cat(outs, dim=axis) if len(outs) > 1 else outs[0]
        if self.reorder:
            y = y.index_select(axis, self.out_order)
        return y


class PartialConv(_RowBlocks):
    """A widened convolution (1-3 spatial dims, plain or transposed) computed
    as row blocks over input-channel subsets: each part is a copy of the
    convolution restricted to its rows and the input channels they read."""

    def __init__(self, conv: nn.modules.conv._ConvNd, in_index, out_index):
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding, self.dilation = conv.kernel_size, conv.stride, conv.padding, conv.dilation
        self.transposed = conv.transposed
        self.channel_axis = -(len(conv.kernel_size) + 1)
        parts = []
        for ii, oi in zip(in_index, out_index):
            part = copy.deepcopy(conv)
            part.in_channels, part.out_channels = len(ii), len(oi)
            ii_t, oi_t = torch.as_tensor(np.asarray(ii)), torch.as_tensor(np.asarray(oi))
            with torch.no_grad():
                w = conv.weight[ii_t][:, oi_t] if conv.transposed else conv.weight[oi_t][:, ii_t]
                part.weight = nn.Parameter(w.clone(), requires_grad=conv.weight.requires_grad)
                if conv.bias is not None:
                    part.bias = nn.Parameter(conv.bias[oi_t].clone(), requires_grad=conv.bias.requires_grad)
            parts.append(part)
        self._setup(parts, in_index, out_index, conv.in_channels)


class PartialLinear(_RowBlocks):
    """A widened ``Linear`` computed as row blocks over input-feature subsets."""

    channel_axis = -1

    def __init__(self, linear: nn.Linear, in_index, out_index):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        parts = [
            _copy_rows(nn.Linear(len(ii), len(oi), bias=linear.bias is not None,
                                 device=linear.weight.device, dtype=linear.weight.dtype), linear, ii, oi)
            for ii, oi in zip(in_index, out_index)
        ]
        self._setup(parts, in_index, out_index, linear.in_features)


class PartialFunctional(_RowBlocks):
    """A functional contraction over a widened weight (``F.linear``,
    ``F.conv1d/2d/3d``, or ``x @ W``) as row blocks. The weight is an input,
    not a parameter (the graph may compute it, as a standardised
    convolution weight does), so each block slices it at run time."""

    def __init__(self, op: str, in_index, out_index, n_in: int, channel_axis: int, **op_kwargs):
        super().__init__()
        if op not in ("linear", "conv", "matmul"):
            raise ValueError(f"unknown functional contraction '{op}'")
        self.op = op
        self.channel_axis = channel_axis
        self.op_kwargs = op_kwargs
        self._setup([], in_index, out_index, n_in)
        for i, idx in enumerate(out_index):
            self.register_buffer(f"out_index_{i}", torch.as_tensor(np.asarray(idx), dtype=torch.long), persistent=False)
        self.n_blocks = len(in_index)

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        axis = self.channel_axis if self.channel_axis >= 0 else x.ndim + self.channel_axis
        outs = []
        for i in range(self.n_blocks):
            ii, oi = getattr(self, f"in_index_{i}"), getattr(self, f"out_index_{i}")
            sl = self._slices[i]
            xi = x if sl == "all" else (x.narrow(axis, sl[0], sl[1]) if sl is not None else x.index_select(axis, ii))
            if self.op == "matmul":  # x @ W, W: (in, out)
                outs.append(xi @ weight.index_select(1, oi).index_select(0, ii))
                continue
            w = weight.index_select(0, oi).index_select(1, ii)
            b = bias.index_select(0, oi) if bias is not None else None
            if self.op == "linear":
                outs.append(torch.nn.functional.linear(xi, w, b))
            else:
                conv = {3: torch.nn.functional.conv1d, 4: torch.nn.functional.conv2d, 5: torch.nn.functional.conv3d}[w.ndim]
                outs.append(conv(xi, w, b, **self.op_kwargs))
        y = torch.cat(outs, dim=axis) if len(outs) > 1 else outs[0]
        if self.reorder:
            y = y.index_select(axis, self.out_order)
        return y


class SplitLayerNorm(nn.Module):
    """LayerNorm (or RMSNorm) over a widened feature axis whose statistics are
    taken per source model.

    Model A's view of the axis is every feature that carries A (A-only and
    merged), every other model's likewise. Each view is normalised on its
    own, as its model would; a merged feature takes the mean of its models'
    normalised values.
    With nothing merged this is exactly both models' LayerNorms side by side;
    with everything merged it is the plain LayerNorm. The affine parameters,
    if any, are applied to the whole widened axis afterwards (owned here, or
    passed to ``forward`` when the graph computed them).
    """

    def __init__(self, role: np.ndarray, eps: Optional[float], rms: bool = False,
                 weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None):
        super().__init__()
        role = np.asarray(role)
        width = len(role)
        self.normalized_shape = (width,)
        self.eps = eps
        self.rms = rms
        self.weight = nn.Parameter(weight.detach().clone()) if weight is not None else None
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        n_a_only = int((role == 1).sum())
        n_merged = int((role == 3).sum())
        # Two models' usual layout [A-only | merged | B-only] needs no gather.
        self.contiguous = bool(
            np.array_equal(role, np.concatenate([np.full(n_a_only, 1), np.full(n_merged, 3), np.full(width - n_a_only - n_merged, 2)]))
        )
        self.n_a_only, self.n_merged = n_a_only, n_merged
        self.n_models = int(role.max()).bit_length() if width else 0
        readers = np.array([bin(int(r)).count("1") for r in role], dtype=np.float64)
        for m in range(self.n_models):
            index = np.flatnonzero(role & (1 << m))
            self.register_buffer(f"index_{m}", torch.as_tensor(index, dtype=torch.long), persistent=False)
            self.register_buffer(f"share_{m}", torch.as_tensor(1.0 / readers[index], dtype=torch.float32),
                                 persistent=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms:
            return torch.nn.functional.rms_norm(x, (x.shape[-1],), eps=self.eps)
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), eps=1e-5 if self.eps is None else self.eps)

    def forward(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        weight = self.weight if weight is None else weight
        bias = self.bias if bias is None else bias
        if self.contiguous:
            p, k = self.n_a_only, self.n_merged
            na = self._norm(x[..., : p + k])
            nb = self._norm(x[..., p:])
            out = torch.cat([na[..., :p], 0.5 * (na[..., p:] + nb[..., :k]), nb[..., k:]], dim=-1)
        else:
            out = x.new_zeros(x.shape)
            for m in range(self.n_models):
                index = getattr(self, f"index_{m}")
                out = out.index_add_(-1, index, self._norm(x.index_select(-1, index)) * getattr(self, f"share_{m}").to(x.dtype))
        if weight is not None:
            out = out * weight
        if bias is not None:
            out = out + bias
        return out

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, a_only={self.n_a_only}, merged={self.n_merged}, rms={self.rms}"


def _additive_mask(mask: torch.Tensor, dtype) -> torch.Tensor:
    """An ``nn.MultiheadAttention`` mask as an additive float mask (a bool
    mask marks the positions that may *not* be attended)."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def packed_attention(module: nn.Module, query: torch.Tensor, key_padding_mask=None, attn_mask=None,
                     is_causal: bool = False) -> torch.Tensor:
    """Self-attention of a module with packed ``[q | k | v]`` projections
    (``nn.MultiheadAttention`` or ``WidenedMultiheadAttention``): the heads'
    weighted values, concatenated, before the output projection, in the
    module's batch layout. Masks as ``nn.MultiheadAttention`` takes them:
    ``attn_mask`` (L, S), ``key_padding_mask`` (batch, S)."""
    x = query if module.batch_first else query.transpose(0, 1)
    b, n, _ = x.shape
    if getattr(module, "in_proj", None) is not None:
        qkv = module.in_proj(x)
    else:
        qkv = torch.nn.functional.linear(x, module.in_proj_weight, module.in_proj_bias)
    heads = module.num_heads
    head_dim = qkv.shape[-1] // 3 // heads
    q, k, v = (t.reshape(b, n, heads, head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    mask = None
    if attn_mask is not None:
        if attn_mask.dim() != 2:
            raise NotImplementedError("per-head attention masks are not supported once heads are merged")
        mask = _additive_mask(attn_mask, q.dtype)
    if key_padding_mask is not None:
        pad = _additive_mask(key_padding_mask, q.dtype)[:, None, None, :]
        mask = pad if mask is None else mask + pad
    dropout = module.dropout if module.training else 0.0
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                         is_causal=bool(is_causal) and mask is None)
    o = o.transpose(1, 2).reshape(b, n, heads * head_dim)
    return o if module.batch_first else o.transpose(0, 1)


class WidenedMultiheadAttention(nn.Module):
    """Self-attention with packed q/k/v projections whose input width, number
    of heads and output width are independent (``nn.MultiheadAttention``
    requires the input width to equal heads x head_dim, which a widened
    residual stream with partially merged heads breaks). Same parameter names
    as ``nn.MultiheadAttention``; 2-d attention masks and key padding masks
    are supported."""

    def __init__(self, mha: nn.MultiheadAttention, head_dim: int):
        super().__init__()
        self.in_proj_weight = mha.in_proj_weight
        self.in_proj_bias = mha.in_proj_bias
        self.out_proj = mha.out_proj
        self.head_dim = head_dim
        self.num_heads = mha.in_proj_weight.shape[0] // (3 * head_dim)
        self.embed_dim = self.num_heads * head_dim
        self.batch_first = mha.batch_first
        self.dropout = mha.dropout
        self.in_proj = None  # the packed projection as row blocks, once split

    def split_projection(self, member: str, in_index, out_index) -> None:
        """Compute a projection (``in_proj_weight`` or ``out_proj.weight``) as
        row blocks over input-feature subsets, skipping its structural zeros."""
        if member == "out_proj.weight":
            self.out_proj = PartialLinear(self.out_proj, in_index, out_index)
            return
        if member != "in_proj_weight":
            raise ValueError(f"no projection '{member}'")
        out, width = self.in_proj_weight.shape
        dense = nn.Linear(width, out, bias=self.in_proj_bias is not None,
                          device=self.in_proj_weight.device, dtype=self.in_proj_weight.dtype)
        with torch.no_grad():
            dense.weight.copy_(self.in_proj_weight)
            if self.in_proj_bias is not None:
                dense.bias.copy_(self.in_proj_bias)
        self.in_proj = PartialLinear(dense, in_index, out_index)
        self.in_proj_weight = self.in_proj_bias = None

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if key is not query or value is not query:
            raise NotImplementedError("widened attention is self-attention: key and value must be the query")
        o = packed_attention(self, query, key_padding_mask, attn_mask, is_causal)
        return self.out_proj(o), None


class ModelViews(nn.Module):
    """A part of the graph run once per source model's view of its widened
    axes, where no widened form of its ops exists (a token mixer's hidden
    layer while the channels widen: every entry would mix the two models).

    ``views[v]`` is the part's graph with model ``v``'s weights at its source
    shapes. Each input is gathered to model ``v``'s view along its widened
    axes (``gathers[v][i]``: ``(axis, index)`` pairs); each output is placed
    back on its widened axis (``scatters[j]``: ``(axis, width)``, or None for
    an output that did not widen), a merged entry taking the mean of the
    views that read it. With nothing merged this is the models side by
    side; with everything merged, one model's graph run twice on shared
    inputs.
    """

    def __init__(self, views: Sequence[nn.Module], gathers: Sequence[Sequence[Sequence[tuple]]],
                 scatters: Sequence[Optional[tuple]], scatter_index: Sequence[Sequence[np.ndarray]]):
        super().__init__()
        self.views = nn.ModuleList(views)
        self.gather_axes = [[[axis for axis, _ in axes] for axes in per_input] for per_input in gathers]
        for v, per_input in enumerate(gathers):
            for i, axes in enumerate(per_input):
                for k, (_, index) in enumerate(axes):
                    self.register_buffer(f"gather_{v}_{i}_{k}", torch.as_tensor(index, dtype=torch.long),
                                         persistent=False)
        self.scatters = list(scatters)
        for j, spec in enumerate(scatters):
            if spec is None:
                continue
            counts = np.zeros(spec[1])
            for v, index in enumerate(scatter_index[j]):
                self.register_buffer(f"scatter_{v}_{j}", torch.as_tensor(index, dtype=torch.long), persistent=False)
                counts[index] += 1
            self.register_buffer(f"share_{j}", torch.as_tensor(1.0 / np.maximum(counts, 1), dtype=torch.float32),
                                 persistent=False)

    def _view_inputs(self, v: int, xs) -> list:
        out = []
        for i, x in enumerate(xs):
            for k, axis in enumerate(self.gather_axes[v][i]):
                x = x.index_select(axis, getattr(self, f"gather_{v}_{i}_{k}"))
            out.append(x)
        return out

    def forward(self, *xs):
        ys = [view(*self._view_inputs(v, xs)) for v, view in enumerate(self.views)]
        outs = []
        for j, spec in enumerate(self.scatters):
            parts = [y[j] for y in ys]
            if not isinstance(parts[0], torch.Tensor):
                outs.append(parts[0])  # a size or flag: the same in every view
            elif spec is None:
                outs.append(sum(parts) / len(parts))
            else:
                axis, width = spec
                shape = list(parts[0].shape)
                shape[axis] = width
                out = parts[0].new_zeros(shape)
                for v, part in enumerate(parts):
                    out = out.index_add(axis, getattr(self, f"scatter_{v}_{j}"), part)
                share = getattr(self, f"share_{j}").to(out.dtype)
                outs.append(out * share.reshape([-1 if a == axis % out.ndim else 1 for a in range(out.ndim)]))
        return tuple(outs)


class RoleSplit(nn.Module):
    """A layer applied along another axis than the one that widens (a Linear
    over the tokens while the channels widen): its weights do not index the
    widened axis, so one weight cannot serve both models. Positions of that
    axis that carry only model A's feature run A's layer, model B's B's, the
    merged ones the merged layer; each position is computed once, at the
    cost the plan counts."""

    def __init__(self, layers: Sequence[nn.Module], indices: Sequence[np.ndarray], axis: int):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.axis = axis
        for i, index in enumerate(indices):
            self.register_buffer(f"index_{i}", torch.as_tensor(index, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [(getattr(self, f"index_{i}"), layer) for i, layer in enumerate(self.layers)]
        ys = [(index, layer(x.index_select(self.axis, index))) for index, layer in parts if len(index)]
        shape = list(ys[0][1].shape)
        shape[self.axis] = x.shape[self.axis]
        out = ys[0][1].new_empty(shape)
        for index, y in ys:
            out = out.index_copy(self.axis, index, y)
        return out
