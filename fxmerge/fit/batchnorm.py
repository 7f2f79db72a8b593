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

from fxmerge.runtime.distributed import all_sum, sync, world_size
from fxmerge.runtime.inputs import Inputs
from .sweep import M, Point


def is_batch_norm(mod: nn.Module) -> bool:
    return isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.track_running_stats


class BatchNormPoint(Point):
    """The running statistics of one BatchNorm node of the merged model,
    estimated on its input over all calibration data: per channel, each
    batch's mean and sum of squared deviations (``torch.var_mean``, in the
    activations' precision), combined across batches and ranks in float64
    (Chan et al.'s pairwise update); the variance is unbiased, as PyTorch's
    running variance."""

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
        self.mean = self.m2 = None

    def collect(self, batch: int, value) -> None:
        x = value(M, self.input)
        dims = [0] + list(range(2, x.ndim))
        n_b = x.numel() // x.shape[1]
        var_b, mean_b = torch.var_mean(x, dim=dims, correction=0)
        self.add(n_b, mean_b.double(), var_b.double() * n_b)

    def add(self, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        """Merge a chunk of ``n_b`` samples with mean ``mean_b`` and sum of
        squared deviations ``m2_b`` into the running totals."""
        if self.mean is None:
            self.n, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta * delta * (self.n * n_b / n)
        self.n = n

    def finish(self) -> None:
        bn = self.merged.get_submodule(self.target)
        if world_size() > 1:
            # every rank's (count, mean, M2), combined in rank order on every rank
            from fxmerge.runtime.distributed import gather_objects

            parts = gather_objects((self.n, self.mean.cpu(), self.m2.cpu()))
            device = self.mean.device
            self.mean = None
            for n_r, mean_r, m2_r in parts:
                if n_r:
                    self.add(n_r, mean_r.to(device), m2_r.to(device))
        var = self.m2 / max(self.n - 1, 1)
        with torch.no_grad():
            bn.running_mean.copy_(self.mean.to(bn.running_mean.dtype))
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
        sync()
        total = torch.tensor([float(count)], dtype=torch.float64)
        stats = [t for m in bns for t in (m.running_mean, m.running_var)]
        weighted = [t.double() * count for t in stats]
        all_sum(total, *weighted)
        for t, w in zip(stats, weighted):
            t.copy_((w / total.clamp_min(1)).to(t.dtype))
    return len(bns)
