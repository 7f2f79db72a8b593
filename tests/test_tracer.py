"""The tracer follows python control flow on sizes at the example's values,
traces into timm's no-trace modules that no rule covers (falling back to a
leaf where even that fails), and what it opens up merges soundly: a permuted
copy merges back, 2x is the ensemble. Layers whose channels an op pins are
named, never silently averaged at 2x."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxmerge
from fxmerge import TraceError
from fxmerge.analysis import tracer as tracer_module
from fxmerge.runtime.layers import PartialConv, PartialLinear

X = torch.randn(4, 3, 15, 15)


def calib():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 3, 15, 15, generator=g) for _ in range(2)]


def rel(x, y):
    return float((x - y).norm() / y.norm())


class PadToWindow(nn.Module):
    """Window pooling that pads to a multiple of the window when it must:
    control flow on the input's size, which plain symbolic tracing refuses."""

    def __init__(self, window=2):
        super().__init__()
        self.window = window

    def forward(self, x):
        h, w = x.shape[-2:]
        if h % self.window or w % self.window:
            x = F.pad(x, (0, (-w) % self.window, 0, (-h) % self.window))
        rows = int(x.shape[-2]) // self.window  # read as a python number
        return F.avg_pool2d(x, self.window) * (rows / rows)


class SizeBranchNet(nn.Module):
    def __init__(self, block=PadToWindow):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.block = block()
        self.mid = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.block(self.stem(x).relu())
        return self.head(self.mid(x).relu().mean((2, 3)))


class ValueBranch(nn.Module):
    def forward(self, x):
        if x.mean() > 0:  # control flow on data: no size decides it
            return x
        return -x


def model(seed, cls=SizeBranchNet, **kw):
    torch.manual_seed(seed)
    return cls(**kw).eval()


def test_control_flow_on_sizes_takes_the_example_branch():
    traced = fxmerge.trace(model(0), X[:1])
    ops = [n.target for n in traced.gm.graph.nodes if n.op == "call_function"]
    assert F.pad in ops  # 15 is odd: the padding branch
    traced_even = fxmerge.trace(model(0), torch.randn(1, 3, 16, 16))
    assert F.pad not in [n.target for n in traced_even.gm.graph.nodes if n.op == "call_function"]


def test_control_flow_on_tensor_values_still_fails():
    with pytest.raises(TraceError):
        fxmerge.trace(nn.Sequential(nn.Conv2d(3, 4, 1), ValueBranch()), X[:1])


@pytest.mark.parametrize("budget", (1.5, 2.0))
def test_a_net_with_size_branches_merges_soundly(budget):
    a, b = model(0), model(1)
    pg = fxmerge.analyze(a, X[:2])
    copy = pg.permuted_copy(a, pg.sampler(np.random.default_rng(3)))
    res = fxmerge.merge(a, copy, calib(), budget=budget, method="perm", bn_stats="source")
    assert rel(res.model(X), a(X)) < 1e-5
    res = fxmerge.merge(a, b, calib(), budget=2.0, method="perm", bn_stats="source")
    assert rel(res.model(X), (a(X) + b(X)) / 2) < 1e-5 and res.report["budget_reachable"]


class HiddenBlock(PadToWindow):
    """A module registered as timm registers its no-trace modules."""


class Untraceable(nn.Module):
    def forward(self, x):
        if x.mean() > -1e9:  # data-dependent: not even the example's sizes help
            return x * 2
        return x


def _register(monkeypatch, *classes):
    monkeypatch.setattr(tracer_module, "_timm_notrace", lambda: (classes, ()))


def test_a_registered_leaf_without_a_rule_is_traced_into(monkeypatch):
    _register(monkeypatch, HiddenBlock)
    traced = fxmerge.trace(model(0, block=HiddenBlock), X[:1])
    assert traced.specialized == ("block",)
    assert not [n for n in traced.gm.graph.nodes if n.op == "call_module" and n.target == "block"]
    a, b = model(0, block=HiddenBlock), model(1, block=HiddenBlock)
    res = fxmerge.merge(a, b, calib(), budget=2.0, method="perm", bn_stats="source")
    assert rel(res.model(X), (a(X) + b(X)) / 2) < 1e-5 and res.report["budget_reachable"]


def test_a_registered_leaf_that_cannot_be_traced_stays_a_leaf(monkeypatch):
    _register(monkeypatch, Untraceable)
    traced = fxmerge.trace(model(0, block=Untraceable), X[:1])
    assert traced.specialized == ()
    assert [n for n in traced.gm.graph.nodes if n.op == "call_module" and n.target == "block"]
    pg = fxmerge.analyze(model(0, block=Untraceable), X[:1])
    assert any("Untraceable" in p.kind for p in pg.pinned)


def pad_to_window(x, window: int = 2):
    """A function hidden from tracing with ``torch.fx.wrap`` (as torchvision
    hides its Swin attention): size control flow inside."""
    if x.shape[-1] % window:
        x = F.pad(x, (0, (-x.shape[-1]) % window, 0, (-x.shape[-2]) % window))
    return F.avg_pool2d(x, window)


def scale_by_sign(x):
    if x.mean() > -1e9:  # data-dependent: the function stays hidden
        return x * 2
    return x


torch.fx.wrap("pad_to_window")
torch.fx.wrap("scale_by_sign")


class WrappedCalls(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.stem, self.head = nn.Conv2d(3, 16, 3, padding=1), nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x).relu()
        x = pad_to_window(x) if self.fn == "pad" else scale_by_sign(x)
        return self.head(x.mean((2, 3)))


def test_a_wrapped_function_without_a_rule_is_traced_into():
    traced = fxmerge.trace(WrappedCalls("pad"), X[:1])
    assert pad_to_window not in [n.target for n in traced.gm.graph.nodes]
    a, b = model(0, WrappedCalls, fn="pad"), model(1, WrappedCalls, fn="pad")
    res = fxmerge.merge(a, b, calib(), budget=2.0, method="perm", bn_stats="source")
    assert rel(res.model(X), (a(X) + b(X)) / 2) < 1e-5 and res.report["budget_reachable"]


def test_a_wrapped_function_that_cannot_be_traced_stays_whole():
    traced = fxmerge.trace(WrappedCalls("sign"), X[:1])
    assert scale_by_sign in [n.target for n in traced.gm.graph.nodes]


class GroupedFunctional(nn.Module):
    """A grouped convolution called as a function on its own parameter (as a
    standardised convolution traced through is)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.weight = nn.Parameter(torch.randn(16, 8, 3, 3) * 0.2)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = F.conv2d(self.stem(x).relu(), self.weight, None, 1, 1, 1, 2)
        return self.head(x.relu().mean((2, 3)))


def test_a_functional_grouped_convolution_widens_its_group_count():
    a, b = model(0, GroupedFunctional), model(1, GroupedFunctional)
    res = fxmerge.merge(a, b, calib(), budget=2.0, method="perm", bn_stats="source")
    assert rel(res.model(X), (a(X) + b(X)) / 2) < 1e-5


@pytest.mark.parametrize("layer", [nn.Linear(6, 5), nn.Conv2d(6, 5, 3)], ids=["linear", "conv"])
def test_row_blocks_show_their_dense_weight(layer):
    ins, outs = [np.array([0, 1, 2, 3]), np.array([2, 3, 4, 5])], [np.array([0, 3]), np.array([1, 2, 4])]
    blocks = (PartialLinear if isinstance(layer, nn.Linear) else PartialConv)(layer, ins, outs)
    x = torch.randn(2, 6) if isinstance(layer, nn.Linear) else torch.randn(2, 6, 7, 7)
    dense = F.linear(x, blocks.weight) if isinstance(layer, nn.Linear) else \
        F.conv2d(x, blocks.weight)
    bias = torch.cat([p.bias for p in blocks.parts])[blocks.out_order]  # rows back in their places
    shape = (1, -1) if isinstance(layer, nn.Linear) else (1, -1, 1, 1)
    assert torch.allclose(dense + bias.reshape(shape), blocks(x), atol=1e-6)


class ChannelsIntoBatch(nn.Module):
    """MobileViT's unfolding: channels folded with the batch and half the
    rows, split again at a place no channel block ends."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.c1 = nn.Conv2d(16, 24, 1)
        self.c2 = nn.Conv2d(24, 16, 1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.c1(self.stem(x).relu())
        b, c, h, w = x.shape
        x = x.reshape(b * c * (h // 2), 2, w // 2, 2).transpose(1, 2).reshape(b, c, h * w // 4, 4)
        x = x.reshape(b * c * (h // 2), w // 2, 2, 2).transpose(1, 2).reshape(b, c, h, w)
        return self.head(self.c2(x.relu()).mean((2, 3)))


@pytest.mark.parametrize("budget", (1.25, 1.5, 2.0))
def test_a_layer_into_pinned_channels_runs_per_model_view(budget):
    # c1's rows write channels the unfolding pins: widened in place, a merged
    # row would read both models' inputs; run per model view up to the point
    # where c2 writes free channels again, the merge keeps each model's own
    # (on this small net the part doubles as a whole: 1.5x is not within reach
    # of one step, and the merge says so)
    a, b = model(0, ChannelsIntoBatch), model(1, ChannelsIntoBatch)
    x, data = torch.randn(4, 3, 16, 16), [torch.randn(8, 3, 16, 16) for _ in range(2)]
    pg = fxmerge.analyze(a, x[:2])
    twin = pg.permuted_copy(a, pg.sampler(np.random.default_rng(3)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = fxmerge.merge(a, b, data, budget=budget, method="perm", bn_stats="source")
        back = fxmerge.merge(a, twin, data, budget=budget, method="perm", bn_stats="source")
    r = res.report
    assert not r["kept_merged"] and r["cost_measured"] == pytest.approx(r["cost_planned"], rel=1e-6)
    assert abs(r["cost_measured"] - budget) <= 0.01 * budget or any("nearest plan" in str(w.message) for w in caught)
    assert rel(back.model(x), a(x)) < 1e-5
    if budget == 2.0:
        assert "c1" in r["per_model_views"] and r["budget_reachable"]
        assert rel(res.model(x), (a(x) + b(x)) / 2) < 1e-5

def test_a_pinned_layer_outside_the_parts_run_per_view_keeps_two_x_from_claiming_the_ensemble(monkeypatch):
    # the safety net behind the per-view parts: were c1 not run per model
    # view, its merged rows would read both models' inputs, and 2x says so
    from fxmerge.merging import cost, views

    monkeypatch.setattr(views, "view_parts", lambda pg: [])
    monkeypatch.setattr(cost, "view_parts", lambda pg: [])
    a, b = model(0, ChannelsIntoBatch), model(1, ChannelsIntoBatch)
    x, data = torch.randn(4, 3, 16, 16), [torch.randn(8, 3, 16, 16) for _ in range(2)]
    with pytest.warns(fxmerge.BudgetWarning, match="not the ensemble.*'c1'"):
        res = fxmerge.merge(a, b, data, budget=2.0, method="perm", bn_stats="source")
    assert not res.report["budget_reachable"]
    assert any("'c1'" in k["reason"] and k["channels"] == 24 for k in res.report["kept_merged"])
    assert rel(res.model(x), (a(x) + b(x)) / 2) > 1e-3  # indeed not the ensemble
    with pytest.raises(fxmerge.BudgetError):
        fxmerge.merge(a, b, data, budget=2.0, method="perm", bn_stats="source", strict=True)
