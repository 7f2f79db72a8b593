"""A model's inputs, and reading them out of calibration data.

Models may take one tensor, several (``forward(self, x1, x2)``), keyword
tensors, or one dict. ``Inputs`` holds one call's positional and keyword
values. ``split_item`` turns one item of calibration data into the inputs of
a model whose forward takes the required parameters ``names``:

* a tensor: the only input;
* a dict: its entries named like the forward's parameters (other keys, such
  as targets, are ignored); a dict that does not name them is the single
  argument of a forward that takes one;
* a tuple or list: a nested tuple, list or dict first (``((x1, x2), y)``,
  ``({"x1": .., "x2": ..}, y)``) holds the inputs; otherwise the first
  ``len(names)`` entries are the inputs and the rest are targets
  (``(x, y)`` for one input, ``(x1, x2, y)`` for two).

Anything else: pass ``batch_inputs=`` (a function from an item to a tensor, a
tuple of positional inputs or a dict of keyword inputs) to ``fxmerge.merge``.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from fxmerge.errors import InputError


@dataclass(frozen=True)
class Inputs:
    """The inputs of one model call."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def call(self, model):
        return model(*self.args, **self.kwargs)

    def tensors(self) -> list:
        leaves, _ = pytree.tree_flatten((self.args, self.kwargs))
        return [t for t in leaves if isinstance(t, torch.Tensor)]

    @property
    def batch_size(self) -> int:
        ts = [t for t in self.tensors() if t.ndim > 0]
        return int(ts[0].shape[0]) if ts else 1

    def map(self, fn: Callable) -> "Inputs":
        """Apply ``fn`` to every tensor."""
        f = lambda v: fn(v) if isinstance(v, torch.Tensor) else v  # noqa: E731
        return Inputs(pytree.tree_map(f, self.args), pytree.tree_map(f, self.kwargs))

    def to(self, device, float_dtype=torch.float32) -> "Inputs":
        """On ``device``, floating tensors as ``float_dtype``."""
        return self.map(lambda t: t.to(device=device, dtype=float_dtype if t.is_floating_point() else t.dtype))

    def head(self, n: int) -> "Inputs":
        """The first ``n`` examples of every batched tensor."""
        return self.map(lambda t: t[:n] if t.ndim > 0 else t)

    def for_placeholders(self, gm: fx.GraphModule) -> tuple:
        """The positional values of ``gm``'s placeholders without defaults,
        in graph order (keyword inputs matched by name)."""
        out, i = [], 0
        for node in gm.graph.nodes:
            if node.op != "placeholder" or node.args:
                continue
            if i < len(self.args):
                out.append(self.args[i])
                i += 1
            elif node.target in self.kwargs:
                out.append(self.kwargs[node.target])
            else:
                raise InputError(f"no value for the model input '{node.target}': name it in the calibration items "
                                 "or pass batch_inputs=")
        return tuple(out)


def as_inputs(value) -> Inputs:
    """Example inputs as given by a caller: a tensor, a tuple of positional
    inputs, a dict of keyword inputs, or ``Inputs``."""
    if isinstance(value, Inputs):
        return value
    if isinstance(value, torch.Tensor):
        return Inputs((value,))
    if isinstance(value, dict):
        return Inputs((), dict(value))
    if isinstance(value, (tuple, list)):
        return Inputs(tuple(value))
    raise InputError(f"model inputs must be a tensor, a tuple of tensors or a dict of tensors, got {type(value).__name__}")


def forward_inputs(model: torch.nn.Module) -> list:
    """Names of the forward parameters that take an input (no default)."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return ["input"]
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in sig.parameters.values() if p.kind in kinds and p.default is inspect.Parameter.empty]


def split_item(item, names: Sequence[str]) -> Inputs:
    """The model inputs inside one item of calibration data (see the module
    docstring for the conventions)."""
    n = max(len(names), 1)
    if isinstance(item, torch.Tensor):
        return Inputs((item,))
    if isinstance(item, dict):
        if names and all(k in item for k in names):
            return Inputs((), {k: item[k] for k in names})
        if n == 1:
            return Inputs((item,))
        raise InputError(f"a calibration item has keys {sorted(item)[:6]} but the model takes {list(names)}: "
                         "name the inputs like the forward's parameters or pass batch_inputs=")
    if isinstance(item, (tuple, list)) and item:
        first = item[0]
        if isinstance(first, (tuple, list, dict)):
            return as_inputs(first) if not isinstance(first, dict) else split_item(first, names)
        if len(item) < n:
            raise InputError(f"a calibration item has {len(item)} entries but the model takes {n} inputs "
                             f"({', '.join(names)}): pass batch_inputs=")
        values = tuple(item[:n])
        if not all(isinstance(v, torch.Tensor) for v in values):
            raise InputError(f"calibration data must yield tensors, (inputs, targets) pairs or dicts of tensors, got "
                             f"({', '.join(type(v).__name__ for v in item)})")
        return Inputs(values)
    raise InputError(f"calibration data must yield tensors, (inputs, targets) pairs or dicts of tensors, got "
                     f"{type(item).__name__}: pass batch_inputs=")


def calibration_inputs(data: Iterable, names: Sequence[str], device, batch_inputs: Optional[Callable] = None
                       ) -> Iterator[Inputs]:
    """The ``Inputs`` of every item of ``data``, on ``device``."""
    for item in data:
        inputs = as_inputs(batch_inputs(item)) if batch_inputs is not None else split_item(item, names)
        yield inputs.to(device)
