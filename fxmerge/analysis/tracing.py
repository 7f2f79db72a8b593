"""Turning a model into a checked ``torch.fx`` graph.

``trace`` works on a deep copy (tracing can mutate module caches), traces
with ``tracer.FxTracer`` (into timm's no-trace modules that no rule covers, at
the example inputs' sizes), pins optional forward arguments to their defaults, records every node's value summary (``ValueProp``)
and checks that the GraphModule reproduces the eager model.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import operator
import os
import traceback
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from .rules import RULES
from .tracer import FxTracer
from .weight_folding import fold_weight_statistics
from fxmerge.errors import TraceError
from fxmerge.runtime.inputs import Inputs, as_inputs


def _user_frame(tb) -> Optional[str]:
    """The innermost frame of the traceback outside torch.fx and fxmerge."""
    best = None
    for frame in traceback.extract_tb(tb):
        f = frame.filename.replace(os.sep, "/")
        if "/torch/fx/" in f or "/fxmerge/" in f or f.endswith("/torch/nn/modules/module.py"):
            continue
        best = f"{frame.filename}:{frame.lineno}: {(frame.line or '').strip()}"
    return best


def _concrete_args(model: torch.nn.Module, inputs: Inputs) -> dict:
    """Optional forward arguments the example inputs do not give, pinned to
    their defaults (``attn_mask=None``, ``mask=None``, ``is_causal=False``)."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return {}
    out = {}
    params = [p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for p in params[len(inputs.args):]:
        if p.name in inputs.kwargs:
            continue
        if p.default is not inspect.Parameter.empty and (p.default is None or isinstance(p.default, (bool, int, float, str))):
            out[p.name] = p.default
    return out


# ----------------------------------------------------------------------------
# value summaries


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple
    dtype: torch.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)


def summarize(value: Any) -> Any:
    """What the analysis needs of a runtime value: shapes for tensors, the
    value itself for small python constants."""
    if isinstance(value, torch.Tensor):
        return TensorInfo(tuple(value.shape), value.dtype)
    if isinstance(value, torch.Size):
        return tuple(int(v) for v in value)
    if isinstance(value, (tuple, list)):
        return type(value)(summarize(v) for v in value) if not hasattr(value, "_fields") else tuple(summarize(v) for v in value)
    if isinstance(value, dict):
        return {k: summarize(v) for k, v in value.items()}
    return value


class ValueProp(fx.Interpreter):
    """Runs the graph once and stores ``node.meta['fxm_value']``, a summary of
    every node's value (the fx ``ShapeProp`` idea, kept for non-tensors too)."""

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as e:
            raise TraceError(
                f"the traced graph failed at node '{n.name}' ({n.op} {_target_name(n)}): "
                f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}",
                module_path=_node_module_path(n),
                source=_node_source(n),
            ) from e
        n.meta["fxm_value"] = summarize(result)
        return result


def _target_name(n: fx.Node) -> str:
    t = n.target
    if isinstance(t, str):
        return t
    return getattr(t, "__qualname__", getattr(t, "__name__", repr(t)))


def _node_module_path(n: fx.Node) -> Optional[str]:
    if n.op == "call_module":
        return str(n.target)
    stack = n.meta.get("nn_module_stack")
    if stack:
        return list(stack.values())[-1][0] if isinstance(list(stack.values())[-1], tuple) else list(stack.keys())[-1]
    return None


def _node_source(n: fx.Node) -> Optional[str]:
    st = n.meta.get("stack_trace") or n.stack_trace
    if not st:
        return None
    lines = [l.strip() for l in st.strip().splitlines() if l.strip()]
    # the innermost "File ..." entry outside torch itself, and its code line
    for i in range(len(lines) - 1, -1, -1):
        where = lines[i].replace(os.sep, "/")
        if lines[i].startswith("File ") and "/torch/" not in where and "/fxmerge/analysis/tracer.py" not in where:
            code = lines[i + 1] if i + 1 < len(lines) else ""
            return f"{lines[i]}: {code}"
    return lines[-1]


# ----------------------------------------------------------------------------


@dataclass
class Traced:
    """A checked trace: the GraphModule (its nodes carry ``fxm_value``) and the
    example inputs it was checked on."""

    gm: fx.GraphModule
    example_inputs: Inputs
    concrete_args: dict = field(default_factory=dict)
    specialized: tuple = ()  # modules traced at the example's sizes (``tracer.FxTracer``)


def trace(
    model: torch.nn.Module,
    example_inputs,
    *,
    check: bool = True,
    leaf_modules: Sequence[type] = (),
    atol: float = 1e-5,
    rtol: float = 1e-4,
    fold_weights: bool = False,
) -> Traced:
    """Trace a deep copy of ``model`` (in eval mode) into a ``GraphModule``.
    ``fold_weights`` turns statistics of the weights (weight standardisation)
    into constants (``weight_folding.fold_weight_statistics``): what merging widens.

    Raises ``TraceError`` naming the module path and source line when tracing,
    running the graph, or the comparison with the eager model fails.
    """
    inputs = as_inputs(example_inputs)
    # first into what timm (or torch.fx.wrap) hides and no rule covers;
    # where a hidden function defeats even that, with everything hidden kept whole
    for into in (_no_rule, _nothing):
        try:
            return _trace_once(model, inputs, into, check=check, leaf_modules=leaf_modules, atol=atol, rtol=rtol,
                               fold_weights=fold_weights)
        except TraceError:
            if into is _nothing:
                raise
    raise AssertionError("unreachable")


def _trace_once(model, inputs: Inputs, into, *, check, leaf_modules, atol, rtol, fold_weights) -> Traced:
    eager = copy.deepcopy(model).eval()
    root = copy.deepcopy(model).eval()
    concrete = _concrete_args(root, inputs)
    tracer = FxTracer(leaf_modules=leaf_modules, inputs=inputs, trace_into=into)
    try:
        graph = tracer.trace(root, concrete_args=concrete or None)
    except Exception as e:
        path = list(tracer.module_stack.keys())[-1] if getattr(tracer, "module_stack", None) else None
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}: {type(e).__name__}: {e}",
            module_path=path,
            source=_user_frame(e.__traceback__),
        ) from e
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    out_of_place(gm)
    if fold_weights:
        fold_weight_statistics(gm)
    with torch.no_grad():
        traced_out = ValueProp(gm).run(*inputs.for_placeholders(gm))
        if check:
            _check_against_eager(gm, eager, inputs, traced_out, atol=atol, rtol=rtol)
    return Traced(gm=gm, example_inputs=inputs, concrete_args=concrete, specialized=tuple(tracer.specialized))


def _nothing(obj) -> bool:
    return False


def _no_rule(obj) -> bool:
    """A module class or function the analysis has no rule for: better
    traced into."""
    return (RULES.for_class(obj) if isinstance(obj, type) else RULES.for_function(obj)) is None


_IN_PLACE_OPERATORS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                       operator.itruediv: operator.truediv}


def out_of_place(gm: fx.GraphModule) -> None:
    """Make the graph's in-place operations write new tensors.

    The passes keep node values for later (a convolution's output is the
    target least squares fits it to); an activation that overwrites its input
    in place (``nn.ReLU(inplace=True)`` after a squeeze-excitation's first
    convolution) would rewrite that value behind their back. Modules' and
    functions' ``inplace`` flags are switched off; a tensor method or
    operator that updates its input in place (``x.relu_()``, ``x += y``) is
    replaced by its out-of-place form where nothing reads the input after it
    (the graph then computes the same values; the trace check confirms it)."""
    for module in gm.modules():
        if getattr(module, "inplace", None) is True:
            module.inplace = False
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    changed = False
    for n in gm.graph.nodes:
        if n.op == "call_function" and callable(n.target):
            try:
                params = list(inspect.signature(n.target).parameters)
            except (TypeError, ValueError):
                params = []
            if "inplace" in params:
                i = params.index("inplace")
                if n.kwargs.get("inplace") is True:
                    n.kwargs = {**n.kwargs, "inplace": False}
                    changed = True
                elif i < len(n.args) and n.args[i] is True:
                    n.args = n.args[:i] + (False,) + n.args[i + 1:]
                    changed = True
        if not n.args or not isinstance(n.args[0], fx.Node):
            continue
        mutated = n.args[0]
        # a parameter or buffer updated in place is state the model keeps: left alone
        keep = mutated.op == "get_attr" or any(order[u] > order[n] for u in mutated.users if u is not n)
        if keep:
            continue
        if n.op == "call_method" and n.target.endswith("_") and not n.target.endswith("__"):
            if callable(getattr(torch.Tensor, n.target[:-1], None)):
                n.target = n.target[:-1]
                changed = True
        elif n.op == "call_function" and n.target in _IN_PLACE_OPERATORS:
            n.target = _IN_PLACE_OPERATORS[n.target]
            changed = True
    if changed:
        gm.recompile()


@contextlib.contextmanager
def without_fast_path():
    """Run ``torch.nn``'s attention and transformer layers on their plain
    path. Their fused eval-mode fast path computes the same function except
    at padded positions (zeros under a key padding mask), which a traced
    graph, like the layers in training, computes."""
    mha = torch.backends.mha
    enabled = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(enabled)


def _check_against_eager(gm, eager, inputs, traced_out, *, atol, rtol):
    captured: dict[str, Any] = {}
    hooks = []
    module_nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    def keep_first(name):
        def hook(module, args, output):
            captured.setdefault(name, output)  # returns None: output unchanged

        return hook

    for name, mod in eager.named_modules():
        if name in module_nodes:
            hooks.append(mod.register_forward_hook(keep_first(name)))
    try:
        with without_fast_path():
            eager_out = inputs.call(eager)
    finally:
        for h in hooks:
            h.remove()
    if _close(eager_out, traced_out, atol, rtol):
        return
    # Name the first module whose traced output departs from the eager one.
    interp_vals: dict[str, Any] = {}

    class _Capture(fx.Interpreter):
        def run_node(self, n):
            r = super().run_node(n)
            if n.op == "call_module":
                interp_vals.setdefault(n.target, r)
            return r

    _Capture(gm).run(*inputs.for_placeholders(gm))
    for n in gm.graph.nodes:
        if n.op == "call_module" and n.target in captured and n.target in interp_vals:
            if not _close(captured[n.target], interp_vals[n.target], atol, rtol):
                raise TraceError(
                    f"the traced graph does not reproduce the eager model: first difference at the output of '{n.target}'",
                    module_path=str(n.target),
                    source=_node_source(n),
                )
    raise TraceError("the traced graph does not reproduce the eager model's output (no single module differs: "
                     "look for python control flow on tensor values in forward)")


def _close(a, b, atol, rtol) -> bool:
    la, _ = pytree.tree_flatten(a)
    lb, _ = pytree.tree_flatten(b)
    if len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.shape != y.shape:
                return False
            if x.numel() == 0:
                continue
            scale = x.detach().abs().max().item() if x.is_floating_point() else 0.0
            if not torch.allclose(x.double(), y.double(), atol=atol + rtol * scale, rtol=0):
                return False
    return True
