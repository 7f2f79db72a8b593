"""A merge's options, checked once: ``merge_options`` turns ``merge()``'s
keywords into a frozen ``MergeOptions`` or raises ``InputError`` naming the
bad value and the choices."""
from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import torch

from fxmerge import constants as C
from fxmerge.errors import InputError
from fxmerge.merging.pipeline import MergeOptions
from fxmerge.methods import Method, get_method
from fxmerge.runtime.memory import available_memory, parse_memory

# option -> its choices, for the options that pick from a list
CHOICES = {"labels": C.LABELS, "norm_policy": C.NORM_POLICIES, "ls_inputs": C.LS_INPUTS, "bn_stats": C.BN_STATS,
           "frontier_dtype": C.FRONTIER_DTYPES, "schedule": C.SCHEDULES, "planner": C.PLANNER_SCORES,
           "matching": C.MATCHINGS, "ls_targets": C.LS_TARGETS, "zip_heads": C.ZIP_HEADS, "universe": C.UNIVERSES}


def merge_options(*, method: str, budget: Any, labels: str, matching: Optional[str], ridge: Any, positions: Any,
                  bn_stats: Optional[str], reset_bn: Optional[bool], norm_policy: str, ls_inputs: str,
                  ls_targets: str, planner: str, device: Any, max_memory: Any, frontier_dtype: str, schedule: str,
                  spill_dir: Optional[str], zip_heads: str, strict: bool, seed: int, progress: bool,
                  on_least_squares: Optional[Callable], n_models: int = 2,
                  universe: str = C.DEFAULT_UNIVERSE) -> MergeOptions:
    """The checked options of a merge; the method's record fills what the
    caller left to it (budget, matching, BatchNorm and norm policies)."""
    m = get_method(method)
    if bn_stats is None:
        bn_stats = "source" if reset_bn is False or m.bn_stats is None else m.bn_stats
    picked = {"labels": labels, "norm_policy": m.norm_policy or norm_policy, "ls_inputs": ls_inputs,
              "bn_stats": "source" if m.bn_stats is None else bn_stats, "frontier_dtype": frontier_dtype,
              "schedule": schedule, "planner": planner, "matching": matching or m.matching or "activation",
              "ls_targets": ls_targets, "zip_heads": zip_heads, "universe": universe}
    for name, value in picked.items():
        if value not in CHOICES[name]:
            raise InputError(f"{name} must be one of {', '.join(CHOICES[name])}, got '{value}'")
    if not isinstance(positions, int) or positions < 0:
        raise InputError(f"positions must be a whole number >= 0 (0 keeps every position), got {positions!r}")
    return MergeOptions(method=m.name, budget=_budget(m, budget, n_models), n_models=n_models, ridge=_ridge(ridge),
                        positions=positions,
                        device=_device(device), max_memory=_memory(max_memory), spill_dir=spill_dir,
                        strict=bool(strict), seed=seed, progress=progress, on_least_squares=on_least_squares,
                        **picked)


def _budget(m: Method, budget: Any, n_models: int) -> float:
    try:
        budget = float(budget)
    except (TypeError, ValueError):
        raise InputError(f"budget must be a number between 1 and {n_models}, got {budget!r}") from None
    if not 1.0 <= budget <= n_models or not np.isfinite(budget):
        raise InputError(f"budget must be between 1 and {n_models} (x the cost of one source model, for {n_models} "
                         f"models), got {budget}")
    if m.budgeted:
        return budget
    fixed = m.fixed_cost(n_models)
    if budget not in (1.0, fixed):  # 1.0: merge()'s default, left as it is
        raise InputError(f"method '{m.name}' always costs {fixed:g}x; use 'perm' or 'pleas' for budget {budget}")
    return fixed


def _ridge(ridge: Any) -> float:
    try:
        ridge = float(ridge)
    except (TypeError, ValueError):
        raise InputError(f"ridge must be a number >= 0, got {ridge!r}") from None
    if not ridge >= 0 or not np.isfinite(ridge):
        raise InputError(f"ridge must be a number >= 0, got {ridge}")
    return ridge


def _device(device: Any) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device '{device}': use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' requested but no CUDA GPU is available: use --device cpu")
    return device


def _memory(max_memory: Any) -> int:
    try:
        max_memory = parse_memory(max_memory)
    except ValueError as e:
        raise InputError(str(e)) from None
    return int(C.DEFAULT_MEMORY_SHARE * available_memory()) if max_memory is None else max_memory
