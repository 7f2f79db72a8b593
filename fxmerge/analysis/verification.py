"""Soundness check of permutation groups: permute, run, compare.

On a copy of the model whose weights are made non-degenerate (constant
tensors such as zero-initialised heads, LayerScale, BatchNorm statistics are
re-randomised, otherwise a wrong permutation could go unnoticed), every group
is given a random non-identity permutation respecting its structure; the
output must not change. When it does, bisection names the failing groups.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from torch.utils import _pytree as pytree

from .channels import analyze
from .groups import Group, PermutationGroups
from fxmerge.runtime.inputs import as_inputs
from fxmerge.runtime.tensors import get_tensor


@dataclass
class VerifyReport:
    ok: bool
    checked: int  # number of groups permuted
    failing: list = field(default_factory=list)  # [Group]
    error: float = 0.0  # relative output change with every group permuted
    dtype: str = "float64"
    passes: int = 0  # forward passes used

    def __str__(self) -> str:
        if self.ok:
            return f"verified: {self.checked} groups permuted at once, relative output change {self.error:.2e} ({self.dtype})"
        names = ", ".join(f"#{g.id} {g.kind}" for g in self.failing)
        return f"UNSOUND: {len(self.failing)} of {self.checked} groups change the output ({names}); error {self.error:.2e}"


def _randomize_degenerate(model: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point() or t.numel() < 2:
                continue
            flat = t.reshape(-1)
            if not bool((flat == flat[0]).all()):
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
                continue
            base = float(flat[0])
            scale = max(abs(base), 0.1) * 0.5
            t.copy_(base + scale * torch.randn(t.shape, generator=gen))


def _flat_outputs(y):
    leaves, _ = pytree.tree_flatten(y)
    return [l for l in leaves if isinstance(l, torch.Tensor) and l.is_floating_point()]


def _rel_change(y0, y1) -> float:
    worst = 0.0
    for a, b in zip(_flat_outputs(y0), _flat_outputs(y1)):
        scale = a.abs().max().item() + 1e-12
        worst = max(worst, (a - b).abs().max().item() / scale)
    return worst


def verify(
    model: torch.nn.Module,
    example_inputs,
    groups: Optional[PermutationGroups] = None,
    *,
    seed: int = 0,
    tol: Optional[float] = None,
) -> VerifyReport:
    """Check that permuting every group leaves the model's function unchanged."""
    if groups is None:
        groups = analyze(model, example_inputs)
    inputs = as_inputs(example_inputs)
    gen = torch.Generator().manual_seed(seed)
    base = copy.deepcopy(model).eval()
    _randomize_degenerate(base, gen)
    dtype = torch.float64
    # permuted copies are made from a copy that never ran: some models cache
    # what their forward derives from parameters (LeViT's attention biases in
    # eval mode), and a copy of a model that ran would reuse the stale cache
    try:
        base = base.to(dtype)
        pristine = copy.deepcopy(base)
        run_inputs = inputs.map(lambda x: x.to(dtype) if x.is_floating_point() else x)
        with torch.no_grad():
            y0 = run_inputs.call(base)
    except Exception:
        dtype = torch.float32
        base = base.float()
        pristine = copy.deepcopy(base)
        run_inputs = inputs
        with torch.no_grad():
            y0 = run_inputs.call(base)
    if tol is None:
        tol = 1e-7 if dtype == torch.float64 else 2e-4
    state = {k: v for k, v in list(pristine.named_parameters()) + list(pristine.named_buffers())}
    candidates = [g for g in groups.all_groups if g.kind != "output"]
    passes = 0

    def change(subset) -> float:
        nonlocal passes
        passes += 1
        sampler = groups.sampler(np.random.default_rng(seed + passes), subset)
        permuted = groups.permute_state(state, sampler)
        m = copy.deepcopy(pristine)
        with torch.no_grad():
            for name, t in permuted.items():
                get_tensor(m, name).copy_(t)
            return _rel_change(y0, run_inputs.call(m))

    err = change(candidates)
    failing: list[Group] = []
    if err > tol:
        _bisect(candidates, change, tol, failing)
        if not failing:
            failing = list(candidates)
    checked = [g for g in candidates if g in groups.groups]
    return VerifyReport(
        ok=not failing,
        checked=len(checked),
        failing=failing,
        error=err,
        dtype=str(dtype).replace("torch.", ""),
        passes=passes,
    )


def _bisect(groups, change, tol, failing) -> None:
    if len(groups) == 1:
        failing.extend(groups)
        return
    mid = len(groups) // 2
    halves = [groups[:mid], groups[mid:]]
    bad = [h for h in halves if change(h) > tol]
    if not bad:  # only the combination fails: report it whole
        failing.extend(groups)
        return
    for h in bad:
        _bisect(h, change, tol, failing)
