"""Data-parallel merging over PyTorch's own distributed runtime.

When a ``torch.distributed`` process group is initialised (``torchrun``
sets the environment; ``fxmerge merge`` calls ``init_from_env``; a Python
caller initialises its own), every rank reads its own shard of the
calibration data (``shard``) and every statistic is summed across ranks
before it is used (``all_sum``). Each rank then solves the same systems in
the same order, so the merged weights agree on every rank. Errors that one
rank meets alone are made everyone's (``agree``), so all ranks end with the
same one-line error instead of hanging in the next collective.

Without a process group every function here is the single-process identity.
"""
from __future__ import annotations

import datetime
import os
from typing import Iterable, Optional

import torch

from fxmerge.errors import FxmergeError, InputError

DEFAULT_TIMEOUT_S = 600.0  # collectives wait at most this long (FXMERGE_DIST_TIMEOUT overrides)
_bytes_reduced = 0  # bytes this process has summed across ranks (a merge reports its share)


def available() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if available() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if available() else 1


def is_main() -> bool:
    return rank() == 0


def timeout_s() -> float:
    return float(os.environ.get("FXMERGE_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group torchrun describes in the environment
    (``WORLD_SIZE`` > 1): gloo on CPU, nccl on CUDA; the rank's local GPU
    becomes its device. Returns whether a group is active."""
    if available():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not torch.distributed.is_available():
        return False
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s()))
    return True


def shutdown() -> None:
    """Leave the process group (the command line, at its end)."""
    if available():
        torch.distributed.destroy_process_group()


def local_device(device) -> torch.device:
    """Under torchrun, ``cuda`` means this rank's local GPU."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def _collective_device(t: torch.Tensor) -> torch.device:
    backend = torch.distributed.get_backend()
    return t.device if backend == "nccl" else torch.device("cpu")


def bytes_reduced() -> int:
    """Bytes this process has summed across ranks so far."""
    return _bytes_reduced


def all_sum(*tensors: Optional[torch.Tensor]) -> None:
    """Sum tensors across ranks, in place (None entries are skipped)."""
    global _bytes_reduced
    if not available():
        return
    for t in tensors:
        if t is None:
            continue
        _bytes_reduced += t.numel() * t.element_size()
        dev = _collective_device(t)
        buf = t if t.device == dev else t.to(dev)
        torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM)
        if buf is not t:
            t.copy_(buf)


def sum_int(value: int) -> int:
    """A Python integer summed across ranks."""
    if not available():
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64)
    all_sum(t)
    return int(t.item())


def gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order."""
    if not available():
        return [obj]
    out = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank."""
    if not available():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def agree(error: Optional[BaseException]) -> None:
    """Raise, on every rank, the first error any rank met (an
    ``FxmergeError`` keeps its class and message, with the rank named when
    it happened on some ranks only)."""
    if not available():
        if error is not None:
            raise error
        return
    found = gather_objects(None if error is None else (type(error).__name__, str(error).splitlines()[0] if str(error) else "",
                                                        isinstance(error, FxmergeError)))
    failed = [(r, f) for r, f in enumerate(found) if f is not None]
    if not failed:
        return
    r, (name, message, ours) = failed[0]
    if len(failed) < len(found):
        message = f"{message} (on rank {r} of {len(found)})"
    if error is not None and ours and len(failed) == len(found):
        raise error
    raise (InputError if ours else FxmergeError)(message if ours else f"{name}: {message}")


def sync() -> None:
    """A checkpoint before a collective: if another rank failed since the
    last one, raise its error here instead of waiting for it forever (a rank
    that fails calls ``agree(error)``, which meets this call)."""
    if available():
        agree(None)


def shard(data: Iterable, index: Optional[int] = None, count: Optional[int] = None):
    """This rank's share of the calibration data, split by whole batches:
    batch ``i`` goes to rank ``i % world_size`` (so the union of the shards is
    the single-process data, batch for batch). Lists and tuples are sliced; a
    sequential ``torch.utils.data.DataLoader`` is rebuilt to load only this
    rank's batches; any other iterable is read by every rank, each keeping
    its own batches."""
    index = rank() if index is None else index
    count = world_size() if count is None else count
    if count <= 1:
        return data
    if isinstance(data, (list, tuple)):
        return list(data[index::count])
    from torch.utils.data import DataLoader

    from torch.utils.data import SequentialSampler

    if (isinstance(data, DataLoader) and data.batch_size is not None and isinstance(data.sampler, SequentialSampler)
            and hasattr(data.dataset, "__len__")):
        # a sequential loader: this rank loads only its own batches
        n, bs = len(data.dataset), data.batch_size
        batches = [list(range(i, min(i + bs, n))) for i in range(0, n, bs)]
        if data.drop_last and batches and len(batches[-1]) < bs:
            batches.pop()
        return DataLoader(data.dataset, batch_sampler=batches[index::count], num_workers=data.num_workers,
                          collate_fn=data.collate_fn, pin_memory=data.pin_memory)
    return _Strided(data, index, count)


class _Strided:
    """Every ``count``-th item of a re-iterable, from ``index``."""

    def __init__(self, data, index: int, count: int):
        self.data, self.index, self.count = data, index, count

    def __iter__(self):
        for i, item in enumerate(self.data):
            if i % self.count == self.index:
                yield item


def batch_ids(n_local: int) -> list:
    """The global index of each of this rank's batches under ``shard``'s
    strided split (batch ``j`` of rank ``r`` is global batch ``j * world + r``),
    so per-batch sampling seeds match a single-process run."""
    w, r = world_size(), rank()
    return [j * w + r for j in range(n_local)]
