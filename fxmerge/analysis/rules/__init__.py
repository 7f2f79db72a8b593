"""Per-op channel rules. Importing this package registers every rule."""
from . import attention, elementwise, linear, norm, reduce, shape, spatial, tables, timm_ops  # noqa: F401
from .registry import RULES, TL, Opaque, RuleContext, RuleRegistry

__all__ = ["RULES", "TL", "Opaque", "RuleContext", "RuleRegistry"]
