"""The permutation-group analysis pass.

``ChannelAnalysis`` is an ``fx.Interpreter`` over an abstract domain: instead
of tensors it propagates layouts (``TL``), dispatching every node, by opcode
(``call_module``, ``call_function``, ``call_method``, ``get_attr``), to the
rule registered for its op kind. Ops without a rule, and rule instances that
cannot be expressed, are *opaque*: every axis they touch is pinned and the op
kind is reported. Like ``torch.fx.passes.shape_prop.ShapeProp``, the entry
point is ``propagate()``; the result (``PermutationGroups``, in
``fxmerge.analysis.groups``) is built by ``analyze``.

``FXMERGE_STRICT=1`` in the environment makes a rule that fails with an
unexpected exception raise it instead of pinning (for developing rules).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx as fx

from .weight_folding import FOLDED_PREFIX
from . import rules as _rules  # noqa: F401  (registers every rule)
from .groups import PermutationGroups
from .ir import Dep, Dim, IRConflict, collapse, pin
from .permute import provides
from fxmerge.analysis.rules.registry import RULES, TL, Opaque, RuleContext, op_kind, tensors_in
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


def strict_rules() -> bool:
    """Whether rules raise their unexpected exceptions (``FXMERGE_STRICT=1``)."""
    return os.environ.get("FXMERGE_STRICT", "") not in ("", "0")


@dataclass
class PinnedOp:
    """An op kind whose axes were pinned, why, and at which nodes."""

    kind: str
    reason: str
    nodes: list = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.nodes)


class ChannelAnalysis(fx.Interpreter):
    """Propagates channel-axis layouts through a traced graph.

    Values are ``TL`` layouts (python constants where the graph computes
    them: shapes, sizes); each node's layouts stay in ``env`` after the run.
    The rules also record what the merge passes need: contractions
    (convolutions, linears), products of activations, probes, normalisations
    and cross-channel mixings.
    """

    def __init__(self, gm: fx.GraphModule, *, per_model_output: bool = False, known_members: Optional[set] = None):
        super().__init__(gm, garbage_collect_values=False)
        self.extra_traceback = False
        self.per_model_output = per_model_output
        self.known_members = known_members
        self.members: dict[str, list] = {}
        self.member_shapes: dict[str, tuple] = {}
        self.member_is_param: dict[str, bool] = {}
        self.pinned: dict[str, PinnedOp] = {}
        self.outputs: list[TL] = []
        self.contractions: dict = {}
        self.activation_products: dict = {}
        self.probes: dict = {}
        self.normalizations: dict = {}
        self.mixings: list = []
        self.rule_pins: dict = {}  # op kind -> why a rule pinned one of its axes
        self.node: Optional[fx.Node] = None

    @property
    def layouts(self) -> dict:
        """Each node's layouts (``env`` of the last run)."""
        return self.env

    def propagate(self, *layouts) -> Any:
        """Run the analysis. Placeholders take ``layouts`` in order; those
        not given get pinned layouts shaped like their recorded values (the
        inputs' axes are never permuted). Returns the output's layouts."""
        return self.run(*layouts)

    # -- members -----------------------------------------------------------
    def member(self, name: str, tensor: torch.Tensor) -> TL:
        """The layout of a parameter or buffer, created on first use."""
        if name not in self.members:
            shape = tuple(tensor.shape)
            pinned = self.known_members is not None and name not in self.known_members
            self.members[name] = [Dim(s, pinned=pinned) for s in shape]
            self.member_shapes[name] = shape
            self.member_is_param[name] = isinstance(tensor, torch.nn.Parameter)
        return TL(tuple(self.members[name]), self.member_shapes[name], member=name)

    def replace_member_axis(self, name: str, axis: int, old, new) -> bool:
        cur = self.members[name][axis]
        if cur is old and isinstance(old, Dim) and not old.touched and old.parent is None and old.structure is None:
            self.members[name][axis] = new
            return True
        return False

    # -- the Interpreter contract -------------------------------------------
    def run_node(self, n: fx.Node) -> Any:
        self.node = n
        return super().run_node(n)

    def placeholder(self, target, args, kwargs) -> Any:
        try:
            return next(self.args_iter)
        except StopIteration:
            return _fresh_like(self.node.meta.get("fxm_value"), pinned=True)

    def get_attr(self, target, args, kwargs) -> Any:
        obj = self.fetch_attr(target)
        if isinstance(obj, torch.Tensor):
            return self.member(target, obj)
        return self.node.meta.get("fxm_value")

    def call_module(self, target, args, kwargs) -> Any:
        module = self.fetch_attr(target)
        return self._apply(RULES.for_module(module), module, args, kwargs)

    def call_function(self, target, args, kwargs) -> Any:
        return self._apply(RULES.for_function(target), None, args, kwargs)

    def call_method(self, target, args, kwargs) -> Any:
        return self._apply(RULES.methods.get(target), None, args, kwargs)

    def output(self, target, args, kwargs) -> Any:
        for tl in tensors_in(args):
            self.outputs.append(tl)
            self._pin_output(tl)
        return args[0] if args else None

    # -- rules ---------------------------------------------------------------
    def _apply(self, rule, module, args, kwargs) -> Any:
        n = self.node
        meta = n.meta.get("fxm_value")
        kind = op_kind(n, module)
        tensor_args = tensors_in((args, kwargs))
        if not _has_tensor(meta) and self._is_shape_query(n, tensor_args):
            return meta
        if rule is None and module is None and not tensor_args:
            # a tensor made from python values alone (a table of positions):
            # no channel of any model flows through it
            return _fresh_like(meta, pinned=True)
        if rule is None:
            return self._opaque(n, kind, tensor_args, meta, "no rule for this op kind")
        ctx = RuleContext(self, n, module)
        try:
            result = rule(ctx, *args, **kwargs)
            _check_structure(result, meta)
            return result
        except (Opaque, IRConflict) as e:
            return self._opaque(n, kind, tensor_args + self._module_members(n, module), meta,
                                getattr(e, "reason", str(e)))
        except Exception as e:  # a rule that does not understand this instance fails closed
            if strict_rules():
                raise
            return self._opaque(n, kind, tensor_args + self._module_members(n, module), meta,
                                f"rule failed: {type(e).__name__}: {e}")

    def _module_members(self, n, module) -> list:
        """The layouts of a module's parameters and buffers: an opaque module
        pins them too (a rule may have structured them before giving up)."""
        if module is None:
            return []
        out = []
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            out.append(self.member(f"{n.target}.{name}", t))
        return out

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
                pin(lay)
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


def analyze(
    model: torch.nn.Module,
    example_inputs,
    *,
    per_model_output: bool = False,
    traced: Optional[Traced] = None,
    model_name: str = "",
    fold_weights: bool = False,
) -> PermutationGroups:
    """Trace ``model`` and find its permutation groups.

    ``per_model_output=True`` leaves the output's last axis unpinned (models
    with different label spaces keep separate heads); otherwise inputs and
    outputs are pinned. ``fold_weights``: the graph merging widens, with
    statistics of the weights folded into constants (``weight_folding``).
    """
    if traced is None:
        traced = trace(model, example_inputs, fold_weights=fold_weights)
    known = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    known |= {n for n, _ in traced.gm.named_parameters() if n.startswith(FOLDED_PREFIX)}
    analysis = ChannelAnalysis(traced.gm, per_model_output=per_model_output, known_members=known)
    analysis.propagate()
    _finalize_members(analysis)
    pg = PermutationGroups(traced, analysis, model_name=model_name or type(model).__name__)
    pg.aliases = tensor_aliases(model, pg.members)
    persistent = set(model.state_dict())
    pg.non_persistent = {n for n, _ in model.named_buffers(remove_duplicate=False) if n not in persistent}
    return pg


def tensor_aliases(model: torch.nn.Module, names) -> dict:
    """Other state-dict names of each tensor in ``names``: a module shared
    between two places of the model (CoaT's convolutional position
    encodings) appears in its state dict once per place, and a permutation
    must reach every copy there."""
    by_tensor: dict = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + \
            list(model.named_buffers(remove_duplicate=False)):
        by_tensor.setdefault(id(t), []).append(name)
    out = {}
    for names_of in by_tensor.values():
        if len(names_of) > 1:
            for n in names_of:
                if n in names:
                    out[n] = [m for m in names_of if m != n]
    return out


def _finalize_members(analysis: ChannelAnalysis) -> None:
    # Parameters are permuted axis by axis with at most one level of
    # dependency; deeper dependencies collapse (stricter, still sound).
    for name, lays in analysis.members.items():
        for i, lay in enumerate(lays):
            if isinstance(lay, Dep):
                if not any(isinstance(l, Dim) and provides(l, lay.key) for l in lays):
                    lays[i] = collapse(lay)
                elif any(isinstance(t, Dep) for t in lay.table):
                    lays[i] = Dep(lay.key, tuple(collapse(t) for t in lay.table))
