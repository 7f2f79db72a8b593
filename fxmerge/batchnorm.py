"""BatchNorm statistics of the merged model.

Three policies (``constants.BN_STATS``):

* ``sweep``: inside the fitting sweep, each BatchNorm's running mean and
  variance are re-estimated on the merged model's own activations
  (``BatchNormPoint``), before any layer downstream of it is fitted: the
  layers are fitted under the statistics the model keeps. BatchNorms inside
  modules the graph cannot see into are reset with the module in train mode
  (``LeafBatchNormPoint``).
* ``reset``: after fitting, one pass with every BatchNorm in train mode
  (``reset_batch_norm``; REPAIR's reset).
* ``source``: the widened sources' own statistics, throughout.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.fx as fx
import torch.nn as nn

from .distributed import all_sum, world_size
from .inputs import Inputs
from .sweep import M, Point


def is_batch_norm(mod: nn.Module) -> bool:
    return isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.track_running_stats


class BatchNormPoint(Point):
    """The running statistics of one BatchNorm node of the merged model,
    estimated on its input over all calibration data (per channel, float64
    sums relative to the first batch's mean; unbiased variance, as
    PyTorch's running variance)."""

    merged_inputs = True

    def __init__(self, node: fx.Node, merged: fx.GraphModule):
        self.node = node.name
        self.input = node.args[0]
        self.merged = merged
        self.target = node.target

    def reads(self, node: fx.Node) -> list:
        return [(M, node.args[0])]

    def start(self) -> None:
        self.n = 0
        self.shift = self.s = self.ss = None

    def collect(self, batch: int, value) -> None:
        x = value(M, self.input)
        c = x.shape[1]
        flat = x.transpose(0, 1).reshape(c, -1)
        if self.shift is None:
            self.shift = flat.mean(1).double()
            self.s = torch.zeros(c, dtype=torch.float64, device=x.device)
            self.ss = torch.zeros(c, dtype=torch.float64, device=x.device)
        d = flat.double() - self.shift[:, None]
        self.s += d.sum(1)
        self.ss += (d * d).sum(1)
        self.n += flat.shape[1]

    def finish(self) -> None:
        bn = self.merged.get_submodule(self.target)
        n = torch.tensor([float(self.n)], dtype=torch.float64)
        shift = self.shift
        if world_size() > 1:
            # ranks shifted by their own first batch: move every rank's sums to
            # one shift (rank 0's), then add
            from .distributed import broadcast_object

            common = broadcast_object(shift.cpu()).to(shift.device)
            delta = shift - common  # x - common = (x - shift) + delta
            self.ss += 2 * delta * self.s + self.n * delta * delta
            self.s += self.n * delta
            shift = common
        all_sum(self.s, self.ss, n)
        total = n.item()
        mean = self.s / total
        var = (self.ss - total * mean * mean) / max(total - 1.0, 1.0)
        with torch.no_grad():
            bn.running_mean.copy_((mean + shift).to(bn.running_mean.dtype))
            bn.running_var.copy_(var.clamp_min(0).to(bn.running_var.dtype))
            if bn.num_batches_tracked is not None:
                bn.num_batches_tracked.fill_(1)

    def nbytes(self) -> int:
        return 0


class LeafBatchNormPoint(Point):
    """BatchNorms inside a module the graph does not see into: reset by
    running the module on its inputs with them in train mode (cumulative
    averages over batches, as ``reset_batch_norm``)."""

    merged_inputs = True

    def __init__(self, node: fx.Node, merged: fx.GraphModule):
        self.node = node.name
        self.merged = merged
        self.target = node.target
        self.args = node.args
        self.kwargs = node.kwargs

    def reads(self, node: fx.Node) -> list:
        return [(M, a) for a in node.all_input_nodes]

    def start(self) -> None:
        self.bns = [m for m in self.merged.get_submodule(self.target).modules() if is_batch_norm(m)]
        self.saved = [(m.momentum, m.training) for m in self.bns]
        for m in self.bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        self.batches = 0

    def collect(self, batch: int, value) -> None:
        mod = self.merged.get_submodule(self.target)
        args = fx.node.map_arg(self.args, lambda a: value(M, a))
        kwargs = fx.node.map_arg(self.kwargs, lambda a: value(M, a))
        with torch.no_grad():
            mod(*args, **kwargs)
        self.batches += 1

    def finish(self) -> None:
        for m, (mom, tr) in zip(self.bns, self.saved):
            m.momentum = mom
            m.train(tr)
        if world_size() > 1:
            # cumulative averages over each rank's batches -> over all batches
            count = torch.tensor([float(self.batches)], dtype=torch.float64)
            stats = [t for m in self.bns for t in (m.running_mean, m.running_var)]
            weighted = [t.double() * self.batches for t in stats]
            all_sum(count, *weighted)
            with torch.no_grad():
                for t, w in zip(stats, weighted):
                    t.copy_((w / count.clamp_min(1)).to(t.dtype))


def batch_norm_points(merged: fx.GraphModule) -> list:
    """A point for every BatchNorm node of the merged graph, and for every
    call of a module that holds BatchNorms inside."""
    points = []
    for node in merged.graph.nodes:
        if node.op != "call_module":
            continue
        mod = merged.get_submodule(node.target)
        if is_batch_norm(mod) and node.args and isinstance(node.args[0], fx.Node):
            points.append(BatchNormPoint(node, merged))
        elif any(is_batch_norm(m) for m in mod.modules()):
            points.append(LeafBatchNormPoint(node, merged))
    return points


@torch.no_grad()
def reset_batch_norm(model: nn.Module, batches: Iterable) -> int:
    """Recompute every BatchNorm's running statistics over ``batches``
    (``Inputs`` or input tensors; cumulative average over all batches,
    across ranks; the rest of the model stays in eval mode)."""
    bns = [m for m in model.modules() if is_batch_norm(m)]
    if not bns:
        return 0
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    count = 0
    try:
        for inputs in batches:
            inputs.call(model) if isinstance(inputs, Inputs) else model(inputs)
            count += 1
    finally:
        for m, (mom, tr) in zip(bns, saved):
            m.momentum = mom
            m.train(tr)
    if world_size() > 1:
        total = torch.tensor([float(count)], dtype=torch.float64)
        stats = [t for m in bns for t in (m.running_mean, m.running_var)]
        weighted = [t.double() * count for t in stats]
        all_sum(total, *weighted)
        for t, w in zip(stats, weighted):
            t.copy_((w / total.clamp_min(1)).to(t.dtype))
    return len(bns)
