"""fxmerge: a graph-IR merging compiler over torch.fx."""
from .analysis import Group, PermutationGroups, analyze
from .io import load, save
from .engine import METHODS, MergePlan, MergeResult, merge
from .models import InputError
from .tracing import TraceError, trace
from .verify import VerifyReport, verify

__version__ = "0.2.0"
__all__ = [
    "trace", "TraceError", "analyze", "PermutationGroups", "Group", "verify", "VerifyReport",
    "merge", "MergeResult", "MergePlan", "METHODS", "save", "load", "InputError",
]
