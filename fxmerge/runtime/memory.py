"""Memory: the merge's memory budget (``parse_memory``, ``available_memory``)
and the C allocator setting the command line runs under.

glibc hands every block above its mmap threshold (at most 32 MB) back to the
operating system when it is freed and maps it afresh on the next
allocation, whose first touch of every page then faults. A forward pass at
224x224 allocates activations of hundreds of megabytes per layer, so a
fresh process spends much of a forward pass in the kernel, zeroing pages.
``keep_freed_memory`` serves every allocation from a heap that is never
trimmed: freed memory stays in the process for the next allocation and is
not given back before the process exits, and the peak resident memory can
be somewhat higher (a freed block is not always reusable for a larger
request; docs/performance.md measures the peak under this setting). The
command line calls it unless ``FXMERGE_MALLOC=system``; the Python API
leaves the allocator alone.

``release_freed_memory`` hands the free pages inside the heap back to the
operating system (glibc's ``malloc_trim``). The sweep calls it before a
wave's solves once its frontier has shrunk by a quarter since the last
call: the frontier frees hundreds of megabytes of values as the waves pass,
in blocks scattered between live ones, and a later wave's large statistics
do not fit those holes; without it the peak resident memory is the
frontier's high-water mark plus the late waves' statistics (calling it
every wave would fault the steady waves' pages in afresh each time).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from typing import Optional

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


@functools.lru_cache(maxsize=None)
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Serve every allocation from the heap and never trim it (glibc only).
    Returns whether the setting took effect."""
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)  # not glibc (musl has no mallopt)
    if mallopt is None or os.environ.get("FXMERGE_MALLOC") == "system":
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def release_freed_memory() -> bool:
    """Give the heap's free pages back to the operating system (glibc only;
    the blocks stay the heap's, a later allocation faults their pages in
    again). Returns whether any memory was released."""
    trim = getattr(_libc(), "malloc_trim", None)
    return bool(trim(0)) if trim is not None else False


def parse_memory(value) -> Optional[int]:
    """``max_memory`` as bytes: an int, or a string such as ``"2G"``,
    ``"512M"``, ``"1.5GB"``; None keeps the default."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"max_memory must be positive, got {value}")
        return int(value)
    text = str(value).strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    scale = units.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in units else text
    try:
        n = float(number) * scale
    except ValueError:
        raise ValueError(f"max_memory must be bytes or a size such as 2G or 512M, got {value!r}") from None
    if n <= 0:
        raise ValueError(f"max_memory must be positive, got {value!r}")
    return int(n)


def available_memory() -> int:
    """Bytes of memory available now (MemAvailable on Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 8 << 30
