"""The tracer: ``torch.fx`` symbolic tracing that sees into what timm hides.

timm registers modules and functions that plain symbolic tracing cannot go
through (python control flow on sizes, padding to a window) as leaves. A
leaf is opaque to the analysis: every axis it touches is pinned, so the
channels around it can neither be matched nor widened. ``FxTracer`` keeps a
concrete value for every node it creates (it runs the node on the example
inputs as it records it), so control flow on sizes and shapes takes the
branch the example inputs take; it then traces *into* the registered leaves
that have no rule of their own (``trace_into``), falling back to a leaf, one
module at a time, where even that fails. A graph traced that way holds for
inputs of the example's size (``Traced.specialized`` names the modules).
Control flow on tensor values (data, not sizes) still fails as in plain
tracing.
"""
from __future__ import annotations

import contextlib
import functools
import operator
import sys
from typing import Callable, Optional, Sequence

import torch
import torch.fx as fx
from torch.fx.node import map_arg

from fxmerge.runtime.inputs import Inputs

# The eager module call and attribute lookup, as they are outside tracing
# (the tracer patches both while it runs): node values are computed eagerly.
_EAGER_CALL = torch.nn.Module.__call__
_EAGER_GETATTR = torch.nn.Module.__getattr__
# Values that describe a tensor's size or placement, not its data: control
# flow on them (and on numbers computed from them alone) is traced at the
# example's value.
_SIZE_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device", "is_cuda"})
_SIZE_METHODS = frozenset({"size", "dim", "numel", "ndimension"})


@contextlib.contextmanager
def _unwrapped(trace_into: Callable[[object], bool]):
    """Functions registered with ``torch.fx.wrap`` (torchvision's Swin
    attention) that ``trace_into`` accepts are traced into for the duration."""
    from torch.fx import _symbolic_trace as symbolic

    table = getattr(symbolic, "_wrapped_fns_to_patch", None)
    if not isinstance(table, dict):
        yield
        return
    opened = {key: scope for key, scope in table.items()
              if not getattr(scope.get(key[1]), "__module__", "torch.fx").startswith("torch.") and trace_into(scope.get(key[1]))}
    for key in opened:
        del table[key]
    try:
        yield
    finally:
        table.update(opened)


class SizeProxy(fx.Proxy):
    """A proxy that python may read as a number or a length where its value
    depends on sizes alone (``int(n ** .5)``, ``range(n)``): the example's
    value, as control flow on sizes is."""

    def _size(self):
        return self.tracer.size_value(self)

    def __int__(self):
        return int(self._size())

    def __index__(self):
        return int(self._size())

    def __float__(self):
        return float(self._size())

    def __len__(self):
        return len(self._size())

    def __setitem__(self, key, value):  # a table filled in place (timm's relative position indices)
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})


@contextlib.contextmanager
def _eager_modules():
    call, getattr_ = torch.nn.Module.__call__, torch.nn.Module.__getattr__
    torch.nn.Module.__call__, torch.nn.Module.__getattr__ = _EAGER_CALL, _EAGER_GETATTR
    try:
        yield
    finally:
        torch.nn.Module.__call__, torch.nn.Module.__getattr__ = call, getattr_


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
    """A tracer that treats timm's registered no-trace modules as leaves
    unless ``trace_into`` says to go through them, autowraps timm's registered
    functions, traces through the ``torch.nn`` transformer containers
    (``TRACEABLE_FORWARDS``) and, given example ``inputs``, follows control
    flow on sizes at their example values."""

    def __init__(self, leaf_modules: Sequence[type] = (), autowrap_functions: Sequence = (), *,
                 inputs: Optional[Inputs] = None, trace_into: Callable[[object], bool] = lambda obj: False):
        timm_mods, timm_fns = _timm_notrace()
        timm_fns = tuple(f for f in timm_fns if inputs is None or not trace_into(f))
        super().__init__(autowrap_functions=timm_fns + tuple(autowrap_functions))
        self.record_stack_traces = True
        self.user_leaves = tuple(leaf_modules)
        self.hidden = tuple(timm_mods)  # leaves unless traced into
        self.trace_into = trace_into if inputs is not None else (lambda cls: False)
        self.inputs = inputs
        self.values: dict = {}  # node -> its value on the example inputs
        self.sizes: set = set()  # nodes whose value depends on sizes only
        self.placeholders = 0
        self.forced_leaves: set = set()  # modules traced into in vain: leaves
        self.specialized: list = []  # modules traced into: the graph holds at the example's sizes
        self.abandoned: list = []  # get_attr nodes of failed attempts (cached by the tracer)

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        if id(m) in self.forced_leaves or (self.user_leaves and isinstance(m, self.user_leaves)):
            return True
        if self.hidden and isinstance(m, self.hidden):
            return not self.trace_into(type(m))
        if type(m) in TRACEABLE_FORWARDS:
            return False
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        traceable = TRACEABLE_FORWARDS.get(type(m))
        if traceable is not None and not self.is_leaf_module(m, ""):
            forward = functools.partial(traceable, m)
        if not (self.hidden and isinstance(m, self.hidden)) or self.is_leaf_module(m, ""):
            return super().call_module(m, forward, args, kwargs)
        last = next(reversed(self.graph.nodes))
        stack, calls = self.module_stack.copy(), dict(self.num_calls)
        try:
            out = super().call_module(m, forward, args, kwargs)
        except Exception:  # not even at the example's sizes: a leaf after all
            self._drop_after(last)
            self.module_stack.clear()
            self.module_stack.update(stack)
            self.num_calls = calls
            self.forced_leaves.add(id(m))
            return super().call_module(m, forward, args, kwargs)
        self.specialized.append(self.path_of_module(m))
        return out

    def _drop_after(self, last: fx.Node) -> None:
        created = []
        for node in reversed(self.graph.nodes):
            if node is last:
                break
            created.append(node)
        for node in created:  # latest first: users go before what they read
            if node.op == "get_attr":  # may be cached for later reads: erased after tracing if unread
                self.abandoned.append(node)
                continue
            self.values.pop(node, None)
            self.sizes.discard(node)
            self.graph.erase_node(node)

    def trace(self, root, concrete_args=None):
        with _unwrapped(self.trace_into):
            graph = super().trace(root, concrete_args)
        # what only decided a branch (sizes compared, a cached table's shape
        # read) and reads of failed attempts: nothing reads them any more
        unread = set(self.sizes) | set(self.abandoned)
        for node in reversed(graph.nodes):
            if node in unread and not node.users and not node.is_impure():  # asserts stay
                unread.update(i for i in node.all_input_nodes if i.op == "get_attr")
                graph.erase_node(node)
        self.values.clear()
        return graph

    # -- concrete values ---------------------------------------------------

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if self.inputs is None or kind == "output":
            return node
        try:
            with _eager_modules(), torch.no_grad():
                value = self._evaluate(node)
        except Exception:  # no value: control flow on it fails as in plain tracing
            return node
        self.values[node] = value
        if not isinstance(value, torch.Tensor) and self._size_only(node):
            self.sizes.add(node)
        return node

    def _size_only(self, node: fx.Node) -> bool:
        if node.op == "placeholder":
            return bool(node.args)  # a pinned optional argument
        if node.op == "call_function" and node.target is getattr and node.args[1] in _SIZE_ATTRIBUTES:
            return True
        if node.op == "call_method" and node.target in _SIZE_METHODS:
            return True
        if node.op in ("get_attr", "call_module"):
            return False
        return all(i in self.sizes for i in node.all_input_nodes)

    def _evaluate(self, node: fx.Node):
        if node.op == "placeholder":
            if node.args:
                return node.args[0]
            i, self.placeholders = self.placeholders, self.placeholders + 1
            return self.inputs.args[i] if i < len(self.inputs.args) else self.inputs.kwargs[node.target]
        args = map_arg(node.args, lambda n: self.values[n])
        kwargs = map_arg(node.kwargs, lambda n: self.values[n])
        if node.op == "get_attr":
            return functools.reduce(getattr, node.target.split("."), self.root)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return self.root.get_submodule(node.target)(*args, **kwargs)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return SizeProxy(node, self)

    def size_value(self, obj):
        """The example's value of a proxy that depends on sizes alone."""
        if obj.node not in self.sizes:
            raise fx.proxy.TraceError(f"'{obj.node.name}' depends on tensor values, not sizes alone: "
                                      "it cannot be read as a python number while tracing")
        return self.values[obj.node]

    def to_bool(self, obj) -> bool:
        if obj.node in self.sizes:
            return bool(self.values[obj.node])
        return super().to_bool(obj)

    def iter(self, obj):
        if obj.node in self.sizes:
            return iter([obj[i] for i in range(len(self.values[obj.node]))])
        return super().iter(obj)
