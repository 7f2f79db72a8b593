"""Small networks assembled from the building blocks the analysis must
understand; used by the property tests."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ConvBNAct(nn.Module):
    def __init__(self, cin, cout, groups=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class Residual(nn.Module):
    def __init__(self, c, hidden):
        super().__init__()
        self.a = ConvBNAct(c, hidden)
        self.b = nn.Conv2d(hidden, c, 1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn(self.b(self.a(x))))


class ConcatBranches(nn.Module):
    def __init__(self, c, c1, c2):
        super().__init__()
        self.p = ConvBNAct(c, c1)
        self.q = nn.Conv2d(c, c2, 1)

    def forward(self, x):
        return torch.cat([self.p(x), self.q(x), x], dim=1)


class SplitMix(nn.Module):
    """chunk into halves, transform one, concatenate back (CSP style)."""

    def __init__(self, c):
        super().__init__()
        self.f = ConvBNAct(c // 2, c // 2)

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        return torch.cat([self.f(a), b], dim=1)


class Depthwise(nn.Module):
    def __init__(self, c, mult):
        super().__init__()
        self.dw = nn.Conv2d(c, c * mult, 3, padding=1, groups=c)
        self.pw = nn.Conv2d(c * mult, c, 1)

    def forward(self, x):
        return self.pw(F.gelu(self.dw(x)))


class Grouped(nn.Module):
    def __init__(self, c, groups):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, groups=groups)
        self.gn = nn.GroupNorm(groups, c)

    def forward(self, x):
        return x + F.silu(self.gn(self.conv(x)))


class SqueezeExcite(nn.Module):
    def __init__(self, c, r):
        super().__init__()
        self.fc1 = nn.Conv2d(c, r, 1)
        self.fc2 = nn.Conv2d(r, c, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class ChannelLayerNorm(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.ln = nn.LayerNorm(c)
        self.gamma = nn.Parameter(torch.full((c,), 1e-2))  # LayerScale

    def forward(self, x):
        y = self.ln(x.permute(0, 2, 3, 1)) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class TokenAttention(nn.Module):
    """Self-attention over spatial positions, heads from a reshape."""

    def __init__(self, c, heads, fused=True):
        super().__init__()
        self.h, self.fused = heads, fused
        self.norm = nn.LayerNorm(c)
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)

    def forward(self, x):
        b, c, hh, ww = x.shape
        t = x.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(self.norm(t)).reshape(b, hh * ww, 3, self.h, c // self.h).permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused:
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            o = (q @ k.transpose(-2, -1) * (c // self.h) ** -0.5).softmax(-1) @ v
        t = t + self.proj(o.transpose(1, 2).reshape(b, hh * ww, c))
        return t.transpose(1, 2).reshape(b, c, hh, ww)


class MHABlock(nn.Module):
    def __init__(self, c, heads):
        super().__init__()
        self.mha = nn.MultiheadAttention(c, heads, batch_first=True)

    def forward(self, x):
        b, c, hh, ww = x.shape
        t = x.flatten(2).transpose(1, 2)
        t = t + self.mha(t, t, t, need_weights=False)[0]
        return t.transpose(1, 2).reshape(b, c, hh, ww)


class Net(nn.Module):
    def __init__(self, stem, blocks, classes=5):
        super().__init__()
        self.stem = ConvBNAct(3, stem)
        self.blocks = nn.Sequential(*blocks)
        width = stem
        for blk in blocks:
            width = getattr(blk, "out_width", width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(x.mean((2, 3)))


def block(kind, c, p):
    """Build block ``kind`` on width ``c`` with a small integer parameter ``p``."""
    if kind == "residual":
        return Residual(c, 2 + p)
    if kind == "concat":
        m = ConcatBranches(c, 2 + p, 3)
        m.out_width = c + 2 + p + 3
        return m
    if kind == "split":
        return SplitMix(c) if c % 2 == 0 else Residual(c, 3)
    if kind == "depthwise":
        return Depthwise(c, 1 + p % 2)
    if kind == "grouped":
        return Grouped(c, 2) if c % 2 == 0 else Residual(c, 4)
    if kind == "se":
        return SqueezeExcite(c, 2 + p)
    if kind == "layernorm":
        return ChannelLayerNorm(c)
    if kind == "attention":
        return TokenAttention(c, 2, fused=bool(p % 2)) if c % 2 == 0 else Residual(c, 2)
    if kind == "mha":
        return MHABlock(c, 2) if c % 2 == 0 else Residual(c, 2)
    if kind == "widen":
        m = ConvBNAct(c, c + 2 + p)
        m.out_width = c + 2 + p
        return m
    raise ValueError(kind)


KINDS = ["residual", "concat", "split", "depthwise", "grouped", "se", "layernorm", "attention", "mha", "widen"]


def build(stem, spec):
    blocks, c = [], stem
    for kind, p in spec:
        b = block(kind, c, p)
        c = getattr(b, "out_width", c)
        b.out_width = c
        blocks.append(b)
    return Net(stem, blocks)
