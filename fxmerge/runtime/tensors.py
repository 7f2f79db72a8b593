"""Small tensor and module helpers shared by the passes.

Names in a module tree (``layer1.0.conv1.weight``), the module that owns an
attribute, replacing a parameter or buffer in place, the ``(batch,
positions, features)`` view the statistics read, the row blocks of a
widened contraction, and the matrix product the statistics are made of.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxmerge.merging.widening import ROLE_A, ROLE_B, ROLE_M


# below this many multiply-adds a product goes to torch.mm: oneDNN's set-up
# costs more than it saves on the tiny products of small layers
DNNL_MIN_MACS = 1 << 22


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (``a``: p x n, ``b``: n x q). A float32 product on the CPU
    runs as a 1x1 convolution, through oneDNN: the Gram and cross-product
    statistics are almost all of the merge's arithmetic, and torch's CPU
    matrix product (MKL) ran at half the speed of oneDNN's convolution on
    an AMD EPYC (200 against 400 GFLOP/s on two cores). Same float32
    arithmetic; the sums may round differently."""
    p, n = a.shape
    q = b.shape[1]
    if (a.device.type != "cpu" or a.dtype != torch.float32 or b.dtype != torch.float32 or p * n * q < DNNL_MIN_MACS
            or not torch.backends.mkldnn.is_available() or not torch.backends.mkldnn.enabled):
        return a @ b
    # conv1d: input (1, n channels, q positions), weight (p, n, 1) -> (1, p, q)
    return F.conv1d(b.contiguous().unsqueeze(0), a.contiguous().unsqueeze(-1))[0]


def split_name(name: str) -> tuple:
    """``"a.b.weight"`` -> ``("a.b", "weight")``."""
    mod, _, leaf = name.rpartition(".")
    return mod, leaf


def owner_of(root: nn.Module, name: str) -> nn.Module:
    """The module that holds the parameter, buffer or attribute ``name``."""
    mod_name, _ = split_name(name)
    return root.get_submodule(mod_name) if mod_name else root


def get_tensor(root: nn.Module, name: str):
    """The tensor attribute ``name`` below ``root`` (None when absent)."""
    obj = root
    for part in name.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, torch.Tensor) else None


def tensor_state(module: nn.Module) -> dict:
    """``module.state_dict()`` plus its non-persistent buffers: every tensor
    the graph reads, by qualified name (a non-persistent buffer, such as a
    zero key bias concatenated into a packed projection's bias, widens like
    a parameter)."""
    state = dict(module.state_dict())
    for name, buf in module.named_buffers():
        state.setdefault(name, buf)
    return state


def set_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace the parameter, buffer or tensor attribute ``name`` (a
    parameter stays a parameter with its ``requires_grad``)."""
    mod = owner_of(root, name)
    _, leaf = split_name(name)
    old = getattr(mod, leaf)
    if isinstance(old, nn.Parameter):
        setattr(mod, leaf, nn.Parameter(value, requires_grad=old.requires_grad))
    elif leaf in getattr(mod, "_buffers", {}):
        mod._buffers[leaf] = value
    else:
        setattr(mod, leaf, value)


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of the submodule ``name``."""
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def positions_view(x: torch.Tensor, axis: int) -> torch.Tensor:
    """``x`` as ``(batch, positions, features)`` with ``axis`` as features
    (axis 0 is the batch, every other axis a position)."""
    x = x.movedim(axis, -1)
    if x.ndim == 1:
        return x[None, None]
    return x.reshape(x.shape[0], -1, x.shape[-1])


def rows(x: torch.Tensor, idx) -> torch.Tensor:
    """Samples of a ``positions_view`` at the positions ``idx`` (all if None)."""
    if idx is not None:
        x = x[:, idx]
    return x.reshape(-1, x.shape[-1])


def row_blocks(w_out, w_in) -> list:
    """Row classes of a widened dense contraction, as ``(input columns,
    output rows)`` pairs: A-only rows read A's and the merged columns,
    merged rows every column, B-only rows B's and the merged ones."""
    blocks = []
    for bit in (ROLE_A, None, ROLE_B):
        if bit is None:
            out_rows = np.flatnonzero(w_out.role == ROLE_M)
            cols = np.arange(w_in.size)
        else:
            out_rows = np.flatnonzero(w_out.role == bit)
            cols = np.flatnonzero(w_in.reads(bit))
        if len(out_rows):
            blocks.append((cols, out_rows))
    return blocks
