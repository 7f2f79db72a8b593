"""The widening rewrite: model A's graph in, the merged GraphModule out.

``WidenGraph`` copies A's GraphModule and, under a ``LayoutWidener``:

1. replaces every parameter and buffer with its merged value
   (``widen_tensor`` from every model's aligned value),
2. makes module attributes agree with the new shapes (the ``RESIZE`` rules:
   ``in_channels``, ``out_channels``, ``groups``, ``num_features``,
   ``normalized_shape``, ...),
3. rewrites the shape constants in the graph (``reshape``/``view``/
   ``expand`` targets, ``split`` sizes, ``narrow`` lengths) from the widened
   layouts of the node's outputs,
4. gives every LayerNorm/RMSNorm whose normalised axis widened per-model
   statistics (``SplitLayerNorm``),
5. checks the new graph by running it and comparing every node's shape with
   the planned one.

``split_contractions`` then turns every widened convolution and linear layer
into row blocks (``PartialConv``, ``PartialLinear``) so that structural
zeros are neither stored nor computed.
"""
from __future__ import annotations

import copy
import operator
from typing import Optional

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from fxmerge.errors import RewriteError
from fxmerge.runtime.inputs import as_inputs
from fxmerge.analysis.ir import layout_size
from fxmerge.runtime.layers import PartialFunctional
from fxmerge.analysis.rules.registry import RESIZE, ROW_BLOCKS, SPLIT_NORM, tensors_in, weight_layouts
from fxmerge.analysis.tracing import TensorInfo, ValueProp
from fxmerge.runtime.tensors import replace_module, set_tensor, split_name
from .views import emit_views, role_split_layers, view_regions
from .widening import LayoutWidener, row_blocks, widen_tensor


def in_axes_of(pg) -> dict:
    """Member name -> contracted axes (weights of convolutions and linears)."""
    out: dict = {}
    for c in pg.contractions.values():
        for name, axis in c.contracted:
            out.setdefault(name, set()).add(axis)
    return out


class WidenGraph:
    def __init__(self, pg, widener: LayoutWidener):
        self.pg = pg
        self.widener = widener
        self.per_view: list = []  # nodes run once per model view (``views``)

    def new_shape(self, node: fx.Node) -> Optional[list]:
        tls = tensors_in(self.pg.layouts.get(node))
        if len(tls) != 1:
            return None
        return [self.widener.size(l) for l in tls[0].lays]

    def run(self, states: list) -> fx.GraphModule:
        """The widened GraphModule from every model's aligned state (model
        A's first)."""
        pg = self.pg
        state_a = states[0]
        gm = copy.deepcopy(pg.gm)
        contracted = in_axes_of(pg)
        old_shapes: dict = {}
        for name, lays in pg.members.items():
            if name not in state_a:
                continue
            new = widen_tensor([s[name] for s in states], lays, contracted.get(name, set()), self.widener)
            mod_name, leaf = split_name(name)
            old_shapes.setdefault(mod_name, {})[leaf] = tuple(state_a[name].shape)
            set_tensor(gm, name, new)
        for mod_name, shapes in old_shapes.items():
            mod = gm.get_submodule(mod_name) if mod_name else gm
            if all(tuple(getattr(mod, k).shape) == v for k, v in shapes.items()):
                continue
            rule = RESIZE.for_module(mod)
            if rule is not None:
                new = rule(mod, shapes)
                if isinstance(new, nn.Module) and new is not mod:  # the rule replaces the module
                    replace_module(gm, mod_name, new)
        regions = view_regions(pg, self.widener)
        self._rewrite_constants(gm, skip={name for r in regions for name in r.nodes})  # views keep the source's
        self.per_view = emit_views(gm, self.pg, self.widener, states, regions)
        self.per_view += role_split_layers(gm, self.pg, self.widener, states)
        self._split_normalizations(gm)
        gm.to(model_device(pg.gm))  # modules the rewrite made (split norms) join the model's device
        gm.recompile()
        self._specialize_computed_sizes(gm)
        return gm

    def _specialize_computed_sizes(self, gm: fx.GraphModule) -> None:
        """Sizes a reshape computes in the graph (``c // heads`` from
        ``x.shape``) can change once channels widen, even on an axis that keeps
        its size. Run the widened graph on the traced example and replace
        every computed size that differs from the planned one by the planned
        constant (sizes that still agree, such as the batch, stay computed).
        A number computed from a size that tensor arithmetic reads (the
        attention scale ``(c // heads) ** -0.5``) keeps its source value: the
        widened axis is more heads of the same width, not wider heads."""
        example = self.pg.traced.example_inputs
        planned, source = {}, {}
        for node in self.pg.gm.graph.nodes:
            shape = self.new_shape(node)
            value = node.meta.get("fxm_value")
            if shape is not None and isinstance(value, TensorInfo):
                planned[node.name] = shape
            if _is_number(value):
                source[node.name] = value
        changed = False

        class Fixer(fx.Interpreter):
            def run_node(inner, n):
                nonlocal changed
                if n.name in planned and _is_reshape(n):
                    changed |= _fix_sizes(n, inner.env, planned[n.name])
                out = super().run_node(n)
                if n.name in source and _is_number(out) and out != source[n.name]:
                    changed |= _keep_source_number(n, source[n.name])
                return out

        try:
            with torch.no_grad():
                Fixer(gm).run(*example.for_placeholders(gm))
        except Exception:
            pass  # ``check_shapes`` names the failure
        if changed:
            gm.recompile()

    # -- normalisations ----------------------------------------------------
    def _split_normalizations(self, gm: fx.GraphModule) -> None:
        old_nodes = {n.name: n for n in self.pg.gm.graph.nodes}
        nodes = {n.name: n for n in gm.graph.nodes}
        calls: dict = {}  # module -> how many nodes call it (a shared LayerNorm may widen differently at each)
        for n in gm.graph.nodes:
            if n.op == "call_module":
                calls[n.target] = calls.get(n.target, 0) + 1
        for name, norm in self.pg.normalizations.items():
            ws = [self.widener.widen(lay) for lay in normalized_layouts(self.pg, old_nodes[name], norm)]
            node = nodes.get(name)
            if node is None or all((w.role == self.widener.shared_role).all() for w in ws):
                continue  # run per model view, or fully merged: the plain op is exact
            if not splittable(gm, node, norm):
                raise RewriteError(
                    f"cannot widen the features normalised by '{name}': only single-axis LayerNorm/RMSNorm can be split; "
                    "merge with norm_policy='merged'"
                )
            SPLIT_NORM.for_node(gm, node)(gm, node, norm, ws[-1].role, calls)  # splittable norms normalise one axis

    # -- shape constants ---------------------------------------------------
    def _rewrite_constants(self, gm: fx.GraphModule, skip: set) -> None:
        old_nodes = {n.name: n for n in self.pg.gm.graph.nodes}
        for node in gm.graph.nodes:
            if node.name in skip:
                continue
            old = old_nodes[node.name]
            if node.op == "call_method" and node.target in ("reshape", "view", "expand"):
                self._rewrite_shape_args(node, old, start=1)
            elif node.op == "call_function" and node.target in (torch.reshape,):
                self._rewrite_shape_args(node, old, start=1)
            elif (node.op == "call_method" and node.target in ("split", "split_with_sizes", "chunk")) or (
                node.op == "call_function" and node.target in (torch.split, torch.chunk)
            ):
                self._rewrite_split(node, old)
            elif (node.op == "call_method" and node.target == "narrow") or (node.op == "call_function" and node.target is torch.narrow):
                self._rewrite_narrow(node, old)
            elif node.op == "call_function" and node.target is operator.getitem:
                self._rewrite_getitem(node, old)
            elif node.op == "call_function" and node.target is torch.nn.functional.group_norm:
                self._rewrite_group_count(node, old, 1, "num_groups")
            elif node.op == "call_function" and node.target in _FUNCTIONAL_CONVS:
                self._rewrite_group_count(node, old, 6, "groups")

    def _rewrite_shape_args(self, node, old, start):
        new_shape = self.new_shape(old)
        meta = old.meta.get("fxm_value")
        if new_shape is None or not isinstance(meta, TensorInfo):
            return
        old_shape = list(meta.shape)
        if new_shape == old_shape:
            return
        args = list(node.args)
        sizes = args[start:]
        packed = len(sizes) == 1 and isinstance(sizes[0], (list, tuple))
        if packed:
            sizes = list(sizes[0])
        kw = node.kwargs.get("shape") or node.kwargs.get("size")
        if not sizes and kw is not None:
            sizes = list(kw)
        if len(sizes) != len(old_shape):
            raise RewriteError(f"cannot rewrite the shape of '{node.name}' ({node.target}): {len(sizes)} sizes for {len(old_shape)} axes")
        for i, (s, o, n) in enumerate(zip(sizes, old_shape, new_shape)):
            if n == o:
                continue
            if isinstance(s, int) and s == o:
                sizes[i] = n
            elif isinstance(s, int) and s == -1:
                continue
            elif isinstance(s, fx.Node):
                continue  # computed in the graph: ``_specialize_computed_sizes`` checks its value
            else:
                raise RewriteError(f"cannot rewrite axis {i} of '{node.name}' ({node.target}): size {s!r}")
        if kw is not None and len(args) <= start:
            kwargs = dict(node.kwargs)
            kwargs["shape" if "shape" in kwargs else "size"] = tuple(sizes)
            node.kwargs = kwargs
        else:
            node.args = tuple(args[:start]) + ((tuple(sizes),) if packed else tuple(sizes))

    def _rewrite_group_count(self, node, old, position: int, keyword: str):
        """A group count given to a function (``F.group_norm(x, num_groups)``
        traced through a norm module, ``F.conv2d(..., groups)`` of a
        standardised convolution): blocks are widened whole, so the count
        grows with the channels, as the modules' resize rules make it."""
        x_old = old.args[0]
        meta = x_old.meta.get("fxm_value")
        new_shape = self.new_shape(x_old)
        if new_shape is None or not isinstance(meta, TensorInfo) or new_shape[1] == meta.shape[1]:
            return
        old_c, new_c = meta.shape[1], new_shape[1]
        given = len(node.args) > position
        groups = node.args[position] if given else node.kwargs.get(keyword, 1)
        if node.target in _FUNCTIONAL_CONVS and groups == 1:
            return  # a dense convolution stays dense
        if given:
            args = list(node.args)
            args[position] = self._grown_groups(node, groups, old_c, new_c)
            node.args = tuple(args)
        elif keyword in node.kwargs:
            node.kwargs = {**node.kwargs, keyword: self._grown_groups(node, groups, old_c, new_c)}

    @staticmethod
    def _grown_groups(node, groups, old_c: int, new_c: int) -> int:
        if not isinstance(groups, int) or (new_c * groups) % old_c:
            raise RewriteError(f"cannot rewrite the group count of '{node.name}': {groups!r} groups "
                               f"for {old_c} channels widened to {new_c}")
        return groups * new_c // old_c

    def _rewrite_split(self, node, old):
        """``split`` and ``chunk``: the parts of a widened axis need not keep
        their sizes (equal chunks may become unequal), so both become a
        ``split`` with the planned part sizes."""
        outs = self.pg.layouts.get(old)
        metas = old.meta.get("fxm_value")
        if not isinstance(outs, (list, tuple)) or not isinstance(metas, (list, tuple)):
            return
        dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
        dim = dim % len(old.args[0].meta.get("fxm_value").shape)
        new_sizes = [self.widener.size(tl.lays[dim]) for tl in outs]
        if new_sizes == [m.shape[dim] for m in metas]:
            return
        node.op, node.target = "call_method", "split"
        node.args = (node.args[0], new_sizes, dim)
        node.kwargs = {}

    def _segment(self, node, x_lay, out_lay, start: int, stop: int) -> Optional[tuple]:
        """The widened ``[start, stop)`` of a slice: where the input's widened
        axis carries the sliced entries (a slice takes whole parts of a
        concatenation, so they sit side by side). None when nothing widened."""
        wx, wo = self.widener.widen(x_lay), self.widener.widen(out_lay)
        if wx.size == layout_size(x_lay) and wo.size == layout_size(out_lay):
            return None
        at = np.flatnonzero((wx.src >= start) & (wx.src < stop))
        if len(at) != wo.size or (len(at) and at[-1] - at[0] + 1 != len(at)):
            raise RewriteError(f"cannot rewrite the slice '{node.name}' over a widened axis: its entries are not "
                               "contiguous after widening")
        return (int(at[0]), int(at[-1]) + 1) if len(at) else (0, 0)

    def _rewrite_narrow(self, node, old):
        x_tl = tensors_in(self.pg.layouts.get(old.args[0]))
        out = tensors_in(self.pg.layouts.get(old))
        if not x_tl or not out:
            return
        dim = node.args[1] % len(out[0].lays)
        start, length = node.args[2], node.args[3]
        if not isinstance(start, int) or not isinstance(length, int):
            return
        start %= x_tl[0].shape[dim]
        seg = self._segment(node, x_tl[0].lays[dim], out[0].lays[dim], start, start + length)
        if seg is not None:
            node.args = (node.args[0], node.args[1], seg[0], seg[1] - seg[0])

    def _rewrite_getitem(self, node, old):
        """Slices of a widened axis (``x[:, :c]``) take the widened range of
        the entries they took."""
        x_tl = tensors_in(self.pg.layouts.get(old.args[0]))
        out = tensors_in(self.pg.layouts.get(old))
        if len(x_tl) != 1 or len(out) != 1 or not isinstance(old.args[0].meta.get("fxm_value"), TensorInfo):
            return
        idx = node.args[1]
        items = list(idx) if isinstance(idx, tuple) else [idx]
        if any(not isinstance(it, (slice, int, type(None), type(Ellipsis))) for it in items):
            return
        x_shape = x_tl[0].shape
        n_axes = sum(1 for it in items if it is not None and it is not Ellipsis)
        if Ellipsis in items:
            k = items.index(Ellipsis)
            items[k:k + 1] = [slice(None)] * (len(x_shape) - n_axes)
        changed, axis, out_axis = False, 0, 0
        for j, it in enumerate(items):
            if it is None:
                out_axis += 1
                continue
            if isinstance(it, slice) and not all(isinstance(v, (int, type(None))) for v in (it.start, it.stop, it.step)):
                # bounds computed in the graph (a halo window's offsets): a
                # widened axis sliced that way fails the shape check, by name
                out_axis += 1
                axis += 1
                continue
            if isinstance(it, slice):
                start, stop, step = it.indices(x_shape[axis])
                if step == 1 and (it.start is not None or it.stop is not None):
                    seg = self._segment(node, x_tl[0].lays[axis], out[0].lays[out_axis], start, stop)
                    if seg is not None:
                        items[j] = slice(seg[0], seg[1])
                        changed = True
                out_axis += 1
            axis += 1
        if changed:
            node.args = (node.args[0], tuple(items) if isinstance(idx, tuple) else items[0])


def _is_reshape(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in ("reshape", "view", "expand")) or (
        node.op == "call_function" and node.target is torch.reshape)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_FUNCTIONAL_CONVS = {torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d,
                     torch.conv1d, torch.conv2d, torch.conv3d}
_ARITHMETIC = {operator.mul, operator.truediv, operator.add, operator.sub, operator.pow, torch.mul, torch.div,
               torch.add, torch.sub, torch.pow}
_ARITHMETIC_METHODS = {"mul", "div", "add", "sub", "pow", "__mul__", "__truediv__", "__add__", "__sub__", "__rmul__"}


def _keep_source_number(node: fx.Node, value) -> bool:
    """Where tensor arithmetic reads ``node`` (a number computed from sizes
    that widening changed), read the source's ``value`` instead; a float is
    never a size, so every reader of one gets it. Returns whether a reader
    changed."""
    changed = False
    for user in list(node.users):
        tensor_op = isinstance(user.meta.get("fxm_value"), TensorInfo) and (
            (user.op == "call_function" and user.target in _ARITHMETIC)
            or (user.op == "call_method" and user.target in _ARITHMETIC_METHODS))
        if isinstance(value, float) or tensor_op:
            user.args = fx.map_arg(user.args, lambda a: value if a is node else a)
            user.kwargs = fx.map_arg(user.kwargs, lambda a: value if a is node else a)
            changed = True
    return changed


def _fix_sizes(node: fx.Node, env: dict, want: list) -> bool:
    """Replace computed size arguments of a reshape-like node whose values
    (in ``env``) differ from the planned shape ``want``. Returns whether the
    node changed."""
    args = list(node.args)
    packed = len(args) == 2 and isinstance(args[1], (list, tuple))
    sizes = list(args[1]) if packed else args[1:]
    if len(sizes) != len(want):
        return False
    changed = False
    for i, (s, w) in enumerate(zip(sizes, want)):
        if isinstance(s, fx.Node) and s in env and isinstance(env[s], int) and env[s] != w and env[s] != -1:
            sizes[i] = w
            changed = True
    if changed:
        node.args = (args[0], tuple(sizes)) if packed else (args[0], *sizes)
    return changed


def normalized_layouts(pg, node: fx.Node, norm) -> tuple:
    """The layouts of the trailing feature axes a normalisation node reads."""
    return tensors_in(pg.layouts.get(node.args[0]))[0].lays[-norm.axes:]


def splittable(gm: fx.GraphModule, node: fx.Node, norm) -> bool:
    """Whether the rewrite can give this normalisation per-model statistics:
    one normalised axis, computed by ``F.layer_norm``/``F.rms_norm`` or by a
    module whose forward is ``nn.LayerNorm``'s or ``nn.RMSNorm``'s."""
    if norm.axes != 1:
        return False
    entry = SPLIT_NORM.for_node(gm, node)
    return entry is not None and (node.op == "call_function" or entry.applies(gm.get_submodule(node.target)))


def check_shapes(gm: fx.GraphModule, pg, widener: LayoutWidener, example_inputs) -> None:
    """Run the widened graph and compare every node's shape with the plan."""
    planned = {}
    for node in pg.gm.graph.nodes:
        tls = tensors_in(pg.layouts.get(node))
        if len(tls) == 1 and isinstance(node.meta.get("fxm_value"), TensorInfo):
            planned[node.name] = [widener.size(l) for l in tls[0].lays]
    prop = ValueProp(gm)
    try:
        with torch.no_grad():
            prop.run(*as_inputs(example_inputs).for_placeholders(gm))
    except Exception as e:
        raise RewriteError(f"the widened graph does not run: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    for node in gm.graph.nodes:
        v = node.meta.get("fxm_value")
        want = planned.get(node.name)
        if want is not None and isinstance(v, TensorInfo) and list(v.shape) != want:
            raise RewriteError(f"node '{node.name}' has shape {list(v.shape)} after widening, planned {want}")


def _split_functional(gm: fx.GraphModule, node: fx.Node, c, pg, widener: LayoutWidener) -> int:
    """A functional contraction (``F.linear``, ``F.conv2d``, ``x @ W``) as a
    ``PartialFunctional`` node wherever its weight has structural zeros."""
    spec = ROW_BLOCKS.for_function(node.target)
    if spec is None:
        return 0
    op, names = spec
    bound = dict(zip(names, node.args))
    bound.update(node.kwargs)
    if op == "matmul" and c.weight_in_axis != 0:
        return 0  # W @ x: rows of W are the output, left dense
    lays = weight_layouts(pg, c)
    out_axis = 1 if c.weight_in_axis == 0 else 0
    w_out, w_in = widener.widen(lays[out_axis]), widener.widen(lays[c.weight_in_axis])
    blocks = row_blocks(w_out, w_in)
    if all(len(cols) == w_in.size for cols, _ in blocks):
        return 0
    x = bound["input"]
    x_meta = x.meta.get("fxm_value") if isinstance(x, fx.Node) else None
    ndim = len(x_meta.shape) if isinstance(x_meta, TensorInfo) else None
    channel_axis = c.input_axis - ndim if ndim is not None else -1
    op_kwargs = {k: bound[k] for k in ("stride", "padding", "dilation") if k in bound}
    module = PartialFunctional(op, [b[0] for b in blocks], [b[1] for b in blocks], w_in.size, channel_axis, **op_kwargs)
    target = f"fxm_rows_{node.name}"
    gm.add_submodule(target, module)
    node.op, node.target = "call_module", target
    node.args = (x, bound["weight"]) + ((bound["bias"],) if bound.get("bias") is not None else ())
    node.kwargs = {}
    return 1


def module_row_blocks(gm: fx.GraphModule, pg, widener: LayoutWidener) -> list:
    """``(module target, row-block module class, in_index, out_index,
    contraction)`` for every widened convolution, linear or packed
    projection (class None) whose weight has structural zeros (row classes
    that do not read every column)."""
    plan = []
    nodes = {n.name: n for n in gm.graph.nodes}
    for c in pg.contractions.values():
        node = nodes.get(c.node)  # absent: run per model view
        if node is None or c.groups != 1 or node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        entry = ROW_BLOCKS.for_module(mod)
        spec = entry(mod) if entry is not None else None
        if spec is None or c.weight_in_axis != spec[1]:
            continue
        lays = weight_layouts(pg, c)
        w_out, w_in = widener.widen(lays[1 - c.weight_in_axis]), widener.widen(lays[c.weight_in_axis])
        blocks = row_blocks(w_out, w_in)
        if all(len(cols) == w_in.size for cols, _ in blocks):
            continue  # every row reads every column: nothing to skip
        kind = spec[0]
        plan.append((node.target, kind, [b[0] for b in blocks], [b[1] for b in blocks], c))
    return plan


def split_contractions(gm: fx.GraphModule, pg, widener: LayoutWidener) -> int:
    """Replace widened dense convolutions and linears with row-block modules
    wherever their weight has structural zeros. Returns how many."""
    count = 0
    nodes = {n.name: n for n in gm.graph.nodes}
    for c in pg.contractions.values():
        node = nodes.get(c.node)  # absent: run per model view
        if node is not None and c.groups == 1 and node.op == "call_function":
            count += _split_functional(gm, node, c, pg, widener)
    for target, kind, in_index, out_index, c in module_row_blocks(gm, pg, widener):
        if kind is None:
            gm.get_submodule(target).split_projection(c.weight[len(target) + 1:], in_index, out_index)
        else:
            replace_module(gm, target, kind(gm.get_submodule(target), in_index, out_index))
        count += 1
    gm.to(model_device(gm))  # the row blocks' index buffers join the model's device
    gm.recompile()
    return count


def model_device(module: nn.Module) -> torch.device:
    """Where a model's parameters (or buffers) live."""
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")
