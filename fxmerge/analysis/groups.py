"""Permutation groups: what the analysis pass found, in terms a user reads.

``build_groups`` collects the unpinned roots of the IR into ``Group``s:

* atoms: ``residual``, ``hidden``, ``concat``, ``output`` (one permutation);
* product outers: ``heads`` (attention) or ``blocks`` (grouped convolution,
  GroupNorm): whole blocks move;
* inner families of a product: ``head_dim_qk``, ``head_dim_v``,
  ``block_inner``, with ``parent`` (the outer group) and one permutation per
  block (``blocks``), or one shared by every block.

Every group lists its members exactly (``Member``): which slice of which
axis of which tensor it permutes, and how (a plain re-indexing of the slice,
whole blocks of it, or one block's within-block order), so the permutation
can be applied from the description alone (``fxmerge.analysis.apply``).
"""
from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np
import torch
import torch.fx as fx

from .ir import Concat, Dep, Dim, Product, find, roots_in
from .permute import PermutationSampler, permute_tensor, provides
from fxmerge.analysis.rules.registry import tensors_in
from fxmerge.runtime.tensors import set_tensor


@dataclass(frozen=True)
class Member:
    """One slice of one tensor axis that a group permutes.

    The slice ``[start, stop)`` of axis ``axis`` of ``param`` is re-indexed
    by the group's permutation ``perm`` (``new[i] = old[perm[i]]``):

    * plain (``block_size`` None): element ``start + i`` of the new tensor is
      element ``start + perm[i]`` of the old one;
    * ``block_size`` n: the slice is blocks of n entries that move whole
      (block ``p`` of the new slice is block ``perm[p]`` of the old one);
    * ``block`` b: the group holds one permutation per block and this member
      takes its ``b``-th;
    * ``rows`` ``(axis2, start2, stop2)``: the re-indexing applies only to the
      entries whose index along ``axis2`` lies in ``[start2, stop2)`` (the
      input channels of one group of a grouped convolution, read by that
      group's output rows).

    Members are applied in the old tensor's coordinates, those with ``rows``
    first, then deeper ``depth`` (the within-block orders) before shallower
    (the blocks that carry them).
    """

    param: str
    axis: int
    start: int
    stop: int
    block_size: Optional[int] = None
    block: Optional[int] = None
    depth: int = 0
    rows: Optional[tuple] = None


@dataclass
class Group:
    """A set of tensor axes (slices of them) that share one permutation.

    ``kind`` is one of ``residual``, ``hidden``, ``concat``, ``heads``,
    ``head_dim_qk``, ``head_dim_v``, ``blocks``, ``block_inner``, ``output``.
    Inner groups (``head_dim_*``, ``block_inner``) hold one permutation per
    distinct root in ``roots`` (one per block of their ``parent`` group, or a
    single one shared by every block).
    """

    id: int
    kind: str
    size: int
    members: list = field(default_factory=list)  # [(name, axis)], each once
    nodes: list = field(default_factory=list)
    parent: Optional[int] = None
    blocks: int = 1
    numel: int = 0
    roots: list = field(default_factory=list, repr=False)
    slices: list = field(default_factory=list, repr=False)  # [Member]
    parent_group: Optional["Group"] = field(default=None, repr=False)

    @property
    def size_label(self) -> str:
        """``size``, or ``blocksxsize`` for groups with one permutation per block."""
        return f"{self.blocks}x{self.size}" if self.blocks > 1 and self.kind in INNER_KINDS else str(self.size)

    @property
    def has_params(self) -> bool:
        return bool(self.members)

    @property
    def permutations(self) -> int:
        """How many independent permutations the group holds."""
        return len(self.roots)


INNER_KINDS = ("head_dim_qk", "head_dim_v", "head_dim", "block_inner")


def walk_roots(lay, on_atom, on_product, seen: set) -> None:
    """Call ``on_atom(root)`` for every unstructured root and
    ``on_product(root, product)`` for every product root inside a layout."""
    for r in roots_in(lay, seen):
        if r.structure is None:
            on_atom(r)
        else:
            on_product(r, r.structure)


def axis_slices(lay, offset: int = 0, depth: int = 0):
    """``(root, start, stop, block_size, depth)`` for every permutable root
    inside one axis layout, in the old tensor's coordinates: what
    ``PermutationSampler.index`` composes, spelled out slice by slice."""
    if isinstance(lay, Dep):
        return
    r = find(lay)
    if r.pinned:
        return
    s = r.structure
    if s is None:
        if r.size >= 1:
            yield r, offset, offset + r.size, None, depth
        return
    if isinstance(s, Concat):
        off = offset
        for p in s.parts:
            yield from axis_slices(p, off, depth)
            off += p.size
        return
    n = s.inner_size
    # the blocks move whole: the outer's own members, scaled to blocks of n
    # (an outer may itself be structured: blocks of blocks)
    outer_members = list(axis_slices(s.outer, 0, 0))
    below = 1 + max((m[4] for m in outer_members), default=0)
    # within-block orders first (deeper than everything that moves the
    # blocks), in old block coordinates
    for b, inner in enumerate(s.inners):
        yield from axis_slices(inner, offset + b * n, depth + below)
    for root, start, stop, block_size, rel in outer_members:
        yield root, offset + start * n, offset + stop * n, (block_size or 1) * n, depth + rel


def dep_slices(lays, axis: int):
    """Slices of a dependent axis: per block of the axis that provides its
    key, ``(root, start, stop, block_size, depth, rows)``."""
    lay = lays[axis]
    b = next((i for i, l in enumerate(lays) if isinstance(l, Dim) and provides(l, lay.key)), None)
    if b is None:
        return
    lb = find(lays[b])
    per_row = 1 if lb is find(lay.key) else lb.structure.inner_size
    for k, entry in enumerate(lay.table):
        if isinstance(entry, Dep):
            continue  # deeper dependencies are collapsed before members are read
        for root, start, stop, block_size, depth in axis_slices(entry):
            yield root, start, stop, block_size, depth, (b, k * per_row, (k + 1) * per_row)


def build_groups(members: dict, member_shapes: dict, member_is_param: dict, layouts: dict, gm: fx.GraphModule) -> list:
    """Every group of the IR, in graph order (see the module docstring)."""
    atoms: dict[int, Dim] = {}
    outers: dict[int, Dim] = {}
    inner_of: dict[int, int] = {}  # inner root uid -> outer root uid
    block_orders: list = []  # the inner roots of every product, block by block
    inner_edges: list = []

    def on_atom(r):
        if not r.pinned:  # size 1: a widenable segment (nothing to permute)
            atoms[r.uid] = r

    def on_product(r, s: Product):
        o = find(s.outer)
        if o.pinned or o.size < 2 or o.structure is not None:
            # blocks fixed in place, or following a structured dim: no
            # permutation of their own (their parts carry it)
            return
        outers[o.uid] = o
        inner_roots = [find(i) for i in s.inners]
        block_orders.append(inner_roots)
        for i in inner_roots:
            inner_edges.append((inner_roots[0].uid, i.uid))
            inner_of[i.uid] = o.uid

    seen: set = set()
    all_layouts = [lay for lays in members.values() for lay in lays]
    for value in layouts.values():
        for tl in tensors_in(value):
            all_layouts.extend(tl.lays)
    for lay in all_layouts:
        walk_roots(lay, on_atom, on_product, seen)

    # inner roots of one product form a family: one group per connected family
    family = _components(inner_edges)
    family_order: dict = {}  # family -> its roots in block order, each distinct root once
    for inner_roots in block_orders:
        fam = family[inner_roots[0].uid]
        if fam not in family_order:
            family_order[fam] = list({r.uid: r for r in inner_roots}.values())
    buckets: dict = defaultdict(list)
    for uid, r in atoms.items():
        if uid in outers:
            continue  # outer roots are their own ("heads"/"blocks") groups below
        buckets[family.get(uid, ("atom", uid))].append(r)
    groups: list[Group] = []
    root_group: dict[int, Group] = {}
    for uid, o in outers.items():
        g = Group(id=-1, kind="blocks", size=o.size, roots=[o])
        groups.append(g)
        root_group[uid] = g
    for key, roots in buckets.items():
        hints = set().union(*(r.hints for r in roots))
        parent_uid = next((inner_of[r.uid] for r in roots if r.uid in inner_of), None)
        if parent_uid is not None:
            kind = "head_dim_qk" if "qk" in hints else "head_dim_v" if "v" in hints else "block_inner"
            if kind != "block_inner":
                root_group[parent_uid].kind = "heads"
            roots = family_order[key]
        elif "output" in hints:
            kind = "output"
        elif "residual" in hints:
            kind = "residual"
        elif "concat" in hints:
            kind = "concat"
        else:
            kind = "hidden"
        g = Group(id=-1, kind=kind, size=roots[0].size, roots=roots)
        if parent_uid is not None:
            g.blocks = outers[parent_uid].size
            g.parent_group = root_group[parent_uid]
        groups.append(g)
        for r in roots:
            root_group[r.uid] = g
    _place_members(root_group, members, member_shapes, layouts)
    # stable order: by first graph node touched, outers before their inners
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    kind_order = {"heads": 0, "blocks": 0, "head_dim_qk": 1, "head_dim_v": 2}
    groups.sort(key=lambda g: (min((order.get(n, 1 << 30) for n in g.nodes), default=1 << 30), kind_order.get(g.kind, 3)))
    number(groups)
    return groups


def _place_members(root_group: dict, members: dict, member_shapes: dict, layouts: dict) -> None:
    """Each group's members (exact slices and (name, axis) pairs), the
    nodes whose values it touches and its number of elements."""
    # members: exact slices, and (name, axis) pairs
    for name, lays in members.items():
        for axis, lay in enumerate(lays):
            if isinstance(lay, Dep):
                entries = [(*e[:5], e[5]) for e in dep_slices(lays, axis)]
            else:
                entries = [(*e, None) for e in axis_slices(lay)]
            for root, start, stop, block_size, depth, rows in entries:
                g = root_group.get(root.uid)
                if g is None:
                    continue
                block = g.roots.index(root) if len(g.roots) > 1 else None
                g.slices.append(Member(name, axis, start, stop, block_size, block, depth, rows))
                if (name, axis) not in g.members:
                    g.members.append((name, axis))
    for node, value in layouts.items():
        hit = set()
        for tl in tensors_in(value):
            for lay in tl.lays:
                walk_roots(lay, lambda r: hit.add(r.uid), lambda r, s: hit.add(find(s.outer).uid), set())
        for g in {id(root_group[u]): root_group[u] for u in hit if u in root_group}.values():
            g.nodes.append(node.name)
    for g in {id(g): g for g in root_group.values()}.values():
        for name in dict.fromkeys(n for n, _ in g.members):
            g.numel += int(np.prod(member_shapes[name]))


def number(groups: list) -> None:
    """Give ``groups`` the ids 0, 1, ... in order and their inner groups
    the ids of their parents."""
    for i, g in enumerate(groups):
        g.id = i
    for g in groups:
        g.parent = g.parent_group.id if g.parent_group is not None and g.parent_group.id >= 0 else None


def _components(edges) -> dict:
    """Connected components of an undirected graph given as edges: node ->
    component label (the smallest node of the component)."""
    adj: dict = defaultdict(set)
    for a, b in edges:
        adj[a].add(b)
        adj[b].add(a)
    label: dict = {}
    for start in sorted(adj):
        if start in label:
            continue
        stack = [start]
        label[start] = start
        while stack:
            u = stack.pop()
            for v in adj[u]:
                if v not in label:
                    label[v] = start
                    stack.append(v)
    return {u: ("family", c) for u, c in label.items()}


class PermutationGroups:
    """The result of the analysis: groups, pinned op kinds, and the IR."""

    def __init__(self, traced, analysis, model_name: str = ""):
        self.traced = traced
        self.gm = traced.gm
        self.model_name = model_name
        self.members = {k: tuple(v) for k, v in analysis.members.items()}
        self.member_shapes = analysis.member_shapes
        self.member_is_param = analysis.member_is_param
        self.layouts = analysis.layouts
        self.pinned = sorted(analysis.pinned.values(), key=lambda p: (-p.count, p.kind))
        # records of nodes that were not made opaque afterwards
        opaque_nodes = {n for p in analysis.pinned.values() for n in p.nodes}
        self.contractions = {k: c for k, c in analysis.contractions.items() if c.node not in opaque_nodes}
        self.normalizations = {k: n for k, n in analysis.normalizations.items() if k not in opaque_nodes}
        self.activation_products = {k: p for k, p in analysis.activation_products.items() if p.node not in opaque_nodes}
        self.probes = {k: p for k, p in analysis.probes.items() if k not in opaque_nodes}
        self.mixings = [m for m in analysis.mixings if m.node not in opaque_nodes]
        self.rule_pins = dict(analysis.rule_pins)
        self.all_groups = build_groups(self.members, self.member_shapes, self.member_is_param, self.layouts, self.gm)
        # only groups that own parameter axes are reported as groups
        self.groups = [g for g in self.all_groups if any(self.member_is_param[m] for m, _ in g.members)]
        for g in self.all_groups:
            g.id = -1
        number(self.groups)
        self._by_root = {r.uid: g for g in self.all_groups for r in g.roots}
        # other state-dict names of a member tensor (a module shared by two places; set by ``analyze``)
        self.aliases: dict = {}
        # buffers outside the state dict (set by ``analyze``): the export marks them
        self.non_persistent: set = set()

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self):
        return iter(self.groups)

    def by_kind(self, kind: str) -> list:
        return [g for g in self.groups if g.kind == kind]

    def group_of_root(self, uid: int) -> Optional[Group]:
        return self._by_root.get(uid)

    # -- permutations ------------------------------------------------------
    def sampler(self, rng: np.random.Generator, groups: Optional[Iterable[Group]] = None) -> PermutationSampler:
        active = None
        if groups is not None:
            active = {r.uid for g in groups for r in g.roots}
        return PermutationSampler(rng, active)

    def permute_state(self, state: dict, sampler: PermutationSampler) -> dict:
        """Return ``{name: permuted tensor}`` for every member found in
        ``state``, and for every other name of the same tensor there (a
        shared module)."""
        out = {}
        for name, lays in self.members.items():
            if name in state:
                out[name] = permute_tensor(state[name], lays, sampler)
                for alias in self.aliases.get(name, ()):
                    if alias in state and alias not in self.members:
                        out[alias] = out[name]
        return out

    def permuted_copy(self, model: torch.nn.Module, sampler: PermutationSampler) -> torch.nn.Module:
        """A copy of ``model`` with every group permuted by ``sampler``, its
        parameters and buffers alike (non-persistent buffers included, which
        ``permute_state`` on a state dict cannot reach): the same function."""
        out = copy.deepcopy(model)
        tensors = dict(out.named_parameters(remove_duplicate=False))
        tensors.update(out.named_buffers(remove_duplicate=False))
        with torch.no_grad():
            for name, value in self.permute_state(tensors, sampler).items():
                set_tensor(out, name, value.detach().clone())
        return out

    # -- presentation (fxmerge.analysis.export) --------------------------------------
    def to_dict(self) -> dict:
        from .export import groups_to_dict

        return groups_to_dict(self)

    def to_json(self, **kw) -> str:
        from .export import groups_to_json

        return groups_to_json(self, **kw)

    def to_networkx(self):
        from .export import groups_to_networkx

        return groups_to_networkx(self)

    def to_dot(self) -> str:
        from .export import groups_to_dot

        return groups_to_dot(self)

    def table(self, max_members: int = 3) -> str:
        from .export import groups_table

        return groups_table(self, max_members)

    @property
    def output_roots(self) -> set:
        """The roots of the model's own outputs (each model's classes)."""
        return {r.uid for g in self.all_groups if g.kind == "output" for r in g.roots}

    def covered_fraction(self, module_types=(torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear,
                                            torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d,
                                            torch.nn.ConvTranspose3d)) -> float:
        """Share of conv/linear weight elements with at least one axis in a
        permutable group."""
        covered = total = 0
        covered_names = {m for g in self.groups for m, _ in g.members}
        counted = set()
        for mname, mod in self.gm.named_modules():
            if isinstance(mod, module_types) and getattr(mod, "weight", None) is not None:
                n = mod.weight.numel()
                total += n
                counted.add(f"{mname}.weight")
                if f"{mname}.weight" in covered_names:
                    covered += n
        # weights of every other contraction (functional convolutions and
        # linears on get_attr weights, projections inside attention modules)
        for c in self.contractions.values():
            if c.weight is None or c.weight in counted:
                continue
            counted.add(c.weight)
            n = int(np.prod(self.member_shapes.get(c.weight, (0,))))
            total += n
            if c.weight in covered_names:
                covered += n
        return covered / total if total else 0.0
