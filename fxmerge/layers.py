"""Modules the rewrite emits.

``PartialConv2d`` and ``PartialLinear`` compute a widened contraction as row
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
    channel_axis = 1

    def _setup(self, parts: Sequence[nn.Module], in_index: Sequence[np.ndarray], out_index: Sequence[np.ndarray], n_in: int):
        self.parts = nn.ModuleList(parts)
        self._slices = []
        for i, idx in enumerate(in_index):
            sl = _as_slice(np.asarray(idx))
            self._slices.append(sl if sl is None or sl != (0, n_in) else "all")
            self.register_buffer(f"in_index_{i}", torch.as_tensor(np.asarray(idx), dtype=torch.long), persistent=False)
        order = np.concatenate([np.asarray(o) for o in out_index])
        inverse = np.argsort(order)
        self.reorder = not np.array_equal(inverse, np.arange(len(inverse)))
        self.register_buffer("out_order", torch.as_tensor(inverse, dtype=torch.long), persistent=False)

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


class PartialConv2d(_RowBlocks):
    """A widened ``Conv2d`` computed as row blocks over input-channel subsets."""

    channel_axis = -3

    def __init__(self, conv: nn.Conv2d, in_index, out_index):
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding, self.dilation = conv.kernel_size, conv.stride, conv.padding, conv.dilation
        parts = [
            _copy_rows(nn.Conv2d(len(ii), len(oi), conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                                 bias=conv.bias is not None, padding_mode=conv.padding_mode,
                                 device=conv.weight.device, dtype=conv.weight.dtype), conv, ii, oi)
            for ii, oi in zip(in_index, out_index)
        ]
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
