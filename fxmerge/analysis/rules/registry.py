"""The per-op rule registry.

A rule states one op kind's channel semantics: given the layouts of its tensor
arguments (``TL`` objects in place of tensors, python values elsewhere) it
unifies, pins and refines dims, and returns the layouts of its outputs. Rules
are registered per module class (or its qualified name, for classes that may
not be importable), per function object and per tensor-method name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.fx as fx

from fxmerge.runtime.tensors import get_tensor
from fxmerge.analysis.ir import Dep, Dim, Layout, find, is_pinned, layout_size, localize, pin, unify


def op_kind(node: fx.Node, module: Optional[torch.nn.Module] = None) -> str:
    """A readable name of a node's op kind (``call_module:nn.Conv2d``,
    ``call_function:F.relu``, ``call_method:reshape``)."""
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


@dataclass(frozen=True)
class TL:
    """The layout of one tensor value: one layout per axis. ``member`` names
    the parameter or buffer this tensor is, when it is one."""

    lays: tuple
    shape: tuple
    member: Optional[str] = None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def axis(self, i: int) -> int:
        return i + self.ndim if i < 0 else i

    def __getitem__(self, i: int) -> Layout:
        return self.lays[i]


Rule = Callable[..., Any]

# How an op behaves when its channel axes are widened to [A-only | merged |
# B-only] (every rule says which, with ``widening``):
WIDENING = {
    "elementwise": "acts entry by entry: widened axes pass through",
    "layout": "moves, splits, joins or copies entries: the widened layout follows (its constants are rewritten)",
    "spatial": "acts on each channel separately along spatial or token axes, which never widen",
    "contraction": "a weighted sum over input channels: emitted as row blocks, each output reading only its model's "
                   "and the merged inputs",
    "per_channel": "statistics per channel (BatchNorm, InstanceNorm) or per block of channels (GroupNorm): widened "
                   "channels keep their own",
    "normalizes": "statistics over all features of an axis (LayerNorm, RMSNorm): split per model where the rewrite "
                  "can (norm_policy='split'), otherwise kept merged",
    "mixes": "combines the features along an axis (a reduction, softmax or normalisation over channels): where the "
             "axis widens the op runs once per model view, on that model's own features",
    "attention": "heads widen or merge whole; within a head nothing widens",
    "pins": "depends on the order along an axis: the axis is pinned (identity permutation)",
}


def widening(kind: str):
    """Declare how a rule's op behaves under widening (see ``WIDENING``)."""
    if kind not in WIDENING:
        raise ValueError(f"unknown widening behaviour '{kind}'")

    def deco(fn):
        fn.widening = kind
        return fn

    return deco


@dataclass(frozen=True)
class Contraction:
    """A node that contracts a channel axis of its input with a weight. The
    weight is a member (a parameter or buffer), or computed in the graph from
    members (a standardised convolution weight): then ``weight`` is None and
    ``lays``/``shape`` describe it, and ``contracted`` names the members
    whose axes it contracts."""

    node: str
    weight: Optional[str]  # member name of the weight
    weight_in_axis: int
    input_axis: int  # channel axis of the input tensor
    output_axis: int  # channel axis of the output tensor
    groups: int = 1
    # for a weight applied inside an opaque module (the packed projections of
    # nn.MultiheadAttention): ``taps(module, *inputs, output=...)`` gives the
    # weight's input and output values from the module, the node's input
    # values and its output, so least squares can fit it; None: the node's
    # own input and output
    taps: Optional[Callable] = None
    lays: tuple = ()
    shape: tuple = ()
    contracted: tuple = ()  # (member, axis) pairs whose axis is the contracted one


@dataclass(frozen=True)
class ActivationProduct:
    """A product of two activations (attention scores ``q k^T``, the weighted
    sum of values): no weight to widen, but its multiply-accumulates are the
    product of the widths of every axis it spans (output axes and the
    contracted one), so widening heads raises its cost."""

    node: str
    lays: tuple  # layouts of the axes the multiply-accumulates run over
    sizes: tuple


@dataclass(frozen=True)
class Probe:
    """An activation inside an opaque module that matching needs (the packed
    q/k/v of ``nn.MultiheadAttention``): ``compute(module, *inputs)`` gives it
    from the node's module and input values, ``lays`` is its layout."""

    node: str
    compute: Callable
    lays: tuple


@dataclass(frozen=True)
class Normalization:
    """A node that normalises its input over trailing feature axes (LayerNorm,
    RMSNorm): its statistics mix every feature of the normalised axes, so
    widening those axes changes the function unless the rewrite splits the
    statistics per source model."""

    node: str
    axes: int  # how many trailing axes are normalised
    rms: bool = False


@dataclass(frozen=True)
class Mixing:
    """An op that combines the features along an axis (a reduction,
    softmax or normalisation over channels). It commutes with permutations,
    but once the axis is widened it would combine both models' features,
    which the ensemble never does: where ``lays`` widen, the merge runs the
    op once per model view (``kind`` is the op kind, for the report)."""

    node: str
    kind: str
    lays: tuple


def weight_layouts(pg, c: Contraction) -> tuple:
    """A contraction's weight layouts: the member's final ones, or those the
    rule saw for a computed weight."""
    return pg.members[c.weight] if c.weight is not None else c.lays


def weight_shape(pg, c: Contraction) -> tuple:
    return pg.member_shapes[c.weight] if c.weight is not None else c.shape


class RuleRegistry:
    def __init__(self):
        self.modules: dict[Any, Rule] = {}  # class object or "module.QualName"
        self.functions: dict[Any, Rule] = {}
        self.methods: dict[str, Rule] = {}

    def module(self, *classes):
        def deco(fn):
            for c in classes:
                self.modules[c] = fn
            return fn

        return deco

    def function(self, *fns):
        """Register a rule for functions: objects, or ``"module.qualname"``
        strings for functions of libraries that need not be imported."""

        def deco(fn):
            for f in fns:
                if f is not None:
                    self.functions[f] = fn
            return fn

        return deco

    def method(self, *names):
        def deco(fn):
            for n in names:
                self.methods[n] = fn
            return fn

        return deco

    def for_module(self, mod: torch.nn.Module) -> Optional[Rule]:
        return self.for_class(type(mod))

    def for_class(self, cls: type) -> Optional[Rule]:
        rule = self.modules.get(cls)
        if rule is None:
            rule = self.modules.get(f"{cls.__module__}.{cls.__qualname__}")
        return rule

    def for_function(self, fn) -> Optional[Rule]:
        try:
            rule = self.functions.get(fn)
        except TypeError:  # unhashable target
            return None
        if rule is None:  # registered by qualified name (a library fxmerge does not import)
            rule = self.functions.get(f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', '')}")
        return rule


RULES = RuleRegistry()


class OpTable:
    """One fact about op kinds, registered by the op's rule file: entries
    keyed by module class (found through the class's bases, or by qualified
    name) or by function object."""

    def __init__(self):
        self.rules: dict = {}

    def register(self, *keys):
        def deco(entry):
            for k in keys:
                self.rules[k] = entry
            return entry

        return deco

    def for_module(self, mod):
        for cls in type(mod).__mro__:
            rule = self.rules.get(cls) or self.rules.get(f"{cls.__module__}.{cls.__qualname__}")
            if rule is not None:
                return rule
        return None

    def for_function(self, fn):
        return self.rules.get(fn)

    def for_node(self, gm, node):
        """The entry of a graph node's op (a module call or a function call)."""
        if node.op == "call_module":
            return self.for_module(gm.get_submodule(node.target))
        if node.op == "call_function":
            return self.for_function(node.target)
        return None


# How to make a module's attributes agree with its widened parameters
# (``in_channels``, ``num_features``, ``groups`` ...): an entry gets the module
# and the old shapes of its parameters (and may return a replacement module).
RESIZE = OpTable()
# How a widened contraction runs without its structural zeros: for a module
# class, ``entry(module)`` gives ``(row-block module class, or None for a
# module that splits its own projections, the weight's input axis)``, or None
# when the module is not the plain op; for a function, ``(op, argument names)``
# of ``PartialFunctional``.
ROW_BLOCKS = OpTable()
# Whether least squares can fit a module's weight: ``entry(module)`` is true
# for a plain convolution or linear map of its weight.
LEAST_SQUARES = OpTable()
# How a normalisation gets per-model statistics once the features it reads
# widen: ``entry(gm, node, norm, roles, calls)`` rewrites the node (``calls``:
# how many nodes call each module); for a module class, ``entry.applies(module)``
# says whether the module computes the plain op.
SPLIT_NORM = OpTable()


class Opaque(Exception):
    """Raised by a rule that cannot express an op instance: the engine pins
    every axis the op touches and reports ``reason``."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class RuleContext:
    """What a rule may do: read the op's output shapes, make dims, touch the
    module's parameters, and unify/pin layouts."""

    def __init__(self, analysis, node, module=None):
        self.analysis = analysis
        self.node = node
        self.module = module
        self.out_value = node.meta.get("fxm_value")

    # -- shapes ------------------------------------------------------------
    @property
    def out_shape(self) -> tuple:
        v = self.out_value
        if not hasattr(v, "shape"):
            raise Opaque("expected a tensor output")
        return tuple(v.shape)

    def out_shapes(self) -> list:
        return [tuple(v.shape) if hasattr(v, "shape") else None for v in self.out_value]

    # -- making layouts ----------------------------------------------------
    def fresh(self, shape=None, *, pinned: bool = False) -> TL:
        shape = self.out_shape if shape is None else tuple(shape)
        return TL(tuple(Dim(s, pinned=pinned) for s in shape), shape)

    def tl(self, lays, shape=None) -> TL:
        shape = self.out_shape if shape is None else tuple(shape)
        lays = localize(tuple(lays))
        if len(lays) != len(shape) or any(layout_size(l) != s for l, s in zip(lays, shape)):
            raise Opaque(f"rule produced layout sizes {[layout_size(l) for l in lays]} for shape {list(shape)}")
        return TL(lays, shape)

    def like(self, x: "TL") -> TL:
        if x.shape != self.out_shape:
            raise Opaque(f"elementwise op changed shape {list(x.shape)} -> {list(self.out_shape)}")
        return x if x.member is None else TL(x.lays, x.shape)

    def param(self, name: str) -> Optional[TL]:
        """The layout of the called module's parameter or buffer ``name``."""
        t = get_tensor(self.module, name)
        if t is None:
            return None
        full = f"{self.node.target}.{name}"
        return self.analysis.member(full, t)

    def set_member_axis(self, x: TL, axis: int, lay: Layout) -> None:
        """State that axis ``axis`` of the parameter ``x`` has layout ``lay``
        (which may be dependent on another axis). Falls back to unification,
        which is stricter, when ``x`` is not a plain parameter."""
        if x.member is not None and self.analysis.replace_member_axis(x.member, axis, x.lays[axis], lay):
            return
        unify(x.lays[axis], lay)

    def contraction(self, weight: TL, *, weight_in_axis: int, input_axis: int, output_axis: int, groups: int = 1,
                    part: str = "", taps: Optional[Callable] = None) -> None:
        """Record that this node contracts its input's ``input_axis`` with
        ``weight``'s ``weight_in_axis`` (a convolution or linear layer): the
        merge engine widens such weights block by block, counts their cost and
        fits them by least squares. A node with several weights (packed
        attention) names each ``part`` and gives its ``taps`` (see ``Contraction``)."""
        key = f"{self.node.name}#{part}" if part else self.node.name
        in_lay = weight.lays[weight_in_axis]
        if weight.member is not None:
            contracted = ((weight.member, weight_in_axis),)
        else:  # computed from members: those whose axis is this very layout
            contracted = tuple((name, i) for name, lays in self.analysis.members.items()
                               for i, lay in enumerate(lays) if lay is in_lay)
        self.analysis.contractions[key] = Contraction(
            self.node.name, weight.member, weight_in_axis, input_axis, output_axis, groups, taps,
            tuple(weight.lays), tuple(weight.shape), contracted)

    def activation_product(self, lays, sizes, *, part: str = "") -> None:
        """Record a product of two activations spanning axes ``lays`` of sizes
        ``sizes`` (its cost; see ``ActivationProduct``)."""
        key = f"{self.node.name}#{part}" if part else self.node.name
        self.analysis.activation_products[key] = ActivationProduct(self.node.name, tuple(lays), tuple(int(s) for s in sizes))

    def probe(self, compute: Callable, lays) -> None:
        """Expose an activation computed inside this node's module to matching
        (see ``Probe``)."""
        self.analysis.probes.setdefault(self.node.name, []).append(Probe(self.node.name, compute, tuple(lays)))

    def mixing(self, *lays) -> None:
        """Record that this node combines the features along each of ``lays``
        (see ``Mixing``); pinned layouts need no record. Rules tagged
        ``widening("mixes")`` call it for the axes they combine."""
        live = tuple(l for l in lays if not is_pinned(l))
        if live:
            self.analysis.mixings.append(Mixing(self.node.name, op_kind(self.node, self.module), live))

    def pin_axis(self, lay, reason: str) -> None:
        """Pin a layout for this op kind's ``reason``, and record it when it
        was free (the merge report names what keeps channels from widening)."""
        if not is_pinned(lay):
            self.record_pin(reason)
        pin(lay)

    def record_pin(self, reason: str) -> None:
        """Record that this op kind pinned an axis that was free, and why."""
        self.analysis.rule_pins.setdefault(op_kind(self.node, self.module), reason)

    def normalization(self, axes: int, *, rms: bool = False) -> None:
        """Record that this node normalises its input over its ``axes``
        trailing axes (mean and variance, or only the RMS)."""
        self.analysis.normalizations[self.node.name] = Normalization(self.node.name, axes, rms)

    # -- constraints -------------------------------------------------------
    @staticmethod
    def unify(a: Layout, b: Layout) -> None:
        unify(a, b)

    @staticmethod
    def pin(*xs) -> None:
        for x in xs:
            if isinstance(x, TL):
                for l in x.lays:
                    pin(l)
            elif x is not None:
                pin(x)

    @staticmethod
    def hint(lay: Layout, tag: str) -> None:
        if isinstance(lay, Dep):
            for t in lay.table:
                RuleContext.hint(t, tag)
        else:
            find(lay).hints.add(tag)


def tensors_in(value) -> list:
    """Every TL in a (nested) argument structure."""
    out = []
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, TL):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v.values())
    return out
