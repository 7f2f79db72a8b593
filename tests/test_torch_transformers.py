"""Transformers written with torch.nn's own containers merge like timm's:
``nn.TransformerEncoder`` (``norm_first`` and not, ``batch_first`` and not,
relu and gelu), the decoder layers and ``nn.Transformer`` (cross-attention
reads the encoder's memory: its channels are pinned and said so)."""
import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import fxmerge
from fxmerge.analysis.tracing import without_fast_path

DIM, HEADS, MLP, DEPTH, TOKENS = 12, 3, 24, 2, 5


class EncoderViT(nn.Module):
    def __init__(self, norm_first=True, batch_first=True, activation="gelu"):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Conv2d(3, DIM, 4, stride=4)
        self.pos = nn.Parameter(torch.randn(1, 4, DIM) * 0.1)
        layer = nn.TransformerEncoderLayer(DIM, HEADS, MLP, dropout=0.0, activation=activation,
                                           batch_first=batch_first, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, DEPTH, norm=nn.LayerNorm(DIM) if norm_first else None,
                                             enable_nested_tensor=False)
        self.head = nn.Linear(DIM, 4)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        if not self.batch_first:
            t = t.transpose(0, 1)
        t = self.encoder(t)
        return self.head(t.mean(1 if self.batch_first else 0))


VARIANTS = [(True, True, "gelu"), (False, True, "relu"), (True, False, "relu"), (False, False, "gelu")]
X = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def calib():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 3, 8, 8, generator=g) for _ in range(2)]


def run(model, x):
    with torch.no_grad(), without_fast_path():
        return model(x)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"norm_first={v[0]}-batch_first={v[1]}-{v[2]}")
def test_encoder_layers_get_per_layer_head_groups_and_verify(variant):
    torch.manual_seed(0)
    model = EncoderViT(*variant).eval()
    groups = fxmerge.analyze(model, X)
    assert not groups.pinned, groups.pinned
    kinds = [g.kind for g in groups.groups]
    assert kinds.count("heads") == DEPTH
    assert kinds.count("head_dim_qk") == DEPTH and kinds.count("head_dim_v") == DEPTH
    assert kinds.count("hidden") >= DEPTH  # the feed-forward widths
    assert "residual" in kinds
    assert all(g.size == DIM // HEADS for g in groups.groups if g.kind.startswith("head_dim"))
    assert fxmerge.verify(model, X, groups).ok


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"norm_first={v[0]}-batch_first={v[1]}-{v[2]}")
def test_a_permuted_copy_merges_back_and_two_x_is_the_ensemble(variant):
    torch.manual_seed(0)
    a = EncoderViT(*variant).eval()
    groups = fxmerge.analyze(a, X)
    state = a.state_dict()
    state.update(groups.permute_state(state, groups.sampler(np.random.default_rng(5))))
    permuted = copy.deepcopy(a)
    permuted.load_state_dict(state)
    torch.testing.assert_close(run(permuted, X), run(a, X), rtol=1e-4, atol=1e-5)
    res = fxmerge.merge(a, permuted, calib(), budget=1.0, method="perm")
    torch.testing.assert_close(run(res.model, X), run(a, X), rtol=1e-4, atol=1e-5)

    torch.manual_seed(1)
    b = EncoderViT(*variant).eval()
    res = fxmerge.merge(a, b, calib(), budget=2.0, method="perm")
    assert res.report["budget_reachable"]
    torch.testing.assert_close(run(res.model, X), (run(a, X) + run(b, X)) / 2, rtol=1e-4, atol=1e-5)
    res = fxmerge.merge(a, b, calib(), budget=1.5, method="pleas")
    assert res.report["cost_measured"] == pytest.approx(res.report["cost_planned"], rel=1e-6)
    assert res.report["least_squares"]["layers"] > 2 * DEPTH  # the packed projections are fitted too


class Seq2Seq(nn.Module):
    """``nn.Transformer`` over two token sequences made from one image."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, DIM, 4, stride=4)
        self.query = nn.Parameter(torch.randn(1, 2, DIM) * 0.1)
        self.transformer = nn.Transformer(DIM, HEADS, 1, 1, MLP, dropout=0.0, batch_first=True)
        self.head = nn.Linear(DIM, 4)

    def forward(self, x):
        src = self.embed(x).flatten(2).transpose(1, 2)
        tgt = self.query.expand(x.shape[0], -1, -1)
        return self.head(self.transformer(src, tgt).mean(1))


def test_nn_transformer_is_traced_through_and_cross_attention_pins_with_a_reason():
    torch.manual_seed(0)
    a = Seq2Seq().eval()
    groups = fxmerge.analyze(a, X)
    assert groups.groups and fxmerge.verify(a, X, groups).ok
    assert not any("nn.Transformer" == p.kind.split(":", 1)[1] for p in groups.pinned)
    torch.manual_seed(1)
    b = Seq2Seq().eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = fxmerge.merge(a, b, calib(), budget=2.0, method="perm")
    if res.report["budget_reachable"]:
        torch.testing.assert_close(run(res.model, X), (run(a, X) + run(b, X)) / 2, rtol=1e-4, atol=1e-5)
    else:
        assert any(issubclass(w.category, fxmerge.BudgetWarning) for w in caught)
        assert any("cross-attention" in str(w.message) for w in caught)
        assert any("cross-attention" in line for line in res.report["warnings"])
