"""The merging methods: one ``Method`` record per method, in one registry.

A record says everything the pipeline, the options, the report, the command
line and the docs need to know about a method: the passes it runs (names in
the pass registry, ``fxmerge.merging.pipeline.PASSES``), whether its cost
follows the budget, its default BatchNorm policy and matching. Nothing
outside this module compares a method's name: code reads the record.

Adding a method is one ``register_method(Method(...))`` plus the passes it
names (``@merge_pass``), as timm's ``register_model`` maps a name to its
entry point. This module imports nothing heavy, so the command line builds
its choices from it without torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from fxmerge.errors import InputError


@dataclass(frozen=True)
class Method:
    """One merging method.

    ``passes``: pass names, run in order. ``fixed_budget``: the cost the
    method always has (``None``: its cost follows the budget). ``bn_stats``:
    its default BatchNorm policy (``None``: it keeps the sources' statistics
    whatever is asked). ``matching``: its default matching (``None``: it
    pairs no features across the models, and the report says "identity").
    ``norm_policy``: a policy the method imposes (``None``: the caller's).
    ``permutes``: it permutes weights, so a large share of weights it cannot
    permute deserves a warning. ``summary``: one line for the docs and the
    command line's help."""

    name: str
    passes: tuple
    summary: str
    fixed_budget: Optional[float] = None
    bn_stats: Optional[str] = "reset"
    matching: Optional[str] = "activation"
    norm_policy: Optional[str] = None
    permutes: bool = True
    side_by_side: bool = False

    @property
    def budgeted(self) -> bool:
        return self.fixed_budget is None

    def fixed_cost(self, n_models: int) -> Optional[float]:
        """The cost of the method's merges of ``n_models`` models (``None``:
        the budget)."""
        if self.fixed_budget is None:
            return None
        return float(n_models) if self.side_by_side else self.fixed_budget


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add ``method`` to the registry (its name must be new)."""
    if method.name in METHODS:
        raise ValueError(f"method '{method.name}' is already registered")
    METHODS[method.name] = method
    return method


def unregister_method(name: str) -> None:
    METHODS.pop(name, None)


def method_names() -> tuple:
    """Every registered method's name, in the order tables list them."""
    return tuple(METHODS)


def get_method(name: str) -> Method:
    """The record of ``name`` (``InputError`` naming the choices if unknown)."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise InputError(f"unknown method '{name}': choose one of {', '.join(METHODS)}") from None


_PERMUTED = ("analyze", "match", "align")
_FITTED = ("batch_norm_sweep", "sweep", "row_blocks", "batch_norm_reset")

register_method(Method(
    "pleas", _PERMUTED + ("plan", "widen", "least_squares") + _FITTED + ("check_cost",),
    "PLeaS: activation matching, partial merging at the budget, least squares on the merged model's own inputs",
    bn_stats="source"))  # chosen on the validation split (docs/bn-stats.md)
register_method(Method(
    "perm", _PERMUTED + ("plan", "widen") + _FITTED + ("check_cost",),
    "permutation merging at the budget, without least squares"))
register_method(Method(
    "zipit", ("analyze", "zip_match", "zip_plan", "widen", "zip_weights", "row_blocks", "zip_cut",
              "batch_norm_sweep", "sweep", "batch_norm_reset", "check_cost"),
    "ZipIt!: features zipped within and across models, partial zipping by a graph cut",
    matching=None))  # it pools both models' features: no pair of A and B is matched as such
register_method(Method(
    "cca", ("analyze", "zip_match", "cca_plan", "widen", "zip_weights", "row_blocks") + _FITTED + ("check_cost",),
    "CCA Merge: every model's features mapped into A's by canonical correlation analysis, averaged (1x)",
    fixed_budget=1.0, matching=None))
register_method(Method(
    "rebasin", _PERMUTED + ("plan_full", "widen") + _FITTED,
    "Git Re-Basin: weight matching (MergeMany for more than two models), full merge (1x)", fixed_budget=1.0,
    matching="weight"))
register_method(Method(
    "regmean", ("analyze", "plan_full", "widen", "regmean") + _FITTED,
    "RegMean: each layer's closed form over every model's Gram matrices (1x)",
    fixed_budget=1.0, matching=None, permutes=False))
register_method(Method(
    "avg", ("analyze", "plan_full", "widen") + _FITTED,
    "weight averaging, no permutation (1x)", fixed_budget=1.0, matching=None, permutes=False))
register_method(Method(
    "ensemble", ("analyze", "plan", "widen", "row_blocks", "check_cost"),
    "every model side by side (2x for two, Nx for N): the reference", fixed_budget=2.0, bn_stats=None,
    matching=None, norm_policy="split", permutes=False, side_by_side=True))


def methods_table() -> str:
    """The docs' table of the methods, read from the registry (a test keeps
    docs/architecture.md's copy equal to it)."""
    rows = ["| method | what it does | cost | BatchNorm statistics | matching | passes |", "|---|---|---|---|---|---|"]
    for m in METHODS.values():
        cost = "the budget" if m.budgeted else ("Nx" if m.side_by_side else f"{m.fixed_budget:g}x")
        bn_stats = m.bn_stats or "the sources' (always)"
        rows.append(f"| `{m.name}` | {m.summary} | {cost} | {bn_stats} | {m.matching or 'none'} | {', '.join(m.passes)} |")
    return "\n".join(rows)
