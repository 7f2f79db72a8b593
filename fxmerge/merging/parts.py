"""Parts of a graph that run once per model view (see ``views``).

Widened in place, some ops would combine both models' features, which the
ensemble of per-model views never does:

* an op that combines the features along a widened axis (``Mixing``:
  GroupNorm with one group, softmax or a reduction over channels, attention
  scores summed over channels);
* a layer that reads widened channels into channels an op pins (MobileViT
  folds its channels into the batch, an LSTM reads them in order): its
  merged rows would read both models' inputs (``pinned_layers``).

Each runs once per model view together with the nodes after it that carry
its per-model result on no free axis (a reduction's output until it meets
the features again, attention scores until they weight the values, a pinned
axis until a layer writes a free one): those are the ``ViewPart``s. The
parts are found on the source graph, the same whatever the plan, so the cost
model (``PartCost``) counts exactly what the rewrite runs per view.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from fxmerge.analysis.ir import is_pinned
from fxmerge.analysis.rules.registry import op_kind, tensors_in, weight_layouts
from fxmerge.analysis.tracing import TensorInfo


@dataclass(frozen=True)
class ViewPart:
    """Connected ops that combine widened features, with the nodes that
    carry their per-model results: run once per model view as soon as one of
    ``lays`` widens."""

    kinds: tuple  # op kinds of the combining ops, for the report
    lays: tuple  # the widened layouts they combine
    nodes: frozenset  # names


def view_parts(pg) -> list:
    """The parts the combining ops span, joined where they touch."""
    nodes = list(pg.gm.graph.nodes)
    by_name = {n.name: n for n in nodes}
    computed = activations(nodes)
    seeds = [(m.node, m.kind, m.lays) for m in pg.mixings]
    for name, (kind, lay, _) in pinned_layers(pg).items():
        if not _carries_features(pg, by_name[name]):  # (a layer over the tokens keeps the channels free)
            seeds.append((name, kind, (lay,)))
    member: set = set()
    for name, _, _ in seeds:
        frontier = [by_name[name]]
        member.add(name)
        while frontier:
            n = frontier.pop()
            if n.name in computed and _carries_features(pg, n):
                continue  # the per-model result is back on a free axis: placed there per view
            for u in n.users:
                if u.op != "output" and u.name not in member:
                    member.add(u.name)
                    frontier.append(u)
    parts = []
    for names in closed_components(nodes, member):
        inside = set(names)
        mine = [s for s in seeds if s[0] in inside]
        parts.append(ViewPart(tuple(dict.fromkeys(kind for _, kind, _ in mine)),
                              tuple(lay for _, _, lays in mine for lay in lays), frozenset(names)))
    return parts


def activations(nodes: list) -> set:
    """Names of the nodes computed from the inputs (not from weights alone)."""
    out = set()
    for n in nodes:
        if n.op == "placeholder" or any(i.name in out for i in n.all_input_nodes):
            out.add(n.name)
    return out


def _carries_features(pg, node: fx.Node) -> bool:
    """Whether one of ``node``'s axes is a free layout (a widened axis can
    hold each model's result), or the node is no tensor at all."""
    tls = tensors_in(pg.layouts.get(node))
    if not tls:
        return True
    return any(not is_pinned(lay) for t in tls for lay in t.lays)


def closed_components(nodes: list, member: set) -> list:
    """The connected components of ``member``, each grown by the nodes on a
    path from one of its nodes to another (a slice of the tokens taken out
    and put back): a part runs as one module, so it must hold every node
    between its own. Two parts apart in the graph stay apart."""
    while True:
        components = _components(nodes, member)
        grown = set(member)
        for names in components:
            grown |= _between(nodes, set(names))
        if grown == member:
            return components
        member = grown


def _components(nodes: list, member: set) -> list:
    """The connected components of ``member`` over the graph's edges, each
    a list of names in graph order."""
    parent = {name: name for name in member}

    def root(name):
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    for n in nodes:
        if n.name in member:
            for i in n.all_input_nodes:
                if i.name in member:
                    parent[root(i.name)] = root(n.name)
    components: dict = {}
    for n in nodes:
        if n.name in member:
            components.setdefault(root(n.name), []).append(n.name)
    return list(components.values())


def _between(nodes: list, member: set) -> set:
    """Nodes on a path from one member to another."""
    below, above = set(), set()
    for n in nodes:
        if any(i.name in member or i.name in below for i in n.all_input_nodes):
            below.add(n.name)
    for n in reversed(nodes):
        if any(u.name in member or u.name in above for u in n.users):
            above.add(n.name)
    return (below & above) - member


def pinned_layers(pg) -> dict:
    """Layers that read widened channels into pinned ones (an op downstream
    fixes their order), other than the model's output (``linear_to_output``:
    there a merged row averages the models' outputs as the ensemble does).
    Node name -> (op kind, the layout of the widened input, the number of
    output channels)."""
    nodes = {n.name: n for n in pg.gm.graph.nodes}
    linear = linear_to_output(pg.gm)
    out = {}
    for c in pg.contractions.values():
        node = nodes[c.node]
        tls = tensors_in(pg.layouts.get(node))
        if node in linear or len(tls) != 1 or not is_pinned(tls[0].lays[c.output_axis]):
            continue
        lay = weight_layouts(pg, c)[c.weight_in_axis]
        if is_pinned(lay):
            continue  # reads no widened channel (a layer over the tokens, a table): it runs per role
        kind = op_kind(node, pg.gm.get_submodule(node.target) if node.op == "call_module" else None)
        out[c.node] = (kind, lay, tls[0].shape[c.output_axis])
    return out


# Ops that pass their tensor inputs on linearly (moved, summed, averaged,
# scaled by a number): a merged row before them averages the models' outputs
# as the ensemble does.
_LINEAR_FUNCTIONS = {operator.add, operator.sub, operator.getitem, operator.truediv, operator.mul, operator.neg,
                     torch.add, torch.sub, torch.stack, torch.cat, torch.mean, torch.sum, torch.flatten}
_LINEAR_METHODS = {"add", "sub", "mul", "div", "mean", "sum", "view", "reshape", "flatten", "permute", "transpose",
                   "contiguous", "squeeze", "unsqueeze"}
_LINEAR_MODULES = (torch.nn.Identity, torch.nn.Dropout, torch.nn.Flatten)


def linear_to_output(gm) -> set:
    """The nodes whose value reaches the graph's output through linear ops
    only (moved, summed, averaged, scaled by a number)."""
    through: set = set()  # such ops, and the output
    for node in reversed(gm.graph.nodes):
        if node.op == "output" or (node.users and all(u in through for u in node.users) and _linear(gm, node)):
            through.add(node)
    return {n for n in gm.graph.nodes if n.users and all(u in through for u in n.users)}


def _linear(gm, node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _LINEAR_MODULES)
    if not (node.op == "call_function" and node.target in _LINEAR_FUNCTIONS
            or node.op == "call_method" and node.target in _LINEAR_METHODS):
        return False
    factors = [i for i in node.all_input_nodes if isinstance(i.meta.get("fxm_value"), TensorInfo)]
    return node.target not in (operator.mul, operator.truediv, "mul", "div") or len(factors) <= 1
