"""Attention: q/k/v from a reshape (heads, per-head dims), fused and
explicit, nn.MultiheadAttention, nn.TransformerEncoder."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from rulecheck import check, kinds

X = torch.randn(2, 3, 8, 8)


class Explicit(nn.Module):
    def __init__(self, fused=False):
        super().__init__()
        self.fused = fused
        self.embed, self.qkv, self.proj = nn.Conv2d(3, 12, 2, stride=2), nn.Linear(12, 36), nn.Linear(12, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        b, n, c = t.shape
        q, k, v = self.qkv(t).reshape(b, n, 3, 3, 4).permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused:
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            o = (q @ k.transpose(-2, -1) * 0.5).softmax(-1) @ v
        t = t + self.proj(o.transpose(1, 2).reshape(b, n, c))
        return self.head(t.mean(1))


class Fused(Explicit):
    def __init__(self):
        super().__init__(fused=True)


class PackedMHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.mha, self.head = nn.Conv2d(3, 12, 2, stride=2), nn.MultiheadAttention(12, 3, batch_first=True), \
            nn.Linear(12, 3)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        return self.head((t + self.mha(t, t, t, need_weights=False)[0]).mean(1))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 12, 2, stride=2)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(12, 3, 24, dropout=0.0, batch_first=True), 2,
                                         enable_nested_tensor=False)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(self.enc(self.embed(x).flatten(2).transpose(1, 2)).mean(1))


def _heads(groups):
    k = kinds(groups)
    return k.get("heads", 0), k.get("head_dim_qk", 0), k.get("head_dim_v", 0)


def test_explicit_attention_heads_and_per_head_dims():
    assert _heads(check(Explicit, X)) == (1, 1, 1)


def test_fused_attention_heads_and_per_head_dims():
    assert _heads(check(Fused, X)) == (1, 1, 1)


def test_packed_multihead_attention():
    assert _heads(check(PackedMHA, X)) == (1, 1, 1)


def test_transformer_encoder_layers_are_traced_through():
    assert _heads(check(Encoder, X)) == (2, 2, 2)
