import pytest
import timm
import torch
import torch.nn as nn

import fxmerge
from fxmerge import TraceError


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 1), Branchy())

    def forward(self, x):
        return self.body(x)


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # python control flow on a tensor value
            return x
        return -x


def test_trace_error_names_module_and_line():
    with pytest.raises(TraceError) as e:
        fxmerge.trace(DataDependent(), torch.randn(1, 3, 4, 4))
    msg = str(e.value)
    assert e.value.module_path == "body.1"
    assert "body.1" in msg and "test_tracing.py" in msg and "x.sum() > 0" in msg


class CachesDuringForward(nn.Module):
    """Like levit: caches a tensor on first use in eval mode."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.cache = {}

    def forward(self, x):
        key = str(x.device)
        if key not in self.cache:
            self.cache[key] = self.lin.weight * 2
        return x @ self.cache[key]


def test_trace_uses_a_copy():
    model = CachesDuringForward().eval()
    x = torch.randn(2, 4)
    fxmerge.trace(model, x)
    assert model.cache == {}  # the caller's instance is untouched
    traced = fxmerge.trace(model, x)  # a second trace is independent
    assert torch.allclose(traced.gm(x), model(x))


def test_optional_arguments_are_pinned():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1).eval()
    traced = fxmerge.trace(model, torch.randn(1, 3, 32, 32))
    assert traced.concrete_args.get("attn_mask", "absent") is None
    shapes = [n.meta["fxm_value"] for n in traced.gm.graph.nodes if n.op == "output"]
    assert shapes


def test_check_detects_divergence():
    class Flaky(nn.Module):
        calls = 0  # shared by every copy: the trace bakes in a stale value

        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            Flaky.calls += 1
            return self.lin(x) * Flaky.calls

    with pytest.raises(TraceError, match="does not reproduce"):
        fxmerge.trace(Flaky(), torch.randn(2, 3))
