"""Fail-closed behaviour and the teeth of the verification."""
import operator

import torch
import torch.nn as nn

import fxmerge
from fxmerge.analysis.rules import RULES
from nets import build


class Weird(nn.Module):
    """Uses an op with no rule (torch.fft) on channels."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 8, 1)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        y = torch.fft.fft(y, dim=1).real
        return self.c(torch.relu(self.b(y)))


def test_unknown_op_pins_its_axes():
    model = Weird().eval()
    x = torch.randn(1, 3, 5, 5)
    groups = fxmerge.analyze(model, x)
    assert any("fft" in p.kind and p.reason for p in groups.pinned)
    # a.out and b.in are pinned; only b.out / c.in stays permutable
    assert len(groups) == 1
    assert {m for m, _ in groups.groups[0].members} >= {"b.weight", "c.weight"}
    assert fxmerge.verify(model, x, groups).ok


def test_verify_names_an_unsound_group(monkeypatch):
    """A rule that drops the residual link produces unsound groups; the
    bisection must name exactly the groups that break."""

    def broken_add(ctx, a, b):
        return ctx.like(a)  # forgets that b must permute like a

    monkeypatch.setitem(RULES.functions, operator.add, broken_add)
    torch.manual_seed(0)
    model = build(6, [("residual", 1), ("residual", 2)]).eval()
    x = torch.randn(2, 3, 6, 6)
    groups = fxmerge.analyze(model, x)
    report = fxmerge.verify(model, x, groups)
    assert not report.ok
    assert report.failing and all(g.kind != "output" for g in report.failing)
    # the hidden widths inside the residual blocks are still sound
    monkeypatch.undo()
    good = fxmerge.analyze(model, x)
    assert fxmerge.verify(model, x, good).ok
    assert len(report.failing) < len(groups.all_groups)


def test_permutation_is_not_identity_on_degenerate_weights():
    """Zero-initialised and constant tensors are re-randomised before the
    check, otherwise permuting them could not be told apart."""
    model = build(4, [("layernorm", 0)]).eval()  # LayerScale gamma is constant
    x = torch.randn(1, 3, 6, 6)
    groups = fxmerge.analyze(model, x)
    report = fxmerge.verify(model, x, groups)
    assert report.ok and report.checked == len(groups)


def test_per_model_output_leaves_head_free():
    model = build(4, [("residual", 0)]).eval()
    x = torch.randn(1, 3, 6, 6)
    shared = fxmerge.analyze(model, x)
    separate = fxmerge.analyze(model, x, per_model_output=True)
    assert not shared.by_kind("output")
    out = separate.by_kind("output")
    assert len(out) == 1 and ("head.weight", 0) in out[0].members
    assert fxmerge.verify(model, x, separate).ok


def test_source_model_is_not_mutated():
    model = build(6, [("residual", 1), ("attention", 1)]).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 6, 6)
    groups = fxmerge.analyze(model, x)
    fxmerge.verify(model, x, groups)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


class CachedBias(nn.Module):
    """Caches a tensor derived from a parameter on its first eval-mode
    forward (LeViT's attention biases)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)
        self.scale = nn.Parameter(torch.ones(6))
        self.cache = {}

    def forward(self, x):
        if "scale" not in self.cache:
            self.cache["scale"] = self.scale * 2
        return self.b(torch.relu(self.a(x)) * self.cache["scale"])


def test_verify_permutes_copies_that_never_ran():
    # a copy of a model that ran would reuse its stale cache: a false alarm
    model = CachedBias().eval()
    x = torch.randn(3, 4)
    groups = fxmerge.analyze(model, x)
    assert len(groups) == 1
    assert fxmerge.verify(model, x, groups).ok
