"""fxmerge: a graph-IR merging compiler over torch.fx.

The public names load on first use, so ``import fxmerge`` (and the command
line) stays fast until torch is actually needed.
"""
from fxmerge.constants import VERSION as __version__
from fxmerge.errors import BudgetError, BudgetWarning, FxmergeError, FxmergeWarning, InputError, MemoryWarning, RewriteError, TraceError

_LAZY = {
    "trace": "analysis.tracing", "analyze": "analysis.channels", "PermutationGroups": "analysis.groups",
    "Group": "analysis.groups", "verify": "analysis.verification", "VerifyReport": "analysis.verification",
    "merge": "api", "MergeResult": "api", "MergePlan": "api", "METHODS": "methods", "Method": "methods", "register_method": "methods", "save": "io", "load": "io",
    "apply_permutations": "analysis.apply", "apply_to_model": "analysis.apply",
}

__all__ = [
    "trace", "TraceError", "analyze", "PermutationGroups", "Group", "verify", "VerifyReport",
    "merge", "MergeResult", "MergePlan", "METHODS", "Method", "register_method", "save", "load", "apply_permutations", "apply_to_model",
    "FxmergeError", "InputError", "RewriteError", "BudgetError", "FxmergeWarning", "BudgetWarning", "MemoryWarning",
    "__version__",
]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fxmerge' has no attribute '{name}'")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
