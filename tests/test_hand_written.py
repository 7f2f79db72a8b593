"""Nets written by hand as a new user would, with the patterns that strain
widening: window attention whose head width and scale are read from the
input's shape, GroupNorm (widened a group at a time) and an MLP-Mixer's
token mixing (a layer along another axis while the channels widen; with its
hidden tokens widened too it runs once per model view), and ops that
combine the channels or read them into pinned ones, run once per model view
(a LayerNorm over channels by hand, single-head attention over channels, a
layer into an LSTM). A permuted copy
merges back at every budget within 1% of it; at 2x every net is the
ensemble; least squares skips what it cannot pair and says so; a cost the
plan did not count is a warning naming the op, an error under ``strict``."""
from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxmerge

X = torch.randn(4, 3, 16, 16)
BUDGETS = (1.0, 1.25, 1.5, 1.75, 2.0)


class Mixer(nn.Module):
    """Patch embedding, one token-mixing MLP (a Linear over the tokens after a
    transpose) and one channel-mixing MLP, pre-norm, residual."""

    def __init__(self, dim=32, tokens=16, hidden=24):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.tok1, self.tok2 = nn.Linear(tokens, hidden), nn.Linear(hidden, tokens)
        self.ch1, self.ch2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = t + self.tok2(F.gelu(self.tok1(self.norm1(t).transpose(1, 2)))).transpose(1, 2)
        t = t + self.ch2(F.gelu(self.ch1(self.norm2(t))))
        return self.head(t.mean(1))


class TokenMixer(nn.Module):
    """ResMLP-style token mixing: a square Linear over the tokens (no hidden
    tokens to widen), so only the channels widen around it."""

    def __init__(self, dim=32, tokens=16):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.tokens, self.ch = nn.Linear(tokens, tokens), nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        t = self.embed(x).flatten(2)
        t = t + self.tokens(t)
        t = t + F.relu(self.ch(t.transpose(1, 2))).transpose(1, 2)
        return self.head(t.mean(2))


class WSConv(nn.Conv2d):
    """NFNet-style weight standardisation written by hand: each filter
    normalised over its inputs in ``forward``."""

    def forward(self, x):
        w = self.weight
        mean, var = w.mean(dim=(1, 2, 3), keepdim=True), w.var(dim=(1, 2, 3), keepdim=True)
        return F.conv2d(x, (w - mean) / torch.sqrt(var + 1e-5), self.bias, self.stride, self.padding)


class StandardizedNet(nn.Module):
    """Weight-standardised convolutions, by hand and timm's ``ScaledStdConv2d``."""

    def __init__(self):
        from timm.layers import ScaledStdConv2d

        super().__init__()
        self.c1, self.c2 = WSConv(3, 32, 3, padding=1), ScaledStdConv2d(32, 32, 3, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(F.relu(self.c2(F.relu(self.c1(x)))).mean((2, 3)))


class CoordinateBias(nn.Module):
    """Swin v2-style continuous position bias: an MLP over a fixed table of
    coordinates (a non-persistent buffer) makes a bias per token and
    channel; its hidden units see no input, only the table."""

    def __init__(self, dim=32, hidden=24):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, 4)
        grid = torch.stack(torch.meshgrid(torch.linspace(-1, 1, 4), torch.linspace(-1, 1, 4), indexing="ij"), -1)
        self.register_buffer("coords", grid.reshape(16, 2), persistent=False)
        self.bias1, self.bias2 = nn.Linear(2, hidden), nn.Linear(hidden, dim)
        self.mix, self.head = nn.Linear(dim, dim), nn.Linear(dim, 10)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = t + self.bias2(F.relu(self.bias1(self.coords)))
        return self.head(F.relu(self.mix(t)).mean(1))


class WindowAttention(nn.Module):
    """Swin-style attention over 2x2 windows, the head width ``c // heads``
    and the scale ``(c // heads) ** -0.5`` computed from the input's shape."""

    def __init__(self, dim=32, heads=4, window=2):
        super().__init__()
        self.heads, self.window = heads, window
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.norm = nn.LayerNorm(dim)
        self.qkv, self.proj, self.head = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Linear(dim, 10)

    def forward(self, x):
        t = self.embed(x).permute(0, 2, 3, 1)
        b, h, w, c = t.shape
        s = self.window
        y = self.norm(t).reshape(b, h // s, s, w // s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, s * s, c)
        n, head_dim = y.shape[1], c // self.heads
        q, k, v = self.qkv(y).reshape(-1, n, 3, self.heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q * head_dim ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        o = self.proj((attn @ v).transpose(1, 2).reshape(-1, n, c))
        o = o.reshape(b, h // s, w // s, s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
        return self.head((t + o).mean((1, 2)))


class GroupNormNet(nn.Module):
    """``nn.GroupNorm(4, 32)`` between convolutions: widened a whole group at a time."""

    def __init__(self):
        super().__init__()
        self.c1, self.gn = nn.Conv2d(3, 32, 3, padding=1), nn.GroupNorm(4, 32)
        self.c2, self.head = nn.Conv2d(32, 32, 3, padding=1), nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.c2(F.relu(self.gn(self.c1(x)))))
        return self.head(x.mean((2, 3)))


class ChannelLayerNorm(nn.Module):
    """ConvNeXt-style LayerNorm over the channels of an NCHW map written by
    hand: the mean and variance over channels meet the features again."""

    def __init__(self, dim=32):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, dim, 3, padding=1), nn.Conv2d(dim, dim, 3, padding=1)
        self.weight, self.bias = nn.Parameter(1 + 0.1 * torch.randn(dim)), nn.Parameter(0.1 * torch.randn(dim))
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.c1(x)
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + 1e-6) * self.weight[:, None, None] + self.bias[:, None, None]
        return self.head(F.relu(self.c2(F.relu(x))).mean((2, 3)))


class ChannelAttention(nn.Module):
    """Single-head attention whose scores sum over every channel (CPU-bone,
    iFormer), with a learned position bias made from a table (HaloNet): the
    channels widen, the scores and the bias are each model's own."""

    def __init__(self, dim=32):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.qkv, self.proj, self.head = nn.Conv2d(dim, 3 * dim, 1), nn.Conv2d(dim, dim, 1), nn.Linear(dim, 10)
        self.table = nn.Parameter(torch.randn(16, 16))

    def forward(self, x):
        x = self.embed(x)
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).flatten(2).transpose(1, 2).chunk(3, dim=-1)
        bias = self.table.transpose(0, 1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(b, c, h, w)
        return self.head((x + self.proj(o)).mean((2, 3)))


class Recurrent(nn.Module):
    """A layer into an LSTM, which fxmerge does not see into (its channels
    are pinned), read back by a layer into free channels, then a channel
    MLP (Sequencer)."""

    def __init__(self, dim=16):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.into, self.lstm, self.out = nn.Linear(dim, 12), nn.LSTM(12, 8, batch_first=True), nn.Linear(8, dim)
        self.fc1, self.fc2, self.head = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim), nn.Linear(dim, 10)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        h, _ = self.lstm(self.into(t))
        t = t + self.out(h)
        return self.head((t + self.fc2(F.relu(self.fc1(t)))).mean(1))


def model(seed, cls=Mixer):
    torch.manual_seed(seed)
    return cls().eval()


def permuted_copy(m, seed=3):
    pg = fxmerge.analyze(m, X[:2])
    return pg.permuted_copy(m, pg.sampler(np.random.default_rng(seed)))


def calib():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(16, 3, 16, 16, generator=g) for _ in range(4)]


def rel(x, y):
    return float((x - y).norm() / y.norm())


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("cls", [Mixer, TokenMixer, WindowAttention, GroupNormNet, StandardizedNet, CoordinateBias,
                                 ChannelLayerNorm, ChannelAttention, Recurrent],
                         ids=lambda c: c.__name__)
def test_a_permuted_copy_merges_back_at_every_budget(cls, budget):
    a = model(0, cls)
    b = permuted_copy(a)
    assert rel(b(X), a(X)) < 1e-5
    with _no_budget_warning():
        res = fxmerge.merge(a, b, calib(), budget=budget, method="perm", bn_stats="source")
    assert rel(res.model(X), a(X)) < 1e-5
    assert abs(res.report["cost_measured"] - budget) <= 0.01 * budget


@pytest.mark.parametrize("cls", [Mixer, TokenMixer, WindowAttention, GroupNormNet, StandardizedNet, CoordinateBias,
                                 ChannelLayerNorm, ChannelAttention, Recurrent],
                         ids=lambda c: c.__name__)
def test_at_two_x_the_merge_is_the_ensemble(cls):
    a, b = model(0, cls), model(1, cls)
    with _no_budget_warning():
        res = fxmerge.merge(a, b, calib(), budget=2.0, method="perm", bn_stats="source")
    assert rel(res.model(X), (a(X) + b(X)) / 2) < 1e-5 and res.report["budget_reachable"]
    assert abs(res.report["cost_measured"] - 2.0) <= 0.02


def test_the_token_mixer_runs_per_model_view_where_tokens_and_channels_both_widen():
    a, b = model(0), model(1)
    res = fxmerge.merge(a, b, calib(), budget=1.5, method="perm", bn_stats="source")
    assert set(res.report["per_model_views"]) >= {"tok1", "tok2"}
    full = fxmerge.merge(a, b, calib(), budget=1.0, method="perm", bn_stats="source")
    assert full.report["per_model_views"] == []  # nothing widens: the plain layers
    # least squares fits the layers around the views, which keep each model's own weights
    res = fxmerge.merge(a, permuted_copy(a), calib(), budget=1.5, method="pleas", bn_stats="source")
    assert "tok1" not in res.report["least_squares_skipped"] and rel(res.model(X), a(X)) < 1e-4


@pytest.mark.parametrize("budget", (1.25, 1.5, 1.75))
def test_a_layer_over_the_tokens_widens_with_the_channels_at_the_planned_cost(budget):
    a, b = model(0, TokenMixer), model(1, TokenMixer)
    with _no_budget_warning():
        res = fxmerge.merge(a, b, calib(), budget=budget, method="perm", bn_stats="source")
    assert abs(res.report["cost_measured"] - budget) <= 0.01 * budget
    assert rel(fxmerge.merge(a, permuted_copy(a), calib(), budget=budget, method="perm",
                             bn_stats="source").model(X), a(X)) < 1e-5


def test_least_squares_skips_a_layer_over_the_tokens_when_channels_widen_and_says_so():
    a = model(0, TokenMixer)
    with pytest.warns(fxmerge.BudgetWarning, match="least squares skipped for 1 layer.*'tokens'"):
        res = fxmerge.merge(a, permuted_copy(a), calib(), budget=1.5, method="pleas", bn_stats="source")
    assert res.report["least_squares_skipped"] == ["tokens"]
    assert rel(res.model(X), a(X)) < 1e-4


def test_a_cost_the_plan_did_not_count_names_the_op_and_fails_under_strict(monkeypatch):
    from fxmerge.merging.cost import CostModel

    build = CostModel.from_groups.__func__

    def blind_to_the_token_layer(cls, pg, source_macs=None):
        model = build(cls, pg, source_macs)
        for layer in model.layers:
            if layer.node == "tokens":
                layer.positions = []  # as if its cost did not grow with the channels
        return model

    monkeypatch.setattr(CostModel, "from_groups", classmethod(blind_to_the_token_layer))
    a, b = model(0, TokenMixer), model(1, TokenMixer)
    with pytest.warns(fxmerge.BudgetWarning, match=r"costs 1\.\d+x, not the 1\.50x asked.*nn\.Linear \(tokens\)"):
        res = fxmerge.merge(a, b, calib(), budget=1.5, method="perm", bn_stats="source")
    assert abs(res.report["cost_measured"] - 1.5) > 0.015 and any("tokens" in w for w in res.report["warnings"])
    with pytest.raises(fxmerge.BudgetError, match="strict"):
        fxmerge.merge(a, b, calib(), budget=1.5, method="perm", bn_stats="source", strict=True)


class _no_budget_warning:
    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("error", fxmerge.BudgetWarning)

    def __exit__(self, *exc):
        return self._catch.__exit__(*exc)


@pytest.mark.parametrize("cls,budget", [(Mixer, 2.0), (TokenMixer, 1.5), (StandardizedNet, 1.5)],
                         ids=["views", "role-split", "folded"])
def test_rewritten_parts_survive_save_and_load(tmp_path, cls, budget):
    a, b = model(0, cls), model(1, cls)
    res = fxmerge.merge(a, b, calib(), budget=budget, method="perm", bn_stats="source")
    fxmerge.save(res, str(tmp_path / "m.pt"))
    loaded, _, _ = fxmerge.load(str(tmp_path / "m.pt"), model(5, cls))
    with torch.no_grad():
        assert rel(loaded(X), res.model(X)) < 1e-6


def test_weight_standardisation_is_folded_for_merging_only():
    a = model(0, StandardizedNet)
    weights = {k: v.clone() for k, v in a.state_dict().items()}
    res = fxmerge.merge(a, model(1, StandardizedNet), calib(), budget=1.5, method="pleas", bn_stats="source")
    assert any(k.startswith("fxm_folded_") for k in res.model.state_dict())
    assert all(torch.equal(v, a.state_dict()[k]) for k, v in weights.items())  # the source is untouched
    # the groups a user exports still name the model's own weights
    names = {m for g in fxmerge.analyze(a, X[:2]).groups for m, _ in g.members}
    assert "c1.weight" in names and not any(n.startswith("fxm_folded_") for n in names)
