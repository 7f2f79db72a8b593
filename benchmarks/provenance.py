"""Which code a results page describes: the commit a run starts at (every
page states it), and which pages later changes to fxmerge/ have left behind.

    python -m benchmarks.provenance          # list the stale pages (exit 1 if any)
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIRTY = "+changes"  # marks a run whose fxmerge/ or benchmarks/ differ from the commit
STATED = re.compile(r"at commit ([0-9a-f]{7,40})(\+changes| \(with uncommitted changes\))?")


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def source_commit() -> str:
    """The commit the code runs at, read when a run starts (the code it
    imported; later commits do not describe it), marked ``+changes`` when
    fxmerge/ or benchmarks/ differ from it."""
    try:
        head = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "fxmerge", "benchmarks")
        return head + (DIRTY if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


SOURCE_COMMIT = source_commit()


def staleness(text: str) -> str:
    """Why a page's figures may not describe fxmerge at HEAD ("" when they do)."""
    m = STATED.search(text)
    if m is None:
        return "states no commit"
    if m.group(2):
        return f"produced from uncommitted changes to {m.group(1)}"
    try:
        later = _git("log", "--format=%h", f"{m.group(1)}..HEAD", "--", "fxmerge").split()
    except subprocess.CalledProcessError:
        return f"commit {m.group(1)} is not in this repository's history"
    return f"{len(later)} later commits change fxmerge/ (the latest {later[0]})" if later else ""


def stale_pages(pattern: str = os.path.join(ROOT, "docs", "*.md")) -> list:
    """``(page, why)`` for every results page (one that says what produced
    it) whose figures may not describe fxmerge at HEAD."""
    out = []
    for path in sorted(glob.glob(pattern)):
        with open(path) as f:
            text = f.read()
        if "Produced by" not in text:
            continue
        why = staleness(text)
        if why:
            out.append((os.path.relpath(path, ROOT), why))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="List the results pages whose figures predate the last change to "
                                            "fxmerge/ (exit 1 if any).")
    p.add_argument("--pages", default=os.path.join(ROOT, "docs", "*.md"), help="glob of the pages (default docs/*.md)")
    stale = stale_pages(p.parse_args(argv).pages)
    for page, why in stale:
        print(f"{page}: {why}")
    print(f"{len(stale)} stale results pages" if stale else "every results page describes fxmerge at HEAD")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
