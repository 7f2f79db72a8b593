"""Checks of what a merge is given: the source models and the calibration
data. Each failure is an ``InputError`` naming the problem and the remedy."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from fxmerge.errors import InputError
from fxmerge.runtime.inputs import Inputs


def model_name(i: int) -> str:
    """How messages name source model ``i``: A, B, C, ... (at most
    ``MAX_MODELS`` of them)."""
    return chr(ord("A") + i)


def check_same_architecture(a: nn.Module, b: nn.Module, name_b: str = "B") -> None:
    sa, sb = a.state_dict(), b.state_dict()
    for name, t in sa.items():
        if name not in sb:
            raise InputError(f"the models differ: model {name_b} has no parameter '{name}' (model A: {tuple(t.shape)})")
        if tuple(t.shape) != tuple(sb[name].shape):
            raise InputError(
                f"the models differ at '{name}': model A {tuple(t.shape)}, model {name_b} {tuple(sb[name].shape)}"
            )
    for name in sb:
        if name not in sa:
            raise InputError(f"the models differ: model A has no parameter '{name}'")


def check_finite_state(state: dict, which: str) -> None:
    for name, t in state.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            raise InputError(f"model {which} has non-finite values in '{name}': repair or retrain the checkpoint")


def reiterable(data) -> Iterable:
    """``data`` as something the passes can iterate more than once."""
    if data is None:
        raise InputError("no calibration data: pass a DataLoader, a list of tensors or (inputs, targets) pairs")
    if iter(data) is data:  # a one-shot iterator: keep its items for the later passes
        data = list(data)
    return data


def example_from(batches: Iterable[Inputs]) -> Inputs:
    """The first two calibration inputs (where the budget is counted by default)."""
    for x in batches:
        if x.batch_size < 1:
            continue
        return x.head(2)
    raise InputError("the calibration data is empty: give at least two inputs")


def count_images(batches: Iterable[Inputs]) -> int:
    """How many inputs ``batches`` holds; non-finite values are refused."""
    n = 0
    for i, x in enumerate(batches):
        if any(t.is_floating_point() and not torch.isfinite(t).all() for t in x.tensors()):
            raise InputError(f"the calibration data has non-finite values (batch {i}): clean or re-normalise it")
        n += x.batch_size
    return n
