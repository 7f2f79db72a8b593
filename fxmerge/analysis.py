"""The permutation-group analysis pass.

``ChannelAnalysis`` is an ``fx.Interpreter`` over an abstract domain: instead
of tensors it propagates layouts (``TL``), dispatching every node to the rule
registered for its op kind. Ops without a rule, and rule instances that cannot
be expressed, are *opaque*: every axis they touch is pinned and the op kind is
reported. ``PermutationGroups`` is the result: the groups of (parameter, axis)
pairs that must share a permutation, with the IR behind them.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import numpy as np
import torch
import torch.fx as fx

from . import rules as _rules  # noqa: F401  (registers every rule)
from .ir import Concat, Dep, Dim, IRConflict, Layout, PermutationSampler, Product, collapse, find, pin
from .rules.registry import RULES, TL, Opaque, RuleContext, tensors_in
from .tracing import TensorInfo, Traced, trace

# Ops that return python values about a tensor's shape, never its contents.
SHAPE_QUERY_METHODS = {"size", "dim", "numel", "nelement", "get_device", "is_contiguous", "is_floating_point"}
SHAPE_QUERY_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda", "requires_grad", "layout", "is_sparse"}
ASSERT_FUNCTIONS = {torch._assert}
try:
    from torch.fx._symbolic_trace import _assert_is_none

    ASSERT_FUNCTIONS.add(_assert_is_none)
except ImportError:  # pragma: no cover
    pass


def op_kind(node: fx.Node, module: Optional[torch.nn.Module] = None) -> str:
    if node.op == "call_module":
        cls = type(module)
        mod = cls.__module__
        name = f"nn.{cls.__name__}" if mod.startswith("torch.nn.modules") else f"{mod}.{cls.__qualname__}"
        return f"call_module:{name}"
    if node.op == "call_function":
        t = node.target
        mod = getattr(t, "__module__", None) or ""
        name = getattr(t, "__qualname__", None) or getattr(t, "__name__", repr(t))
        if mod == "torch.nn.functional":
            return f"call_function:F.{name}"
        if mod in ("_operator", "operator"):
            return f"call_function:operator.{name}"
        if (mod == "torch" or mod.startswith("torch._")) and not mod.startswith("torch.nn"):
            return f"call_function:torch.{name}"
        return f"call_function:{mod}.{name}" if mod else f"call_function:{name}"
    if node.op == "call_method":
        return f"call_method:{node.target}"
    return f"{node.op}:{node.target}"


@dataclass
class PinnedOp:
    kind: str
    reason: str
    nodes: list = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.nodes)


class ChannelAnalysis(fx.Interpreter):
    """Propagates channel-axis layouts through a traced graph."""

    def __init__(self, gm: fx.GraphModule, *, per_model_output: bool = False, known_members: Optional[set] = None):
        super().__init__(gm, garbage_collect_values=False)
        self.per_model_output = per_model_output
        self.known_members = known_members
        self.members: dict[str, list] = {}
        self.member_shapes: dict[str, tuple] = {}
        self.member_is_param: dict[str, bool] = {}
        self.pinned: dict[str, PinnedOp] = {}
        self.layouts: dict[fx.Node, Any] = {}
        self.outputs: list[TL] = []
        self.contractions: dict = {}
        self.activation_products: dict = {}
        self.probes: dict = {}
        self.normalizations: dict = {}

    # -- members -----------------------------------------------------------
    def member(self, name: str, tensor: torch.Tensor) -> TL:
        if name not in self.members:
            shape = tuple(tensor.shape)
            pinned = self.known_members is not None and name not in self.known_members
            self.members[name] = [Dim(s, pinned=pinned) for s in shape]
            self.member_shapes[name] = shape
            self.member_is_param[name] = isinstance(tensor, torch.nn.Parameter)
        return TL(tuple(self.members[name]), self.member_shapes[name], member=name)

    def replace_member_axis(self, name: str, axis: int, old: Layout, new: Layout) -> bool:
        cur = self.members[name][axis]
        if cur is old and isinstance(old, Dim) and not old.touched and old.parent is None and old.structure is None:
            self.members[name][axis] = new
            return True
        return False

    # -- interpretation ----------------------------------------------------
    def run(self) -> None:  # type: ignore[override]
        for node in self.module.graph.nodes:
            self.env[node] = self.layouts[node] = self.run_node(node)

    def run_node(self, n: fx.Node) -> Any:
        meta = n.meta.get("fxm_value")
        if n.op == "placeholder":
            return _fresh_like(meta, pinned=True)
        if n.op == "output":
            for tl in tensors_in(self.env_args(n)):
                self.outputs.append(tl)
                self._pin_output(tl)
            return None
        if n.op == "get_attr":
            obj = _fetch_attr(self.module, n.target)
            if isinstance(obj, torch.Tensor):
                return self.member(n.target, obj)
            return meta
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        module = self.fetch_attr(n.target) if n.op == "call_module" else None
        kind = op_kind(n, module)
        tensor_args = tensors_in((args, kwargs))
        if not _has_tensor(meta) and self._is_shape_query(n, tensor_args):
            return meta
        if n.op == "call_module":
            rule = RULES.for_module(module)
        elif n.op == "call_function":
            rule = RULES.for_function(n.target)
        else:
            rule = RULES.methods.get(n.target)
        if rule is None:
            return self._opaque(n, kind, tensor_args, meta, "no rule for this op kind")
        ctx = RuleContext(self, n, module)
        try:
            result = rule(ctx, *args, **kwargs)
            _check_structure(result, meta)
            return result
        except (Opaque, IRConflict) as e:
            return self._opaque(n, kind, tensor_args, meta, getattr(e, "reason", str(e)))
        except Exception as e:  # a rule that does not understand this instance fails closed
            return self._opaque(n, kind, tensor_args, meta, f"rule failed: {type(e).__name__}: {e}")

    def env_args(self, n):
        return fx.node.map_arg(n.args, lambda a: self.env[a])

    def _is_shape_query(self, n, tensor_args) -> bool:
        if not tensor_args:
            return True
        if n.op == "call_method" and n.target in SHAPE_QUERY_METHODS:
            return True
        if n.op == "call_function":
            if n.target is getattr and len(n.args) > 1 and n.args[1] in SHAPE_QUERY_ATTRS:
                return True
            if n.target in ASSERT_FUNCTIONS or n.target is len:
                return True
        return False

    def _opaque(self, n, kind, tensor_args, meta, reason):
        for tl in tensor_args:
            for lay in tl.lays:
                _safe_pin(lay)
        entry = self.pinned.setdefault(kind, PinnedOp(kind, reason))
        entry.nodes.append(n.name)
        return _fresh_like(meta, pinned=True)

    def _pin_output(self, tl: TL) -> None:
        if self.per_model_output:
            # Each model keeps its own label space: the last axis of the
            # output is per-model, everything else stays fixed.
            for lay in tl.lays[:-1]:
                pin(lay)
            RuleContext.hint(tl.lays[-1], "output")
        else:
            for lay in tl.lays:
                pin(lay)


def _safe_pin(lay):
    try:
        pin(lay)
    except IRConflict:  # pragma: no cover - pinning never conflicts
        pass


def _fetch_attr(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _has_tensor(meta) -> bool:
    if isinstance(meta, TensorInfo):
        return True
    if isinstance(meta, (list, tuple)):
        return any(_has_tensor(m) for m in meta)
    if isinstance(meta, dict):
        return any(_has_tensor(m) for m in meta.values())
    return False


def _fresh_like(meta, *, pinned: bool):
    if isinstance(meta, TensorInfo):
        return TL(tuple(Dim(s, pinned=pinned) for s in meta.shape), tuple(meta.shape))
    if isinstance(meta, (list, tuple)):
        return type(meta)(_fresh_like(m, pinned=pinned) for m in meta)
    if isinstance(meta, dict):
        return {k: _fresh_like(v, pinned=pinned) for k, v in meta.items()}
    return meta


def _check_structure(result, meta) -> None:
    if isinstance(meta, TensorInfo):
        if not isinstance(result, TL):
            raise Opaque("rule returned no layout for a tensor output")
        if tuple(result.shape) != tuple(meta.shape):
            raise Opaque(f"rule returned shape {list(result.shape)}, graph has {list(meta.shape)}")
        return
    if isinstance(meta, (list, tuple)):
        if not isinstance(result, (list, tuple)) or len(result) != len(meta):
            raise Opaque("rule returned a different number of outputs")
        for r, m in zip(result, meta):
            _check_structure(r, m)


# ----------------------------------------------------------------------------
# groups


@dataclass
class Group:
    """A set of (parameter, axis) pairs that share one permutation.

    ``kind`` is one of ``residual``, ``hidden``, ``concat``, ``heads``,
    ``head_dim_qk``, ``head_dim_v``, ``head_dim``, ``blocks``, ``block_inner``,
    ``output``. Inner groups (``head_dim_*``, ``block_inner``) hold one
    permutation per block of their ``parent`` group (``blocks`` of them).
    """

    id: int
    kind: str
    size: int
    members: list = field(default_factory=list)  # [(name, axis)]
    nodes: list = field(default_factory=list)
    parent: Optional[int] = None
    blocks: int = 1
    numel: int = 0
    roots: list = field(default_factory=list, repr=False)

    @property
    def size_label(self) -> str:
        """``size``, or ``blocksxsize`` for groups with one permutation per block."""
        return f"{self.blocks}x{self.size}" if self.parent is not None else str(self.size)

    @property
    def has_params(self) -> bool:
        return bool(self.members)

    def to_dict(self) -> dict:
        d = {
            "id": self.id,
            "kind": self.kind,
            "size": self.size,
            "members": [{"param": p, "axis": a} for p, a in self.members],
            "nodes": list(self.nodes),
            "numel": self.numel,
        }
        if self.parent is not None:
            d["parent"] = self.parent
            d["blocks"] = self.blocks
        return d


class PermutationGroups:
    """The result of the analysis: groups, pinned op kinds, and the IR."""

    def __init__(self, traced: Traced, analysis: ChannelAnalysis, model_name: str = ""):
        self.traced = traced
        self.gm = traced.gm
        self.model_name = model_name
        self.members = {k: tuple(v) for k, v in analysis.members.items()}
        self.member_shapes = analysis.member_shapes
        self.member_is_param = analysis.member_is_param
        self.layouts = analysis.layouts
        self.pinned = sorted(analysis.pinned.values(), key=lambda p: (-p.count, p.kind))
        # Contractions whose node was not made opaque afterwards.
        opaque_nodes = {n for p in analysis.pinned.values() for n in p.nodes}
        self.contractions = {k: c for k, c in analysis.contractions.items() if k not in opaque_nodes}
        self.normalizations = {k: n for k, n in analysis.normalizations.items() if k not in opaque_nodes}
        self.activation_products = {k: p for k, p in analysis.activation_products.items() if p.node not in opaque_nodes}
        self.probes = {k: p for k, p in analysis.probes.items() if k not in opaque_nodes}
        self.all_groups = _build_groups(self)
        # Only groups that own parameter axes are reported as groups.
        self.groups = [g for g in self.all_groups if any(self.member_is_param[m] for m, _ in g.members)]
        for i, g in enumerate(self.groups):
            g.id = i
        self._by_root: dict = {}
        for g in self.all_groups:
            for r in g.roots:
                self._by_root[r.uid] = g

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self):
        return iter(self.groups)

    def by_kind(self, kind: str) -> list:
        return [g for g in self.groups if g.kind == kind]

    # -- permutations ------------------------------------------------------
    def sampler(self, rng: np.random.Generator, groups: Optional[Iterable[Group]] = None) -> PermutationSampler:
        active = None
        if groups is not None:
            active = {r.uid for g in groups for r in g.roots}
        return PermutationSampler(rng, active)

    def permute_state(self, state: dict, sampler: PermutationSampler) -> dict:
        """Return ``{name: permuted tensor}`` for every member found in ``state``."""
        out = {}
        for name, lays in self.members.items():
            if name in state:
                out[name] = permute_tensor(state[name], lays, sampler)
        return out

    # -- exports -----------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "model": self.model_name,
            "groups": [g.to_dict() for g in self.groups],
            "pinned": [{"op": p.kind, "count": p.count, "reason": p.reason} for p in self.pinned],
        }

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    def to_networkx(self):
        """A bipartite graph: group nodes ``("group", id)`` linked to parameter
        nodes ``("param", name)`` (edge attribute ``axis``) and to graph nodes
        ``("node", name)``; inner groups link to their parent."""
        import networkx as nx

        g = nx.Graph(model=self.model_name)
        for grp in self.groups:
            g.add_node(("group", grp.id), kind=grp.kind, size=grp.size)
            for name, axis in grp.members:
                g.add_node(("param", name), shape=self.member_shapes[name])
                g.add_edge(("group", grp.id), ("param", name), axis=axis)
            for n in grp.nodes:
                g.add_edge(("group", grp.id), ("node", n))
            if grp.parent is not None:
                g.add_edge(("group", grp.id), ("group", grp.parent), relation="parent")
        return g

    def covered_fraction(self, module_types=(torch.nn.Conv2d, torch.nn.Linear, torch.nn.Conv1d)) -> float:
        """Share of conv/linear weight elements with at least one axis in a
        permutable group."""
        covered = total = 0
        covered_names = {m for g in self.groups for m, _ in g.members}
        for mname, mod in self.gm.named_modules():
            if isinstance(mod, module_types) and getattr(mod, "weight", None) is not None:
                n = mod.weight.numel()
                total += n
                if f"{mname}.weight" in covered_names:
                    covered += n
        # functional weights (F.conv2d / F.linear on get_attr) count too
        for node in self.gm.graph.nodes:
            if node.op == "call_function" and node.target in (torch.nn.functional.conv2d, torch.nn.functional.linear, torch.conv2d):
                w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
                if isinstance(w, fx.Node) and w.op == "get_attr":
                    n = int(np.prod(self.member_shapes.get(w.target, (0,))))
                    total += n
                    if w.target in covered_names:
                        covered += n
        return covered / total if total else 0.0

    def table(self, max_members: int = 3) -> str:
        rows = [("id", "kind", "size", "params", "members")]
        for g in self.groups:
            rows.append((str(g.id), g.kind, g.size_label, _fmt_count(g.numel), _summarize_members(g.members, max_members)))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = []
        for r in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
            if len(lines) == 1:
                lines.append("-" * (sum(widths) + 8 + 20))
        kinds = defaultdict(int)
        for g in self.groups:
            kinds[g.kind] += 1
        lines.append("")
        lines.append(f"{len(self.groups)} groups (" + ", ".join(f"{k}: {v}" for k, v in sorted(kinds.items())) + ")")
        if self.pinned:
            lines.append("pinned op kinds (their axes are never permuted):")
            for p in self.pinned:
                lines.append(f"  {p.kind} x{p.count}: {p.reason}")
        else:
            lines.append("pinned op kinds: none")
        return "\n".join(lines)


def _fmt_count(n: int) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}k"
    return str(n)


def _summarize_members(members, k) -> str:
    by_module = defaultdict(list)
    for name, axis in members:
        mod, _, leaf = name.rpartition(".")
        by_module[mod].append(f"{leaf}[{axis}]")
    items = []
    for m, v in by_module.items():
        if not m:  # top-level tensors (cls_token, pos_embed)
            items.extend(v)
        else:
            items.append(f"{m}.{{{','.join(v)}}}" if len(v) > 1 else f"{m}.{v[0]}")
    more = f" (+{len(items) - k} modules)" if len(items) > k else ""
    return ", ".join(items[:k]) + more


def _walk_roots(lay, on_atom, on_product, seen):
    stack = [lay]
    while stack:
        x = stack.pop()
        if isinstance(x, Dep):
            stack.extend(x.table)
            continue
        r = find(x)
        if r.uid in seen:
            continue
        seen.add(r.uid)
        s = r.structure
        if s is None:
            on_atom(r)
        elif isinstance(s, Concat):
            stack.extend(s.parts)
        else:
            on_product(r, s)
            stack.append(s.outer)
            stack.extend(set(s.inners))


def _build_groups(pg: PermutationGroups) -> list:
    family: dict[int, int] = {}

    def ffind(u):
        while family.get(u, u) != u:
            family[u] = family.get(family[u], family[u])
            u = family[u]
        return u

    def funion(a, b):
        ra, rb = ffind(a), ffind(b)
        if ra != rb:
            family[rb] = ra

    atoms: dict[int, Dim] = {}
    inner_of: dict[int, int] = {}  # atom uid -> outer root uid
    outers: dict[int, Dim] = {}

    def on_atom(r):
        if not r.pinned and r.size > 1:
            atoms[r.uid] = r

    def on_product(r, s: Product):
        o = find(s.outer)
        if o.pinned or o.size < 2:
            return
        outers[o.uid] = o
        inner_roots = [find(i) for i in s.inners]
        for i in inner_roots[1:]:
            funion(inner_roots[0].uid, i.uid)
        for i in inner_roots:
            inner_of[i.uid] = o.uid

    seen: set = set()
    layouts = []
    for lays in pg.members.values():
        layouts.extend(lays)
    for value in pg.layouts.values():
        for tl in tensors_in(value):
            layouts.extend(tl.lays)
    for lay in layouts:
        _walk_roots(lay, on_atom, on_product, seen)

    # group atoms: inner families together, everything else alone
    buckets: dict[int, list] = defaultdict(list)
    for uid, r in atoms.items():
        if uid in outers:
            continue  # outer roots are their own ("heads") groups below
        buckets[ffind(uid)].append(r)
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
            if kind != "block_inner" and kind.startswith("head_dim"):
                root_group[parent_uid].kind = "heads"
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
            g._parent_uid = parent_uid  # type: ignore[attr-defined]
        groups.append(g)
        for r in roots:
            root_group[r.uid] = g
    # members and nodes
    for name, lays in pg.members.items():
        for axis, lay in enumerate(lays):
            hit: set = set()
            _walk_roots(lay, lambda r: hit.add(r.uid), lambda r, s: None, set())
            _walk_roots(lay, lambda r: None, lambda r, s: hit.add(find(s.outer).uid), set())
            for g in {id(root_group[u]): root_group[u] for u in hit if u in root_group}.values():
                g.members.append((name, axis))
    for node, value in pg.layouts.items():
        hit = set()
        for tl in tensors_in(value):
            for lay in tl.lays:
                _walk_roots(lay, lambda r: hit.add(r.uid), lambda r, s: hit.add(find(s.outer).uid), set())
        for g in {id(root_group[u]): root_group[u] for u in hit if u in root_group}.values():
            g.nodes.append(node.name)
    for g in groups:
        seen_names = set()
        for name, _ in g.members:
            if name not in seen_names:
                seen_names.add(name)
                g.numel += int(np.prod(pg.member_shapes[name]))
    # stable order: by first graph node touched
    order = {n.name: i for i, n in enumerate(pg.gm.graph.nodes)}
    kind_order = {"heads": 0, "blocks": 0, "head_dim_qk": 1, "head_dim_v": 2}
    groups.sort(key=lambda g: (min((order.get(n, 1 << 30) for n in g.nodes), default=1 << 30), kind_order.get(g.kind, 3)))
    for i, g in enumerate(groups):
        g.id = i
    for g in groups:
        pu = getattr(g, "_parent_uid", None)
        if pu is not None:
            g.parent = root_group[pu].id
    return groups


def permute_tensor(t: torch.Tensor, lays, sampler: PermutationSampler) -> torch.Tensor:
    """Apply the sampler's permutation to every axis of ``t`` (``new -> old``
    index arrays; dependent axes are permuted row by row)."""
    for axis, lay in enumerate(lays):
        if isinstance(lay, Dim):
            idx = sampler.index(lay)
            if not np.array_equal(idx, np.arange(len(idx))):
                t = t.index_select(axis, torch.as_tensor(idx, device=t.device))
    for axis, lay in enumerate(lays):
        if not isinstance(lay, Dep):
            continue
        b = next(i for i, l in enumerate(lays) if isinstance(l, Dim) and _provides(l, lay.key))
        lb = find(lays[b])
        old = sampler.index(lb)
        if lb is find(lay.key):
            keys = old
        else:
            keys = old // lb.structure.inner_size
        rows = np.stack([sampler.index(collapse(lay.table[k])) for k in keys])
        moved = t.movedim((b, axis), (0, 1))
        ar = torch.arange(moved.shape[0], device=t.device)[:, None]
        moved = moved[ar, torch.as_tensor(rows, device=t.device)]
        t = moved.movedim((0, 1), (b, axis))
    return t


def _provides(lay: Dim, key: Dim) -> bool:
    r, k = find(lay), find(key)
    return r is k or (isinstance(r.structure, Product) and find(r.structure.outer) is k)


# ----------------------------------------------------------------------------


def analyze(
    model: torch.nn.Module,
    example_inputs,
    *,
    per_model_output: bool = False,
    traced: Optional[Traced] = None,
    model_name: str = "",
) -> PermutationGroups:
    """Trace ``model`` and find its permutation groups.

    ``per_model_output=True`` leaves the output's last axis unpinned (models
    with different label spaces keep separate heads); otherwise inputs and
    outputs are pinned.
    """
    if traced is None:
        traced = trace(model, example_inputs)
    known = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    analysis = ChannelAnalysis(traced.gm, per_model_output=per_model_output, known_members=known)
    analysis.run()
    _finalize_members(analysis)
    return PermutationGroups(traced, analysis, model_name=model_name or type(model).__name__)


def _finalize_members(analysis: ChannelAnalysis) -> None:
    # Parameters are permuted axis by axis with at most one level of
    # dependency; deeper dependencies collapse (stricter, still sound).
    for name, lays in analysis.members.items():
        for i, lay in enumerate(lays):
            if isinstance(lay, Dep):
                if not any(isinstance(l, Dim) and _provides(l, lay.key) for l in lays):
                    lays[i] = collapse(lay)
                elif any(isinstance(t, Dep) for t in lay.table):
                    lays[i] = Dep(lay.key, tuple(collapse(t) for t in lay.table))
