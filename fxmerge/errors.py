"""fxmerge's exceptions and warnings: one base class, so callers can catch
everything fxmerge raises on purpose with ``except fxmerge.FxmergeError``.

Every message is one line naming the problem and what to do about it; the
command line prints it and exits with status 2.
"""
from __future__ import annotations

from typing import Optional


class FxmergeError(Exception):
    """Base of every error fxmerge raises on purpose."""


class InputError(FxmergeError, ValueError):
    """Bad user input: an unknown model, an unreadable checkpoint, a bad size,
    an option out of range, unusable calibration data."""


class TraceError(FxmergeError, RuntimeError):
    """Tracing, or the check of the traced graph against the eager model, failed."""

    def __init__(self, message: str, *, module_path: Optional[str] = None, source: Optional[str] = None):
        self.module_path = module_path
        self.source = source
        where = []
        if module_path is not None:
            where.append(f"module '{module_path or '<root>'}'")
        if source:
            where.append(f"at {source}")
        super().__init__(message + (f" ({', '.join(where)})" if where else ""))


class RewriteError(FxmergeError, RuntimeError):
    """The widened graph cannot be emitted (an op whose constants fxmerge
    cannot rewrite)."""


class BudgetError(FxmergeError):
    """Under ``strict=True``: the merge cannot do what was asked (a budget it
    cannot reach, weights it must pin)."""


class FxmergeWarning(UserWarning):
    """Base of fxmerge's warnings: something was done differently from what
    was asked, and the report says how."""


class BudgetWarning(FxmergeWarning):
    """The requested budget cannot be reached, or a large share of the
    weights cannot be permuted or widened."""


class MemoryWarning(FxmergeWarning):
    """A statistic was skipped or subsampled to stay under ``max_memory``."""
