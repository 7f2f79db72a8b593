"""Widening is sound, rule family by rule family.

Every rule declares how its op behaves when channel axes are widened to
``[A-only | merged | B-only]`` (``fxmerge.analysis.rules.registry.WIDENING``). For each
behaviour a small network built around such ops is merged at 2x with
nothing merged: the result must be the ensemble (the average of both
models), or, where an op combines the channels it would widen, the budget
is reported out of reach and that op named. And a model widened with
itself (B = A) at any budget computes A's function: widening alone never
changes what a network computes.
"""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxmerge
from fxmerge.analysis.rules.registry import RULES, WIDENING
from fxmerge.analysis.tracing import without_fast_path

X = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def calib():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 3, 8, 8, generator=g) for _ in range(2)]


class Elementwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 1)
        self.scale = nn.Parameter(torch.rand(6, 1, 1) + 0.5)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        a = F.gelu(self.a(x))
        y = torch.sigmoid(self.b(a)) * a * self.scale + a.clamp(min=0.1) - a / 2
        return self.fc(y.mean((2, 3)))


class Layout(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)
        self.c = nn.Conv2d(18, 6, 1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        a, b = F.relu(self.a(x)), F.relu(self.b(x))
        y = torch.cat([a, b], 1)
        p, q = y.chunk(2, dim=1)
        y = torch.cat([q, p.repeat(1, 2, 1, 1), y[:, 2:6], y[:, :2]], 1)  # 4 + 8 + 4 + 2 channels
        y = y.permute(0, 2, 3, 1).reshape(x.shape[0], -1, y.shape[1]).transpose(1, 2).reshape_as(y)
        return self.fc(self.c(y).mean((2, 3)))


class Spatial(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        y = F.max_pool2d(F.relu(self.a(x)), 2)
        y = F.interpolate(y, scale_factor=2.0, mode="bilinear")
        y = F.pad(y, (1, 1, 1, 1))
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.b(y)), 1).flatten(1))


class Contraction(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(6, 5, 2, stride=2)
        self.dw = nn.Conv2d(5, 10, 3, padding=1, groups=5)
        self.w = nn.Parameter(torch.randn(10, 6) * 0.3)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        y = F.relu(self.dw(F.relu(self.up(F.relu(self.a(x))))))
        return self.fc(F.relu(y.mean((2, 3)) @ self.w))


class PerChannel(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.bn, self.gn, self.inorm = nn.BatchNorm2d(8), nn.GroupNorm(4, 8), nn.InstanceNorm2d(8, affine=True)
        self.fc = nn.Linear(8, 4)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        y = self.gn(F.relu(self.bn(self.a(x))))
        return self.fc(self.inorm(self.b(y)).mean((2, 3)))


class Normalizes(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 4, stride=4)
        self.ln = nn.LayerNorm(8)
        self.fc1, self.fc2 = nn.Linear(8, 12), nn.Linear(12, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        t = self.a(x).flatten(2).transpose(1, 2)
        t = t + self.fc2(F.gelu(self.fc1(self.ln(t))))
        return self.head(self.ln(t).mean(1))


class Mixes(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 1)
        self.gn = nn.GroupNorm(1, 6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        a = F.relu(self.a(x))
        a = a / (a.pow(2).sum(1, keepdim=True) + 1)
        a = self.gn(a * torch.softmax(a, dim=1))
        return self.fc(F.normalize(self.b(a).mean((2, 3)), dim=1))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 2, stride=2)
        self.qkv, self.proj = nn.Linear(8, 24), nn.Linear(8, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        t = self.a(x).flatten(2).transpose(1, 2)
        b, n, c = t.shape
        q, k, v = self.qkv(t).reshape(b, n, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        t = t + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))
        t = t + self.mha(t, t, t, need_weights=False)[0]
        return self.head(t.mean(1))


class Pins(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        y = F.relu(self.a(x)).cumsum(dim=1)
        return self.fc(self.b(y).mean((2, 3)))


NETS = {
    "elementwise": (Elementwise, True),
    "layout": (Layout, True),
    "spatial": (Spatial, True),
    "contraction": (Contraction, True),
    "per_channel": (PerChannel, True),
    "normalizes": (Normalizes, True),
    "mixes": (Mixes, True),  # run once per model view
    "attention": (Attention, True),
    "pins": (Pins, False),  # a pinned axis never widens: one copy, shared
}


def test_every_rule_declares_its_widening_behaviour():
    rules = set(RULES.modules.values()) | set(RULES.functions.values()) | set(RULES.methods.values())
    undeclared = sorted(r.__name__ for r in rules if getattr(r, "widening", None) not in WIDENING)
    assert not undeclared
    assert set(NETS) == set(WIDENING)


def _pair(cls):
    torch.manual_seed(0)
    a = cls().eval()
    torch.manual_seed(1)
    return a, cls().eval()


@pytest.mark.parametrize("kind", list(NETS))
def test_two_x_is_the_ensemble_or_the_budget_is_reported_out_of_reach(kind):
    cls, exact = NETS[kind]
    a, b = _pair(cls)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = fxmerge.merge(a, b, calib(), budget=2.0, method="perm", bn_stats="source")
    r = res.report
    with torch.no_grad(), without_fast_path():
        want, got = (a(X) + b(X)) / 2, res.model(X)
    if r["budget_reachable"]:
        assert r["cost_measured"] == pytest.approx(2.0, rel=1e-6)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    else:
        assert not exact
        assert any(issubclass(w.category, fxmerge.BudgetWarning) for w in caught)
        assert r["kept_merged"] or r["pinned_ops"]
    if kind == "pins":
        assert "call_method:cumsum" in r["pinned_ops"]
    if kind == "mixes":  # each op that combines the channels runs on each model's own
        ops = {name.rstrip("_0123456789") for name in r["per_model_views"]}
        assert {"sum", "softmax", "normalize", "gn"} <= ops, r["per_model_views"]


@pytest.mark.parametrize("kind", list(NETS))
@pytest.mark.parametrize("budget", [1.0, 1.4, 2.0])
def test_a_model_widened_with_itself_computes_its_own_function(kind, budget):
    a, _ = _pair(NETS[kind][0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fxmerge.merge(a, a, calib(), budget=budget, method="perm", bn_stats="source")
    with torch.no_grad(), without_fast_path():
        torch.testing.assert_close(res.model(X), a(X), rtol=1e-4, atol=1e-5)
