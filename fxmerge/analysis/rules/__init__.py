"""Per-op channel rules. Importing this package registers every rule."""
from . import attention
from . import elementwise
from . import linear
from . import norm
from . import reduce
from . import shape
from . import spatial
from . import timm_ops  # noqa: F401
from .registry import RULES, TL, Opaque, RuleContext, RuleRegistry

__all__ = ["RULES", "TL", "Opaque", "RuleContext", "RuleRegistry"]
