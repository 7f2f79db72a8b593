"""Small tensor and module helpers shared by the passes.

Names in a module tree (``layer1.0.conv1.weight``), the module that owns an
attribute, replacing a parameter or buffer in place, the ``(batch,
positions, features)`` view the statistics read, the row blocks of a
widened contraction, and the matrix product the statistics are made of.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F



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


# columns per block of ``add_gram_upper``: wide enough for an efficient
# matrix product, narrow enough that the skipped lower blocks save most of
# the work below the diagonal
GRAM_BLOCK = 512


def add_gram_upper(acc: torch.Tensor, X: torch.Tensor, skip: tuple | None = None) -> torch.Tensor:
    """Adds the upper block triangle of ``X^T X`` (``X``: samples x d) to
    the float64 sum ``acc`` (d x d) and returns it: each block of
    ``GRAM_BLOCK`` columns with the rows from the first to its last, one
    float32 product (``matmul``) added in place, so about half the work of
    the full product and no full-size temporary. Entries below the diagonal
    blocks are left as they are; ``symmetric`` mirrors the upper triangle
    once at the end. ``skip = (i, j)``: columns from ``j`` on start at row
    ``i`` (the block nobody reads, see ``StatisticsLayout``). Not a BLAS
    symmetric rank-k update: a second BLAS's worker threads spin on the
    cores the next convolution needs (on two cores a 3x3 convolution ran at
    half speed after each update)."""
    d = X.shape[1]
    rows_start, cols_from = skip if skip is not None else (0, d)
    Xt = X.T.contiguous()  # each block's rows, contiguous
    starts = sorted(set(range(0, d, GRAM_BLOCK)) | ({cols_from} if 0 < cols_from < d else set()))
    for start, stop in zip(starts, starts[1:] + [d]):
        first = rows_start if start >= cols_from else 0
        acc[first:stop, start:stop].add_(matmul(Xt[first:stop], X[:, start:stop]))
    return acc


def symmetric(upper: torch.Tensor) -> torch.Tensor:
    """Mirrors the upper triangle of ``upper`` onto its lower one, in place,
    and returns it (what was below the diagonal is ignored). Block by block,
    so no full-size temporary: a fully widened layer's Gram matrix is
    hundreds of megabytes, and two copies of it were the merge's peak."""
    d = upper.shape[-1]
    for start in range(0, d, GRAM_BLOCK):
        stop = min(start + GRAM_BLOCK, d)
        block = upper[..., start:stop, start:stop]
        block.copy_(torch.triu(block) + torch.triu(block, 1).transpose(-1, -2))
        upper[..., stop:, start:stop] = upper[..., start:stop, stop:].transpose(-1, -2)
    return upper
