"""Per-model views: the rewrite's fallback where widening in place would mix
the models.

A widened tensor is the two models' tensors side by side, sharing the merged
channels. That holds for every op that treats one widened axis at a time. A
tensor with two widened axes (a token mixer's hidden layer, channels by
hidden tokens) would hold cross entries, model A's channels against model
B's hidden units, that neither model computes: there the widened graph is
not the ensemble of its views. ``view_regions`` finds the parts of the graph
that compute or read such tensors; ``emit_views`` replaces each part by a
``ModelViews`` module that runs the part once per model, on that model's
view of its inputs (its own and the merged channels, at its source shapes)
with that model's aligned weights, and places the outputs back on their
widened axes, a merged channel taking the mean of the two views. The cost
model counts such a part twice at the source's cost (``CostModel``), as the
module computes it.

Ops that combine widened features (a softmax or GroupNorm over channels, a
layer into pinned channels) are the other such parts (``parts.view_parts``).
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.fx as fx

from fxmerge.errors import RewriteError
from fxmerge.analysis.ir import layout_size
from fxmerge.analysis.rules.registry import tensors_in
from fxmerge.analysis.tracing import TensorInfo
from fxmerge.runtime.layers import ModelViews, RoleSplit
from fxmerge.runtime.tensors import set_tensor
from .parts import activations, closed_components, view_parts
from .widening import LayoutWidener, model_bit, role_order


SOURCE_NAME = "fxm_source_name"  # a part's output: the name of the source node it stands for


@dataclass
class Region:
    """A connected part of the source graph run per model view."""

    nodes: list = field(default_factory=list)  # names, graph order
    inputs: list = field(default_factory=list)  # fx.Nodes of the source graph read from outside (tensors)
    constants: dict = field(default_factory=dict)  # numbers read from outside (sizes): their source values
    # fx.Nodes each view computes again: sizes read off its inputs, tensors
    # made from weights alone (a position table: each model's own)
    recomputed: list = field(default_factory=list)
    outputs: list = field(default_factory=list)  # fx.Nodes of the region read outside it


def grown_axes(pg, widener: LayoutWidener, node: fx.Node) -> list:
    """The axes of ``node``'s tensor that widen under the plan."""
    tls = tensors_in(pg.layouts.get(node))
    if len(tls) != 1 or not isinstance(node.meta.get("fxm_value"), TensorInfo):
        return []
    return [axis for axis, lay in enumerate(tls[0].lays) if widener.size(lay) != layout_size(lay)]


def view_regions(pg, widener: LayoutWidener) -> list:
    """The parts of the graph that compute a tensor widened along two axes,
    with the nodes that read one, and the ``parts.view_parts`` whose combined
    axes widen, as connected regions in graph order."""
    nodes = list(pg.gm.graph.nodes)
    coupled = {n.name for n in nodes if n.op not in ("get_attr", "placeholder", "output")
               and len(grown_axes(pg, widener, n)) > 1}
    member = set(coupled)
    for n in nodes:
        if n.name in coupled:
            member |= {u.name for u in n.users if u.op != "output"}
    for part in view_parts(pg):
        if any(widener.size(lay) != layout_size(lay) for lay in part.lays):
            member |= part.nodes
    regions = [Region(nodes=names) for names in closed_components(nodes, member)]
    computed = activations(nodes)
    by_name = {n.name: n for n in nodes}
    out = []
    for region in regions:
        inside = set(region.nodes)
        for name in region.nodes:
            n = by_name[name]
            for i in n.all_input_nodes:
                if (i.name in inside or i.op == "get_attr" or i in region.inputs or i in region.constants
                        or i in region.recomputed):
                    continue
                value = i.meta.get("fxm_value")
                chain = _weights_only(i, computed)
                if chain is not None:
                    _recompute(region, chain)  # each view from its own model's weights
                elif isinstance(value, TensorInfo):
                    region.inputs.append(i)
                elif _read_sizes(i, region):
                    pass  # recomputed per view off its inputs: the view's own channels, the batch at hand
                elif _is_constant(value):
                    region.constants[i] = value  # a number the graph fixed
                else:
                    raise RewriteError(f"cannot run '{name}' per model view: it reads '{i.name}', "
                                       "neither a tensor nor a number")
            if any(u.name not in inside for u in n.users):
                region.outputs.append(n)
        out.append(region)
    return out


_SIZE_FUNCTIONS = {getattr, operator.getitem, operator.floordiv, operator.mul, operator.add, operator.sub,
                   operator.truediv, operator.pow, operator.mod, operator.neg, int}


def _read_sizes(node: fx.Node, region: Region) -> bool:
    """If ``node`` is a size computed from tensors by shape reads and
    arithmetic (``b, c, h, w = x.shape``; ``c // heads``), let the region
    recompute it from those tensors (added to its inputs) and return True."""
    chain, leaves, stack = [], [], [node]
    while stack:
        n = stack.pop()
        if n in chain or n in leaves:
            continue
        if isinstance(n.meta.get("fxm_value"), TensorInfo):
            leaves.append(n)
            continue
        if not ((n.op == "call_function" and n.target in _SIZE_FUNCTIONS)
                or (n.op == "call_method" and n.target in ("size", "dim"))):
            return False
        chain.append(n)
        stack.extend(n.all_input_nodes)
    if not leaves or any(t.name in region.nodes for t in leaves):
        return False
    region.inputs.extend(t for t in leaves if t not in region.inputs)
    _recompute(region, chain)
    return True


def _weights_only(node: fx.Node, computed: set) -> Optional[list]:
    """The nodes that make ``node`` from weights alone (it and its
    ancestors, attributes included), or None where an input reaches it."""
    chain, stack = [], [node]
    while stack:
        n = stack.pop()
        if n in chain:
            continue
        if n.name in computed:
            return None
        chain.append(n)
        stack.extend(n.all_input_nodes)
    return chain


def _recompute(region: Region, chain: list) -> None:
    order = {n: i for i, n in enumerate(chain[0].graph.nodes)}
    region.recomputed = sorted(set(region.recomputed) | set(chain), key=order.get)


def _is_constant(value) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_is_constant(v) for v in value)
    return isinstance(value, (int, float, bool, type(None), torch.Size, str, torch.dtype, torch.device))


def _view_index(widener: LayoutWidener, lay, bit: int) -> np.ndarray:
    """Positions of the widened axis that carry model ``bit``'s view."""
    return np.flatnonzero(widener.widen(lay).reads(bit))


def _view_graph(pg, region: Region) -> fx.GraphModule:
    """The region as a graph of its own: its inputs as placeholders, its
    outputs as a tuple, A's modules and attributes (copied)."""
    by_name = {n.name: n for n in pg.gm.graph.nodes}
    graph = fx.Graph()
    env: dict = {}
    for i, node in enumerate(region.inputs):
        env[node] = graph.placeholder(f"input_{i}")
    env.update(region.constants)
    for node in region.recomputed:
        env[node] = graph.node_copy(node, lambda a: env[a])
    for name in region.nodes:
        node = by_name[name]
        for i in node.all_input_nodes:
            if i not in env and i.op == "get_attr":
                env[i] = graph.node_copy(i)
        env[node] = graph.node_copy(node, lambda a: env[a])
    graph.output(tuple(env[o] for o in region.outputs))
    return copy.deepcopy(fx.GraphModule(pg.gm, graph))


def _view_state(view: fx.GraphModule, pg, state: dict, widener: LayoutWidener, bit: int) -> None:
    """Give ``view`` one model's aligned weights, each widened axis
    restricted (and ordered) as that model's view of it."""
    for name, value in list(view.state_dict().items()):
        if name not in state:
            continue
        t = state[name]
        for axis, lay in enumerate(pg.members.get(name, ())):
            w = widener.widen(lay)
            src = w.src[np.flatnonzero(w.reads(bit))]
            if not np.array_equal(src, np.arange(t.shape[axis])):
                t = t.index_select(axis, torch.as_tensor(src, dtype=torch.long, device=t.device))
        if tuple(t.shape) != tuple(value.shape):
            raise RewriteError(f"cannot run '{name}' per model view: its view has shape {tuple(t.shape)}, "
                               f"the source {tuple(value.shape)}")
        set_tensor(view, name, t.detach().clone())


def views_module(pg, region: Region, widener: LayoutWidener, states: list) -> ModelViews:
    """The ``ModelViews`` module of one region, from every model's aligned state."""
    template = _view_graph(pg, region)
    views = []
    for bit, state in zip(widener.view_bits, states):
        view = copy.deepcopy(template) if views else template
        _view_state(view, pg, state, widener, bit)
        views.append(view)
    gathers = []
    for bit in widener.view_bits:
        per_input = []
        for node in region.inputs:
            lays = tensors_in(pg.layouts.get(node))
            axes = grown_axes(pg, widener, node)
            per_input.append([(axis, _view_index(widener, lays[0].lays[axis], bit)) for axis in axes])
        gathers.append(per_input)
    scatters, scatter_index = [], []
    for node in region.outputs:
        axes = grown_axes(pg, widener, node)
        if len(axes) > 1:
            raise RewriteError(f"cannot run '{node.name}' per model view: its output, read outside the part, "
                               "widens along two axes")
        if not axes:
            scatters.append(None)
            scatter_index.append([])
            continue
        lay = tensors_in(pg.layouts.get(node))[0].lays[axes[0]]
        scatters.append((axes[0], widener.size(lay)))
        scatter_index.append([_view_index(widener, lay, bit) for bit in widener.view_bits])
    return ModelViews(views, gathers, scatters, scatter_index)


def _early_readers(gm: fx.GraphModule, region: Region, last: fx.Node) -> list:
    """Nodes outside the part that read its outputs, or such a node's
    result, before its last node (a shape read where the forward starts):
    they move after the part's call, in graph order."""
    inside = set(region.nodes)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    readers = {u.name for o in region.outputs for u in o.users}  # outputs are the source graph's nodes
    stack = [n for n in gm.graph.nodes if n.name in readers]
    early: set = set()
    while stack:
        n = stack.pop()
        if n.name in inside or n in early or order[n] > order[last]:
            continue
        early.add(n)
        stack.extend(n.users)
    return sorted(early, key=order.get)


def emit_views(gm: fx.GraphModule, pg, widener: LayoutWidener, states: list, regions: list) -> list:
    """Replace every region of ``gm`` (the widened copy of ``pg``'s graph;
    ``view_regions``) by its ``ModelViews`` module. Returns the names of the
    nodes now run per view."""
    replaced = []
    for region in regions:
        target = f"fxm_views_{region.nodes[0]}"
        gm.add_submodule(target, views_module(pg, region, widener, states))
        nodes = {n.name: n for n in gm.graph.nodes}
        inside = set(region.nodes)
        last = nodes[region.nodes[-1]]
        early = _early_readers(gm, region, last)
        with gm.graph.inserting_after(last):
            call = gm.graph.call_module(target, tuple(nodes[i.name] for i in region.inputs))
        previous = call
        for j, o in enumerate(region.outputs):
            with gm.graph.inserting_after(previous):
                previous = gm.graph.call_function(operator.getitem, (call, j))
            previous.meta[SOURCE_NAME] = o.name
            nodes[o.name].replace_all_uses_with(previous, delete_user_cb=lambda u: u.name not in inside)
        for n in early:  # after the part, in their order
            previous.append(n)
            previous = n
        modules, feeds = set(), {}
        for name in reversed(region.nodes):
            node = nodes[name]
            feeds.update((i.name, i) for i in node.all_input_nodes if i.op == "get_attr")
            if node.op == "call_module":
                modules.add(node.target)
            gm.graph.erase_node(node)
        for i in feeds.values():
            if not i.users:
                gm.graph.erase_node(i)
        still_called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
        for m in modules - still_called:
            gm.delete_submodule(m)
        replaced += region.nodes
    if replaced:
        _restore_names(gm)
    return replaced


def _restore_names(gm: fx.GraphModule) -> None:
    """Give each part's outputs back the names of the source nodes they
    replace (graphs are matched by node name: least squares reads a layer's
    input in the merged model under its name in the sources)."""
    graph, env = fx.Graph(), {}
    for n in gm.graph.nodes:
        if SOURCE_NAME in n.meta:
            args = fx.node.map_arg(n.args, lambda a: env[a])
            env[n] = graph.create_node(n.op, n.target, args, {}, name=n.meta[SOURCE_NAME])
            env[n].meta = dict(n.meta)
        else:
            env[n] = graph.node_copy(n, lambda a: env[a])
    gm.graph = graph
    gm.recompile()


def role_split_layers(gm: fx.GraphModule, pg, widener: LayoutWidener, states: list) -> list:
    """Give every layer whose weights do not index a widened axis of its
    tensor (a Linear over the tokens while the channels widen) one weight
    per role of that axis (``RoleSplit``): a model's own weights on the
    positions only it reads, the mean of its readers' weights on the others
    (the merged layer itself where every model reads them). Returns their
    names."""
    nodes = {n.name: n for n in gm.graph.nodes}
    sources = {n.name: n for n in pg.gm.graph.nodes}
    done = []
    for c in pg.contractions.values():
        node, source = nodes.get(c.node), sources[c.node]
        if node is None or node.op != "call_module" or c.taps is not None or len(source.all_input_nodes) != 1:
            continue
        out_axes = grown_axes(pg, widener, source)
        in_axes = grown_axes(pg, widener, source.args[0])
        if len(out_axes) != 1 or in_axes != out_axes or out_axes[0] in (0, c.output_axis % len(source.meta["fxm_value"].shape)):
            continue
        axis = out_axes[0]
        w = widener.widen(tensors_in(pg.layouts.get(source))[0].lays[axis])
        merged = gm.get_submodule(node.target)
        layers, indices = [], []
        for role in sorted({int(r) for r in w.role}, key=role_order):
            indices.append(np.flatnonzero(w.role == role))
            if role == widener.shared_role:
                layers.append(merged)  # positions every model reads: the merged layer itself
                continue
            readers = [s for m, s in enumerate(states) if role & model_bit(m)]
            layer = copy.deepcopy(merged)
            for name, _ in list(layer.named_parameters()) + list(layer.named_buffers()):
                full = f"{node.target}.{name}"
                if full in readers[0]:
                    set_tensor(layer, name, (sum(s[full] for s in readers) / len(readers)).detach().clone()
                               if len(readers) > 1 else readers[0][full].detach().clone())
            layers.append(layer)
        gm.add_submodule(node.target, RoleSplit(layers, indices, axis))
        done.append(c.node)
    return done
