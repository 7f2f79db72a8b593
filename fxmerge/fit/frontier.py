"""The sweep's frontier: the values of earlier waves that later ones still
read, kept in memory up to a cap and spilled beyond it, the values read last
first, to a temporary directory that is removed on success, error and
interrupt (``FrontierStore``).
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from typing import Any, Callable, NamedTuple, Optional

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree


def _nbytes(value) -> int:
    leaves, _ = pytree.tree_flatten(value)
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))


def read_tensor(path: str, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
    """A spilled tensor, read straight into a fresh tensor: no memory map,
    whose pages would fault in one by one and count as resident."""
    t = torch.empty(shape, dtype=dtype)
    buf = memoryview(t.view(torch.uint8).numpy().reshape(-1)) if t.numel() else memoryview(b"")
    with open(path, "rb", buffering=0) as f:
        while buf.nbytes:  # a raw read may return fewer bytes than asked
            n = f.readinto(buf)
            if not n:
                raise OSError(f"spilled frontier file {path} is shorter than its tensor")
            buf = buf[n:]
    return t


class FrontierStore:
    """Values kept between waves, keyed by ``(slot, node name, batch)``: in
    memory up to ``budget`` bytes, beyond it in files of a temporary
    directory (raw bytes, one file per tensor, read back whole when a wave
    needs it). ``dtype`` (bfloat16, float16) stores floating values at
    reduced precision; they come back as float32. CUDA values are kept in
    host memory.

    ``next_read(key)`` (optional) says when a kept value is read next, as
    anything sortable. When a new value does not fit, the values read last
    go to disk first (Belady's rule: a residual branch's input, read three
    waves on, rather than the convolution outputs the next wave reads; each
    spilled byte costs one write and one read however far off its read is,
    so spilling the furthest keeps the most reads in memory). Without it
    the new value spills."""

    def __init__(self, budget: int, dtype: torch.dtype = torch.float32, spill_dir: Optional[str] = None,
                 next_read: Optional[Callable[[tuple], Any]] = None):
        self.budget = max(0, int(budget))
        self.dtype = dtype
        self.spill_dir = spill_dir
        self.next_read = next_read
        self.tmp: Optional[str] = None
        # key -> (treespec, leaves, device, dtypes, bytes); a leaf is a tensor or a SpilledTensor
        self.values: dict = {}
        self.in_memory: set = set()  # keys whose leaves are all in memory
        self.ram = 0
        self.peak_ram = 0
        self.peak_since_release = 0  # the largest ``ram`` since ``mark_released``
        self.peak_total = 0
        self.total = 0
        self.spilled = 0  # bytes written to disk over the sweep
        self._files = 0

    def shrunk_since_release(self, least: int) -> bool:
        """Whether the in-memory part has shrunk, since ``mark_released``, by
        a quarter of its peak and at least ``least`` bytes."""
        return self.peak_since_release - self.ram >= max(least, self.peak_since_release // 4)

    def mark_released(self) -> None:
        """The memory its dropped values held has gone back to the system."""
        self.peak_since_release = self.ram

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point() and t.dtype != self.dtype and self.dtype != torch.float32:
            t = t.to(self.dtype)
        return t.detach().cpu() if t.device.type != "cpu" else t.detach()

    def put(self, key, value) -> None:
        leaves, spec = pytree.tree_flatten(value)
        device = next((t.device for t in leaves if isinstance(t, torch.Tensor)), None)
        dtypes = [t.dtype if isinstance(t, torch.Tensor) else None for t in leaves]
        packed = [self._pack(t) if isinstance(t, torch.Tensor) else t for t in leaves]
        size = sum(t.numel() * t.element_size() for t in packed if isinstance(t, torch.Tensor))
        self.values[key] = (spec, packed, device, dtypes, size)
        self.total += size
        self.peak_total = max(self.peak_total, self.total)
        if size == 0:
            return
        if self.ram + size > self.budget and self.next_read is not None:
            self._make_room(key, size)
        if self.ram + size > self.budget:
            self._to_disk(key)
        else:
            self.in_memory.add(key)
            self.ram += size
            self.peak_ram = max(self.peak_ram, self.ram)
            self.peak_since_release = max(self.peak_since_release, self.ram)

    def _make_room(self, key, size: int) -> None:
        """Spill kept values read after ``key`` is, furthest first, while
        that makes room for ``size`` bytes."""
        mine = self.next_read(key)
        later = sorted(((self.next_read(k), k) for k in self.in_memory), key=lambda x: x[0], reverse=True)
        later = [k for when, k in later if when > mine]
        if self.ram - sum(self.values[k][4] for k in later) + size > self.budget:
            return  # not even all of them make room: the new value spills
        for k in later:
            if self.ram + size <= self.budget:
                break
            self.in_memory.discard(k)
            self.ram -= self.values[k][4]
            self._to_disk(k)

    def _to_disk(self, key) -> None:
        spec, packed, device, dtypes, size = self.values[key]
        packed = [self._spill(t) if isinstance(t, torch.Tensor) else t for t in packed]
        self.values[key] = (spec, packed, device, dtypes, size)
        self.spilled += size

    def _spill(self, t: torch.Tensor) -> "SpilledTensor":
        if self.tmp is None:
            self.tmp = tempfile.mkdtemp(prefix="fxmerge-frontier-", dir=self.spill_dir)
        self._files += 1
        path = os.path.join(self.tmp, f"{self._files}.bin")
        # one unbuffered write of the tensor's bytes (numpy's tofile wrote
        # in small pieces, at a fifth of the disk's speed)
        with open(path, "wb", buffering=0) as f:
            f.write(memoryview(t.contiguous().view(torch.uint8).numpy()))
        return SpilledTensor(path, t.dtype, tuple(t.shape))

    def get(self, key):
        spec, packed, device, dtypes, _ = self.values[key]
        leaves = []
        for t, dt in zip(packed, dtypes):
            if isinstance(t, SpilledTensor):
                t = read_tensor(t.path, t.dtype, t.shape)
            if isinstance(t, torch.Tensor):
                if t.dtype != dt:
                    t = t.to(dt)
                if device is not None and t.device != device:
                    t = t.to(device)
            leaves.append(t)
        return pytree.tree_unflatten(leaves, spec)

    def drop(self, key) -> None:
        spec, packed, device, dtypes, size = self.values.pop(key)
        if key in self.in_memory:
            self.in_memory.discard(key)
            self.ram -= size
        for t in packed:
            if isinstance(t, SpilledTensor):
                try:
                    os.unlink(t.path)
                except OSError:
                    pass
        self.total -= size

    def close(self) -> None:
        """Forget every value and remove the temporary directory."""
        self.values.clear()
        self.in_memory.clear()
        self.ram = self.total = 0
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


class SpilledTensor(NamedTuple):
    """A frontier tensor in a file of the spill directory."""

    path: str
    dtype: torch.dtype
    shape: tuple


def value_bytes(node: fx.Node) -> Optional[int]:
    """Bytes of a node's value at the traced example's batch size, from its
    ``fxm_value`` summary (None when it has none)."""
    from fxmerge.analysis.tracing import TensorInfo

    if "fxm_value" not in node.meta:
        return None
    leaves = pytree.tree_leaves(node.meta["fxm_value"], is_leaf=lambda v: isinstance(v, TensorInfo))
    total = 0
    for v in leaves:
        if isinstance(v, TensorInfo):
            total += math.prod(v.shape) * v.dtype.itemsize
    return total
