"""Per-op channel rules. Importing this package registers every rule."""
from . import attention, elementwise, linear, norm, shape, spatial  # noqa: F401
from .registry import RULES, TL, Opaque, RuleContext, RuleRegistry

__all__ = ["RULES", "TL", "Opaque", "RuleContext", "RuleRegistry"]
