"""Layer-wise least squares from accumulated Gram matrices.

For every convolution and linear layer of the merged model, fit weights ``W``
so the layer maps the permuted-ensemble inputs ``X~`` to the permuted-ensemble
outputs ``Y~`` (``widen_features`` of every model's aligned values: teacher
forcing). Convolutions are unfolded (im2col, any stride, padding, dilation
and groups) so each output position is a sample; at most ``positions``
positions per input are kept. Only ``G = X~^T X~`` and ``C = X~^T Y~`` are
accumulated (each batch's products in the activations' precision, their sum
over batches in float64), so memory does not grow with the data.

Each output row class is its own problem over the input columns it may read
(A-only rows: A's and merged columns; B-only rows: B's and merged; merged
rows: all), with a ridge term pulling toward the initial widened weights
``W0``:

    (G_SS + lam I) W_R^T = C_SR + lam W0_RS^T,   lam = ridge * trace(G_SS) / |S|

The bias is an extra all-ones column that every row may read. A layer with
no merged output row never reads the Gram block of A-only against B-only
columns; its statistics are kept in a ``StatisticsLayout`` that skips it.

Two choices of inputs (``inputs=``): ``"ensemble"`` takes ``X~`` from the
permuted ensemble (teacher forcing: one pass over the data fits every layer),
``"merged"`` takes the merged model's own inputs to the layer, so each layer
also corrects the error of the layers before it (its wave of the fitting
sweep comes after every fit upstream of it: fxmerge/fit/sweep.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx

from fxmerge.analysis.ir import layout_size
from fxmerge.analysis.rules.registry import LEAST_SQUARES
from fxmerge.runtime.distributed import all_sum
from fxmerge.runtime.runner import sample_positions
from .sweep import A, M, Point, source_slots
from fxmerge.runtime.tensors import add_gram_upper, get_tensor, matmul, positions_view, rows, symmetric
from fxmerge.merging.widening import ROLE_A, ROLE_B, ROLE_M, Widening, widen_features


def supports(mod: nn.Module) -> bool:
    """Layers whose forward is a plain convolution or linear map of their
    weight (each op's rule says so: ``LEAST_SQUARES``)."""
    entry = LEAST_SQUARES.for_module(mod)
    return entry is not None and bool(entry(mod))


def conv_weight(mod: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """A layer's weight as the ``(out, in, taps...)`` matrix least squares
    fits: a transposed convolution is the convolution of its zero-inserted
    input with the flipped, transposed kernel."""
    if isinstance(mod, nn.ConvTranspose2d):
        return weight.transpose(0, 1).flip(-1, -2)
    return weight


def from_conv_weight(mod: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """The inverse of ``conv_weight``."""
    if isinstance(mod, nn.ConvTranspose2d):
        return weight.flip(-1, -2).transpose(0, 1)
    return weight


@dataclass
class LayerSystem:
    node: str
    weight: str
    bias: str | None
    groups: int
    w_in: Widening  # weight's input axis (per group)
    w_out: Widening  # weight's output axis
    w_x: Widening  # the input tensor's channel axis
    w_y: Widening  # the output tensor's channel axis
    gram: torch.Tensor | None = None  # (groups, cols, cols)
    cross: torch.Tensor | None = None  # (groups, cols, rows per group)
    yy: torch.Tensor | None = None  # (groups, rows per group): sum of squared targets
    n: int = 0
    diag: list | None = None  # RegMean: per model, the diagonal of its own Gram
    loss_init: float = field(default=float("nan"))
    loss_fit: float = field(default=float("nan"))
    taps: Callable | None = None  # the weight's input and output inside an opaque module (``Contraction.taps``)
    # where the weight's columns and rows sit in gram / cross / yy (None: in
    # the weight's own order); set by the first ``accumulate``
    layout: "StatisticsLayout | None" = None

    def dense(self) -> tuple:
        """``(gram, cross, yy)`` in the weight's own column and row order,
        zero where no row class reads (for tools that read the systems
        whole; the solver reads ``layout`` directly)."""
        if self.layout is None:
            return self.gram, self.cross, self.yy
        inv_c = torch.as_tensor(self.layout.inverse_cols, device=self.gram.device)
        inv_r = torch.as_tensor(self.layout.inverse_outs, device=self.gram.device)
        gram = self.gram.index_select(1, inv_c).index_select(2, inv_c)
        return gram, self.cross.index_select(1, inv_c).index_select(2, inv_r), self.yy.index_select(1, inv_r)


@dataclass
class StatisticsLayout:
    """The order of a layer's statistics when no output row is merged: the
    A-only rows read only A's and the merged columns, the B-only rows only
    B's and the merged ones, so the Gram block of A-only against B-only
    columns is never read. With the columns ordered ``[A-only | merged,
    bias | B-only]`` and the rows ``[A-only | B-only]``, each row class's
    system is one contiguous square of the Gram matrix and the unread
    block is one rectangle that accumulation skips (half of a fully
    widened layer's work)."""
    cols: np.ndarray  # statistics column -> weight column
    outs: np.ndarray  # statistics row -> weight output row
    a_cols_end: int  # columns [0, a_cols_end): A-only
    b_cols_start: int  # columns [b_cols_start, end): B-only
    a_outs_end: int  # rows [0, a_outs_end): A-only, the rest B-only

    @property
    def inverse_cols(self) -> np.ndarray:
        return np.argsort(self.cols)

    @property
    def inverse_outs(self) -> np.ndarray:
        return np.argsort(self.outs)


def weight_columns(channels: np.ndarray, taps: int) -> np.ndarray:
    """The flattened weight columns of input ``channels``, each with its
    ``taps`` kernel positions (a convolution's columns are channel-major)."""
    return (np.asarray(channels)[:, None] * taps + np.arange(taps)[None, :]).reshape(-1)


def statistics_layout(sysm: LayerSystem, ncols: int) -> Optional[StatisticsLayout]:
    """The ``StatisticsLayout`` of a dense layer with ``ncols`` weight
    columns (taps and bias included), or None where every column pair is
    read (a merged output row, grouped weights, no A-only or B-only side)."""
    role_out, role_in = sysm.w_out.role, sysm.w_in.role
    if sysm.groups != 1 or max(role_out.max(initial=0), role_in.max(initial=0)) > ROLE_M:
        return None  # grouped weights, or more than two models
    rows_a, rows_b = np.flatnonzero(role_out == ROLE_A), np.flatnonzero(role_out == ROLE_B)
    if (role_out == ROLE_M).any() or not len(rows_a) or not len(rows_b):
        return None
    has_bias = sysm.bias is not None
    taps = (ncols - has_bias) // sysm.w_in.size
    only_a, shared, only_b = (weight_columns(np.flatnonzero(role_in == r), taps) for r in (ROLE_A, ROLE_M, ROLE_B))
    if not len(only_a) or not len(only_b):
        return None
    bias = np.array([ncols - 1] if has_bias else [], dtype=np.int64)
    cols = np.concatenate([only_a, shared, bias, only_b]).astype(np.int64)
    return StatisticsLayout(cols, np.concatenate([rows_a, rows_b]), len(only_a), ncols - len(only_b), len(rows_a))


def layer_systems(pg, merged: fx.GraphModule, gm_a: fx.GraphModule, widener, *, stacked: bool = False,
                  unfit: Optional[list] = None) -> tuple:
    """A ``LayerSystem`` per contraction least squares can fit, keyed like
    ``pg.contractions`` (node name, or ``node#part`` for a packed module),
    and the merged model's module of each. ``stacked`` (RegMean) keeps only
    layers whose shape did not change (a widened one stays as widened).
    ``unfit`` receives the layers applied along another axis of a tensor
    whose channels widen (a token mixer's linear over the tokens, the
    channels widened): the merged model's rows there are no rows of the
    sources, so no system pairs them."""
    nodes = {n.name: n for n in merged.graph.nodes}
    pg_nodes = {n.name: n for n in pg.gm.graph.nodes}
    systems, modules = {}, {}
    for key, c in pg.contractions.items():
        name = c.node
        node = nodes.get(name)  # absent: run per model view, with each model's own weights
        if node is None or node.op != "call_module" or key in systems or c.weight is None:
            continue
        mod = merged.get_submodule(node.target)
        lays = pg.members[c.weight]
        if c.taps is None:
            x_lays = pg.layouts[pg_nodes[name].args[0]].lays
            if any(widener.size(lay) != layout_size(lay) for axis, lay in enumerate(x_lays)
                   if axis not in (0, c.input_axis)):
                if unfit is not None:
                    unfit.append(key)
                continue
            if not supports(mod):
                continue
            weight_name = f"{node.target}.weight"
            bias_name = f"{node.target}.bias" if getattr(mod, "bias", None) is not None else None
            x_lay = x_lays[c.input_axis]
            y_lay = pg.layouts[pg_nodes[name]].lays[c.output_axis]
        else:
            # a weight inside an opaque module: its own axes are its input's and output's channels
            weight_name = c.weight
            bias_name = c.weight[: -len("weight")] + "bias" if c.weight.endswith("weight") else None
            if bias_name is not None and get_tensor(merged, bias_name) is None:
                bias_name = None
            x_lay, y_lay = lays[1], lays[0]
        if stacked and tuple(merged.get_parameter(weight_name).shape) != tuple(gm_a.get_parameter(weight_name).shape):
            continue  # RegMean merges same-shape layers; a widened one (both heads kept) stays as widened
        out_axis = 1 if c.weight_in_axis == 0 else 0
        systems[key] = LayerSystem(name, weight_name, bias_name, getattr(mod, "groups", 1) if c.taps is None else 1,
                                   widener.widen(lays[c.weight_in_axis]), widener.widen(lays[out_axis]),
                                   widener.widen(x_lay), widener.widen(y_lay), taps=c.taps)
        modules[key] = mod
    return systems, modules


def sample_rows(mod: nn.Module, x: torch.Tensor, idx) -> torch.Tensor:
    """One layer's sampled input rows ``(rows, channels, taps)``: for a
    convolution the im2col patch of every kept output position (any stride,
    padding, dilation), for a linear layer the features (one tap)."""
    if isinstance(mod, nn.ConvTranspose2d):
        # the zero-inserted input, padded so a stride-1 convolution with the
        # flipped kernel gives the transposed convolution's output
        (sh, sw), (kh, kw), (dh, dw) = mod.stride, mod.kernel_size, mod.dilation
        (ph, pw), (oh, ow) = mod.padding, mod.output_padding
        b, c, h, w = x.shape
        up = x.new_zeros(b, c, (h - 1) * sh + 1, (w - 1) * sw + 1)
        up[:, :, ::sh, ::sw] = x
        up = F.pad(up, (dw * (kw - 1) - pw, dw * (kw - 1) - pw + ow, dh * (kh - 1) - ph, dh * (kh - 1) - ph + oh))
        cols = F.unfold(up, mod.kernel_size, dilation=mod.dilation)
        X = rows(cols.permute(0, 2, 1), idx)
        return X.reshape(X.shape[0], x.shape[1], -1)
    if isinstance(mod, nn.Conv2d):
        padding = mod.padding
        if isinstance(padding, str):  # 'same' (stride 1; the extra pixel goes right, as torch does) or 'valid'
            if padding == "same":
                (kh, kw), (dh, dw) = mod.kernel_size, mod.dilation
                th, tw = dh * (kh - 1), dw * (kw - 1)
                x = F.pad(x, (tw // 2, tw - tw // 2, th // 2, th - th // 2))
            padding = 0
        elif mod.padding_mode != "zeros":  # reflect / replicate / circular: pad as the layer does
            (ph, pw) = padding
            x = F.pad(x, (pw, pw, ph, ph), mode=mod.padding_mode)
            padding = 0
        padding = (padding, padding) if isinstance(padding, int) else tuple(padding)
        if idx is not None:
            return sampled_patches(x, mod.kernel_size, mod.stride, padding, mod.dilation, idx)
        cols = F.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=padding, stride=mod.stride)
        X = rows(cols.permute(0, 2, 1), idx)  # (rows, in x taps)
        return X.reshape(X.shape[0], x.shape[1], -1)
    return rows(positions_view(x, x.ndim - 1), idx).unsqueeze(-1)


def sampled_patches(x: torch.Tensor, kernel_size, stride, padding, dilation, idx: torch.Tensor) -> torch.Tensor:
    """The im2col patches ``(batch x positions, channels, taps)`` of a 2-d
    convolution at the output positions ``idx`` only, in ``F.unfold``'s
    order: gathering the kept positions' taps reads a few dozen positions
    instead of unfolding the whole map (at 224x224 the early layers have
    thousands of positions, of which the statistics keep 64)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    b, c, h, w = x.shape
    out_w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    r, col = (idx // out_w) * sh, (idx % out_w) * sw
    taps_r = (torch.arange(kh, device=x.device) * dh).repeat_interleave(kw)
    taps_c = (torch.arange(kw, device=x.device) * dw).repeat(kh)
    patches = x[:, :, r[:, None] + taps_r[None], col[:, None] + taps_c[None]]  # (batch, channels, positions, taps)
    return patches.permute(0, 2, 1, 3).reshape(-1, c, kh * kw)


def output_view(mod: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """A layer's output as ``(batch, positions, channels)``."""
    return positions_view(y, 1 if isinstance(mod, nn.modules.conv._ConvNd) else y.ndim - 1)


class LeastSquaresPoint(Point):
    """One layer's least-squares system as a point of the fitting sweep.

    ``inputs``: ``"merged"`` (X from the merged model's own input to the
    layer: the point waits for every fit upstream), ``"ensemble"`` (X from
    the permuted ensemble of A and aligned B: teacher forcing, wave 0) or
    ``"stacked"`` (RegMean: each model's own X and Y as separate samples).
    The targets Y are always the permuted ensemble's outputs. Positions are
    sampled before the ensemble's features are widened, so the widening
    touches only the kept rows. ``finish`` sums the statistics across ranks
    and hands them to ``solve(point)``."""

    def __init__(self, key: str, sysm: LayerSystem, models: list, inputs: str, positions: int, seed: int,
                 solve: Callable, norm: Optional[str] = None):
        self.key = key
        # the BatchNorm right after the layer (``ls_targets="normalized"``):
        # targets are averaged after each model's normalisation and mapped
        # back through the merged model's (fixed) one
        self.norm = norm
        self.sysm = sysm
        self.node = sysm.node
        self.models = models
        self.inputs = inputs
        self.merged_inputs = inputs == "merged"
        self.positions = positions
        self.seed = seed
        self.solve = solve
        self.sources = source_slots(len(models) - 1)  # every source model's slot, A's first

    def reads(self, node: fx.Node) -> list:
        args = list(node.all_input_nodes) if self.sysm.taps is not None else [node.args[0]]
        out = [(s, node) for s in self.sources]
        if self.sysm.taps is not None or not self.merged_inputs:
            out += [(m, a) for a in args for m in self.sources]
        if self.merged_inputs:
            out += [(M, a) for a in args]
        return out

    def collect(self, batch: int, value) -> None:
        node = self._node = self._node or _find_node(self.models[A], self.node)
        xs, ys = {}, {}  # by model slot: what ``reads`` declares, nothing more
        sources = self.sources
        if self.sysm.taps is None:
            for s in (M,) if self.merged_inputs else sources:
                xs[s] = value(s, node.args[0])
            ys = {s: value(s, node) for s in sources}
        else:
            for s in (*sources, M) if self.merged_inputs else sources:
                args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: value(s, a))
                xs[s], y = self.sysm.taps(self.models[s].get_submodule(node.target), *args, **kwargs,
                                          output=value(s, node) if s != M else None)
                if s != M:
                    ys[s] = y
        mod = self.models[M if self.models[M] is not None else A].get_submodule(node.target)
        sysm = self.sysm
        stacked = self.inputs == "stacked"
        for m in range(len(sources) if stacked else 1):
            gen = torch.Generator().manual_seed(self.seed * 7919 + batch * 104729 + len(sysm.node) + 31 * m)
            yv = {s: output_view(mod, ys[s]) for s in sources}
            idx = sample_positions(yv[A].shape[1], self.positions, gen, yv[A].device)
            yr = {s: rows(yv[s], idx) for s in ((sources[m],) if stacked else sources)}
            if stacked:
                # RegMean: each model's own inputs and outputs, stacked as samples
                X, Y = sample_rows(mod, xs[sources[m]], idx), yr[sources[m]]
            else:
                if self.merged_inputs:
                    X = sample_rows(mod, xs[M], idx)
                else:
                    X = widen_features([sample_rows(mod, xs[s], idx) for s in sources], 1, sysm.w_x)
                if self.norm is None:
                    Y = widen_features([yr[s] for s in sources], 1, sysm.w_y)
                else:
                    Y = self._normalized_target([yr[s] for s in sources])
            g = sysm.groups
            accumulate(sysm, X.reshape(X.shape[0], g, -1), Y.reshape(Y.shape[0], g, -1), m if stacked else None,
                       len(sources))

    _node = None

    def _normalized_target(self, ys: list) -> torch.Tensor:
        """The merged layer's target when a BatchNorm follows: every model's
        outputs normalised by its own BatchNorm, averaged where merged, and
        mapped back through the merged model's BatchNorm (identical to the
        plain target on channels of one model)."""
        z = widen_features([_batch_norm_rows(self.models[s].get_submodule(self.norm), y)
                            for s, y in zip(self.sources, ys)], 1, self.sysm.w_y)
        bn = self.models[M].get_submodule(self.norm)
        gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_mean)
        beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
        scale = torch.sqrt(bn.running_var + bn.eps)
        safe = gamma.abs() > 1e-6
        y = (z - beta) / torch.where(safe, gamma, torch.ones_like(gamma)) * scale + bn.running_mean
        plain = widen_features(ys, 1, self.sysm.w_y)
        return torch.where(safe, y, plain)

    def finish(self) -> None:
        sysm = self.sysm
        n = torch.tensor([float(sysm.n)], dtype=torch.float64)
        all_sum(sysm.gram, sysm.cross, sysm.yy, n, *(sysm.diag or ()))
        sysm.n = int(n.item())
        if sysm.gram is not None and sysm.groups == 1:
            sysm.gram = symmetric(sysm.gram)
        self.solve(self)
        sysm.gram = sysm.cross = None  # free

    def nbytes(self) -> int:
        return system_bytes(self.sysm, self.models[M] if self.models[M] is not None else self.models[A])

    def solve_nbytes(self) -> int:
        return solve_bytes(self.sysm, self.models[M] if self.models[M] is not None else self.models[A])


def _batch_norm_rows(bn: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """An eval-mode BatchNorm (its affine part included, no activation) on
    rows ``(samples, channels)``."""
    z = (y - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        z = z * bn.weight + bn.bias
    return z


def following_batch_norm(gm: fx.GraphModule, node_name: str) -> Optional[str]:
    """The BatchNorm module that is the only reader of a layer's output."""
    from .batchnorm import is_batch_norm

    for n in gm.graph.nodes:
        if n.name == node_name:
            users = list(n.users)
            if len(users) == 1 and users[0].op == "call_module" and users[0].args and users[0].args[0] is n:
                if is_batch_norm(gm.get_submodule(users[0].target)):
                    return users[0].target
            return None
    return None


def _find_node(gm: fx.GraphModule, name: str) -> fx.Node:
    for n in gm.graph.nodes:
        if n.name == name:
            return n
    raise KeyError(name)


def _system_shape(sysm: LayerSystem, gm: fx.GraphModule) -> tuple:
    """``(rows per group, columns)`` of one layer's system, from its weight's
    shape (the bias is one more column)."""
    w = gm.get_parameter(sysm.weight)
    if sysm.taps is None:
        w = conv_weight(gm.get_submodule(sysm.weight.rsplit(".", 1)[0]), w)
    rows_per_group = w.shape[0] // sysm.groups if sysm.taps is None else w.shape[0]
    return rows_per_group, int(np.prod(w.shape[1:])) + (sysm.bias is not None)


def system_bytes(sysm: LayerSystem, gm: fx.GraphModule) -> int:
    """Bytes of one layer's float64 statistics (Gram matrix and cross
    products), from its weight's shape."""
    rows_per_group, cols = _system_shape(sysm, gm)
    return 8 * sysm.groups * cols * (cols + rows_per_group + 1)


def solve_bytes(sysm: LayerSystem, gm: fx.GraphModule) -> int:
    """Bytes a layer's solve holds besides its statistics: one float64 copy
    of its largest Gram block (``solve_block``; narrow systems, below
    ``IN_PLACE_MIN_COLS``, hold two), at most one group's full Gram matrix."""
    _, cols = _system_shape(sysm, gm)
    return 8 * cols * cols


def accumulate(sysm: LayerSystem, X: torch.Tensor, Y: torch.Tensor, model: Optional[int] = None,
               n_models: int = 2) -> None:
    """Add one batch's ``(rows, groups, cols)`` inputs and ``(rows, groups,
    outs)`` targets to the layer's float64 sums (``model``: RegMean's
    per-model Gram diagonals). Products are float32, their sums float64."""
    if sysm.bias is not None:
        X = torch.cat([X, torch.ones_like(X[..., :1])], dim=-1)
    g, cols, outs = X.shape[1], X.shape[2], Y.shape[2]
    if sysm.gram is None:
        f64 = dict(dtype=torch.float64, device=X.device)
        sysm.gram = torch.zeros(g, cols, cols, **f64)
        sysm.cross = torch.zeros(g, cols, outs, **f64)
        sysm.yy = torch.zeros(g, outs, **f64)
        sysm.layout = statistics_layout(sysm, cols) if model is None else None
    lay = sysm.layout
    if lay is not None:
        X = X[:, 0].index_select(1, torch.as_tensor(lay.cols, device=X.device))
        Y = Y[:, 0].index_select(1, torch.as_tensor(lay.outs, device=Y.device))
        i, j, r = lay.a_cols_end, lay.b_cols_start, lay.a_outs_end
        add_gram_upper(sysm.gram[0], X, skip=(i, j))
        sysm.cross[0, :j, :r].add_(matmul(X[:, :j].T, Y[:, :r]))
        sysm.cross[0, i:, r:].add_(matmul(X[:, i:].T, Y[:, r:]))
        X, Y = X[:, None], Y[:, None]
    elif g == 1:
        add_gram_upper(sysm.gram[0], X[:, 0])  # mirrored once, in ``finish``
        sysm.cross[0].add_(matmul(X[:, 0].T, Y[:, 0]))
    else:
        sysm.gram.add_(torch.einsum("ngi,ngj->gij", X, X))
        sysm.cross.add_(torch.einsum("ngi,ngo->gio", X, Y))
    sysm.yy += Y.pow(2).sum(0, dtype=torch.float64)
    if model is not None:
        if sysm.diag is None:
            sysm.diag = [torch.zeros(g, cols, dtype=torch.float64, device=X.device) for _ in range(n_models)]
        sysm.diag[model] += X.pow(2).sum(0, dtype=torch.float64)
    sysm.n += X.shape[0]
