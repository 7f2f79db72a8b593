"""ZipIt!'s partial zipping: the layers before a cut are zipped, everything
after it stays separate (every model's later layers side by side, each
reading the zipped features unzipped to its own, outputs averaged or
concatenated). The cut is the one whose cost is highest without exceeding
the budget (``choose_cut``); ``emit_partial_zip`` builds the model.
"""
from __future__ import annotations

import copy
import operator

import numpy as np
import torch

from fxmerge.analysis.ir import Dep, find, fold, is_pinned, side_by_side
from fxmerge.analysis.rules.registry import tensors_in
from fxmerge.analysis.tracing import TensorInfo

from .rewrite import model_device




def crossing_values(nodes: list, cut: int) -> list:
    """Nodes before position ``cut`` whose values nodes at or after it read."""
    prefix = {n.name for n in nodes[:cut]}
    crossing = []
    for n in nodes[cut:]:
        for i in n.all_input_nodes:
            if i.name in prefix and i not in crossing:
                crossing.append(i)
    return crossing


def cut_points(pg) -> list:
    """Where a cut may go: before each contraction, in graph order, where
    every value crossing the cut has a layout the unzip can gather (no
    per-head dependent axes), and at the end (everything zipped)."""
    nodes = list(pg.gm.graph.nodes)
    index = {n.name: i for i, n in enumerate(nodes)}
    points = []
    for c in sorted({c.node for c in pg.contractions.values()}, key=index.get):
        cut = index[c]
        ok = all(not any(isinstance(lay, Dep) for tl in tensors_in(pg.layouts.get(v)) for lay in tl.lays)
                 for v in crossing_values(nodes, cut))
        if ok and (not points or points[-1] != cut):
            points.append(cut)
    points.append(len(nodes))
    return points


def choose_cut(pg, costs: dict, budget: float, full_cost: float, n_models: int = 2) -> tuple:
    """Partial zipping's cut: the prefix before it zipped (1x), everything
    after it separate (every model: Nx). The cut whose cost is highest
    without exceeding ``budget`` wins (the cheapest when none fits). Returns
    ``(cut position, cost ratio, (min, max) ratio)`` in multiples of model
    A's cost; ``full_cost`` is the cost ratio with nothing cut."""
    nodes = list(pg.gm.graph.nodes)
    total = sum(costs.values()) or 1.0
    options = []
    for cut in cut_points(pg):
        if cut == len(nodes):
            ratio = full_cost
        else:
            before = sum(costs.get(n.name, 0.0) for n in nodes[:cut])
            ratio = (before + n_models * (total - before)) / total
        options.append((cut, ratio))
    fitting = [o for o in options if o[1] <= budget + 1e-9]
    cut, ratio = max(fitting, key=lambda o: o[1]) if fitting else min(options, key=lambda o: o[1])
    ratios = [r for _, r in options]
    return cut, ratio, (min(ratios), max(ratios))


def unzip_index(lay, zipped: dict, align, side: int) -> np.ndarray:
    """Where each of model ``side``'s features sits in the zipped features of
    a layout (gather index, per entry of that model's own axis): zipped
    atoms by their clusters, aligned blocks by the inverse of the model's
    alignment (``align``; model A is not aligned)."""
    r = None if isinstance(lay, Dep) else find(lay)
    if r is not None and not r.pinned and r.uid in zipped:
        U = zipped[r.uid][1]
        d = r.size
        return np.argmax(U[side * d:(side + 1) * d], axis=1)

    def blocks(r, s) -> np.ndarray:
        if side == 0:
            return np.arange(r.size)
        idx = align.index(r)  # aligned position -> B's own index
        inverse = np.empty_like(idx)
        inverse[idx] = np.arange(len(idx))
        return inverse

    return fold(lay, dep=lambda l: np.arange(l.size), pinned=lambda r: np.arange(r.size),
                atom=lambda r: np.arange(r.size), product=blocks,
                concat=lambda r, parts: side_by_side([unzip_index(p, zipped, align, side) for p in parts],
                                                     [p.size for p in parts]))


def _copy_attr(src: torch.nn.Module, dst: torch.nn.Module, target: str, new_target: str) -> None:
    """Copy the module or tensor ``target`` of ``src`` to ``new_target`` of
    ``dst``, creating the modules on the way."""
    obj = src
    for part in target.split("."):
        obj = getattr(obj, part)
    *path, leaf = new_target.split(".")
    mod = dst
    for part in path:
        if not hasattr(mod, part):
            mod.add_module(part, torch.nn.Module())
        mod = getattr(mod, part)
    if isinstance(obj, torch.nn.Module):
        mod.add_module(leaf, copy.deepcopy(obj))
    elif isinstance(obj, torch.nn.Parameter):
        mod.register_parameter(leaf, torch.nn.Parameter(obj.detach().clone(), requires_grad=obj.requires_grad))
    elif isinstance(obj, torch.Tensor):
        mod.register_buffer(leaf, obj.detach().clone())
    else:
        setattr(mod, leaf, copy.deepcopy(obj))


def emit_partial_zip(zipped_gm: torch.fx.GraphModule, gms: list, pg, cut: int, zipped: dict, aligns: list,
                     labels: str) -> torch.fx.GraphModule:
    """The partially zipped model: the nodes before ``cut`` from the zipped
    model, the nodes after it once per model, with each model's own weights
    (``side_a.*``, ``side_b.*``, ``side_c.*``, ...), each reading the zipped
    values unzipped to its own features (``aligns[m]``: model m's alignment
    of blocks); the outputs are averaged (shared labels) or concatenated
    (disjoint labels)."""
    ref = list(pg.gm.graph.nodes)
    if cut >= len(ref):
        return zipped_gm
    root = torch.nn.Module()
    graph = torch.fx.Graph()
    zipped_nodes = {n.name: n for n in zipped_gm.graph.nodes}
    env: dict = {}
    for n in ref[:cut]:
        zn = zipped_nodes[n.name]
        if zn.op in ("call_module", "get_attr"):
            _copy_attr(zipped_gm, root, zn.target, zn.target)
        env[n.name] = graph.node_copy(zn, lambda a: env[a.name])
    sides = []
    for side, gm in enumerate(gms):
        prefix = f"side_{chr(ord('a') + side)}"
        align = aligns[side]
        local: dict = {}
        for v in crossing_values(ref, cut):
            tls = tensors_in(pg.layouts.get(v))
            value = env[v.name]
            if len(tls) == 1 and isinstance(v.meta.get("fxm_value"), TensorInfo):
                for axis, lay in enumerate(tls[0].lays):
                    if is_pinned(lay):
                        continue  # (every other axis gets a gather, identity or not: fxmerge.load rebuilds it)
                    idx = unzip_index(lay, zipped, align, side)
                    name = f"zip_unzip.{v.name}_{prefix}_{axis}"
                    _copy_attr_tensor(root, name, torch.as_tensor(idx, dtype=torch.long))
                    index = graph.get_attr(name)
                    value = graph.call_method("index_select", (value, axis, index))
            local[v.name] = value
        gm_nodes = {n.name: n for n in gm.graph.nodes}
        out = None
        for n in ref[cut:]:
            node = gm_nodes[n.name]
            if node.op == "output":
                out = fx_map(node.args[0], lambda a: local[a.name])
                continue
            if node.op in ("call_module", "get_attr"):
                _copy_attr(gm, root, node.target, f"{prefix}.{node.target}")
            copied = graph.node_copy(node, lambda a: local[a.name])
            if node.op in ("call_module", "get_attr"):
                copied.target = f"{prefix}.{node.target}"
            local[n.name] = copied
        sides.append(out)
    combined = _combine(graph, sides, labels)
    graph.output(combined)
    gm = torch.fx.GraphModule(root, graph, type(zipped_gm).__name__)
    return gm.to(model_device(zipped_gm))


def _copy_attr_tensor(root: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    *path, leaf = name.split(".")
    mod = root
    for part in path:
        if not hasattr(mod, part):
            mod.add_module(part, torch.nn.Module())
        mod = getattr(mod, part)
    mod.register_buffer(leaf, value)


def fx_map(value, fn):
    return torch.fx.node.map_arg(value, fn)


def _combine(graph, outs: list, labels: str):
    """Every side's outputs: averaged (shared labels) or concatenated along
    the last axis (each model's own classes)."""
    a = outs[0]
    if isinstance(a, (tuple, list)):
        return type(a)(_combine(graph, list(xs), labels) for xs in zip(*outs))
    if isinstance(a, dict):
        return {k: _combine(graph, [o[k] for o in outs], labels) for k in a}
    if not isinstance(a, torch.fx.Node):
        return a
    if labels == "disjoint":
        return graph.call_function(torch.cat, (list(outs),), {"dim": -1})
    total = outs[0]
    for o in outs[1:]:
        total = graph.call_function(operator.add, (total, o))
    return graph.call_function(operator.mul, (total, 1.0 / len(outs) if len(outs) > 2 else 0.5))
