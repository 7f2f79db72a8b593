"""Turning a model into a checked ``torch.fx`` graph.

``trace`` works on a deep copy (tracing can mutate module caches), respects
timm's no-trace leaf modules and autowrapped functions, pins optional forward
arguments to their defaults, records every node's value summary (``ValueProp``)
and checks that the GraphModule reproduces the eager model.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import operator
import os
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from .weight_folding import fold_weight_statistics
from fxmerge.errors import TraceError
from fxmerge.runtime.inputs import Inputs, as_inputs


def _timm_notrace():
    if "timm" not in sys.modules:  # a model without timm's layers (timm loads slowly)
        return (), ()
    try:
        from timm.layers import _fx as timm_fx
    except Exception:  # timm too old: plain tracing
        return (), ()
    mods = tuple(m for m in timm_fx.get_notrace_modules() if isinstance(m, type))
    fns = tuple(f for f in timm_fx.get_notrace_functions() if callable(f))
    return mods, fns


def _encoder_layer(layer, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
    """``nn.TransformerEncoderLayer.forward`` without its fused fast path
    (whose checks are python control flow on tensor properties): the
    same computation, traceable."""
    x = src
    if layer.norm_first:
        x = x + layer._sa_block(layer.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
        return x + layer._ff_block(layer.norm2(x))
    x = layer.norm1(x + layer._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
    return layer.norm2(x + layer._ff_block(x))


def _encoder(encoder, src, mask=None, src_key_padding_mask=None, is_causal=None):
    """``nn.TransformerEncoder.forward`` without the nested-tensor fast path."""
    out = src
    for mod in encoder.layers:
        out = mod(out, src_mask=mask, is_causal=bool(is_causal), src_key_padding_mask=src_key_padding_mask)
    return encoder.norm(out) if encoder.norm is not None else out


def _decoder_layer(layer, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                   memory_key_padding_mask=None, tgt_is_causal=False, memory_is_causal=False):
    """``nn.TransformerDecoderLayer.forward``, traceable."""
    x = tgt
    if layer.norm_first:
        x = x + layer._sa_block(layer.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal)
        x = x + layer._mha_block(layer.norm2(x), memory, memory_mask, memory_key_padding_mask, memory_is_causal)
        return x + layer._ff_block(layer.norm3(x))
    x = layer.norm1(x + layer._sa_block(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal))
    x = layer.norm2(x + layer._mha_block(x, memory, memory_mask, memory_key_padding_mask, memory_is_causal))
    return layer.norm3(x + layer._ff_block(x))


def _decoder(decoder, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
             memory_key_padding_mask=None, tgt_is_causal=None, memory_is_causal=False):
    """``nn.TransformerDecoder.forward``, traceable."""
    out = tgt
    for mod in decoder.layers:
        out = mod(out, memory, tgt_mask=tgt_mask, memory_mask=memory_mask, tgt_key_padding_mask=tgt_key_padding_mask,
                  memory_key_padding_mask=memory_key_padding_mask, tgt_is_causal=bool(tgt_is_causal),
                  memory_is_causal=memory_is_causal)
    return decoder.norm(out) if decoder.norm is not None else out


def _transformer(model, src, tgt, src_mask=None, tgt_mask=None, memory_mask=None, src_key_padding_mask=None,
                 tgt_key_padding_mask=None, memory_key_padding_mask=None, src_is_causal=None, tgt_is_causal=None,
                 memory_is_causal=False):
    """``nn.Transformer.forward`` (encoder, then decoder on its memory), traceable."""
    memory = model.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask, is_causal=src_is_causal)
    return model.decoder(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                         tgt_key_padding_mask=tgt_key_padding_mask, memory_key_padding_mask=memory_key_padding_mask,
                         tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)


# torch.nn containers traced through with a forward of the same computation
TRACEABLE_FORWARDS = {
    torch.nn.Transformer: _transformer,
    torch.nn.TransformerEncoderLayer: _encoder_layer,
    torch.nn.TransformerEncoder: _encoder,
    torch.nn.TransformerDecoderLayer: _decoder_layer,
    torch.nn.TransformerDecoder: _decoder,
}


class FxTracer(fx.Tracer):
    """A tracer that treats timm's registered no-trace modules as leaves,
    autowraps its registered functions, and traces through the
    ``torch.nn`` transformer containers (``TRACEABLE_FORWARDS``)."""

    def __init__(self, leaf_modules: Sequence[type] = (), autowrap_functions: Sequence = ()):
        timm_mods, timm_fns = _timm_notrace()
        super().__init__(autowrap_functions=tuple(timm_fns) + tuple(autowrap_functions))
        self.leaf_types = tuple(timm_mods) + tuple(leaf_modules)
        self.record_stack_traces = True

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        if type(m) in TRACEABLE_FORWARDS:
            return False
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        traceable = TRACEABLE_FORWARDS.get(type(m))
        if traceable is not None and not (self.leaf_types and isinstance(m, self.leaf_types)):
            forward = functools.partial(traceable, m)
        return super().call_module(m, forward, args, kwargs)


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
        if lines[i].startswith("File ") and "/torch/" not in lines[i].replace(os.sep, "/"):
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
    eager = copy.deepcopy(model).eval()
    root = copy.deepcopy(model).eval()
    concrete = _concrete_args(root, inputs)
    tracer = FxTracer(leaf_modules=leaf_modules)
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
    return Traced(gm=gm, example_inputs=inputs, concrete_args=concrete)


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
