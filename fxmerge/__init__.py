"""fxmerge: a graph-IR merging compiler over torch.fx."""
from .analysis import Group, PermutationGroups, analyze
from .tracing import TraceError, trace
from .verify import VerifyReport, verify

__version__ = "0.1.0"
__all__ = ["trace", "TraceError", "analyze", "PermutationGroups", "Group", "verify", "VerifyReport"]
