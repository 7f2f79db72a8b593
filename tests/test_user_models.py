"""Networks written the way users write them, in the style of a pruning
library's test suite (one op pattern per network): concatenation, cascaded
concatenation, split, reshape, transposed convolution, a customised layer
that normalises over channels, a cosine classifier, a softmax over channels,
multiple inputs and outputs, unused parameters, a flattened map into a
linear layer, depthwise multipliers in a row, attention packed per head,
attention read back heads last, activations in place.

For every one: the groups verify; a permuted copy merges back to the same
function at 1x (matching on activations and on weights, with and without
least squares); at 2x the merged model is the ensemble (an op that combines
the channels it would widen runs once per model view), or, where blocks
cannot widen within, the budget is reported out of reach with the reason; at 1.5x the measured cost is the planned one; the
merge's statistics stay far below 4 GB.
"""
import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxmerge
from fxmerge.analysis.tracing import without_fast_path


class ConvBN(nn.Module):
    def __init__(self, cin, cout, k=3, stride=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class Head(nn.Module):
    def __init__(self, c, classes=4):
        super().__init__()
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


class ConcatNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = ConvBN(3, 6), ConvBN(3, 4)
        self.c = ConvBN(10, 8)
        self.head = Head(8)

    def forward(self, x):
        return self.head(self.c(torch.cat([self.a(x), self.b(x)], 1)))


class CascadedConcatNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = ConvBN(3, 4), ConvBN(4, 4)
        self.c = ConvBN(8, 6)
        self.d = ConvBN(14, 8)
        self.head = Head(8)

    def forward(self, x):
        a = self.a(x)
        ab = torch.cat([a, self.b(a)], 1)
        return self.head(self.d(torch.cat([ab, self.c(ab)], 1)))


class SplitNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = ConvBN(3, 12)
        self.left, self.right = ConvBN(4, 4), ConvBN(8, 6)
        self.head = Head(10)

    def forward(self, x):
        a, b = torch.split(self.stem(x), [4, 8], dim=1)
        return self.head(torch.cat([self.left(a), self.right(b)], 1))


class ReshapeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = ConvBN(3, 8)
        self.fc1 = nn.Linear(8, 12)
        self.fc2 = nn.Linear(12, 4)

    def forward(self, x):
        t = self.stem(x).flatten(2).transpose(1, 2)  # (batch, positions, channels)
        t = F.gelu(self.fc1(t)).reshape(t.shape[0], -1, 3, 4).flatten(2)
        return self.fc2(t).mean(1)


class UNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.down = ConvBN(3, 6, stride=2)
        self.up = nn.ConvTranspose2d(6, 5, 4, stride=2, padding=1)
        self.mix = ConvBN(8, 6)
        self.head = Head(6)

    def forward(self, x):
        skip = x
        return self.head(self.mix(torch.cat([F.relu(self.up(self.down(x))), skip], 1)))


class CustomizedLayer(nn.Module):
    """Normalises each position over its channels, then scales them."""

    def __init__(self, c):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(c) + 0.5)
        self.bias = nn.Parameter(torch.randn(c) * 0.1)

    def forward(self, x):
        norm = x.pow(2).sum(dim=1, keepdim=True).sqrt()
        x = torch.div(x, norm + 1e-3)
        return x * self.scale[:, None, None] + self.bias[:, None, None]


class CustomizedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = ConvBN(3, 8)
        self.custom = CustomizedLayer(8)
        self.b = ConvBN(8, 6)
        self.head = Head(6)

    def forward(self, x):
        return self.head(self.b(self.custom(self.a(x))))


class CosineClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = ConvBN(3, 6), ConvBN(6, 8)
        self.weight = nn.Parameter(torch.randn(4, 8))

    def forward(self, x):
        f = F.normalize(self.b(self.a(x)).mean((2, 3)), dim=1)
        return 10 * f @ F.normalize(self.weight, dim=1).t()


class ChannelSoftmaxNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = ConvBN(3, 6), ConvBN(6, 6)
        self.head = Head(6)

    def forward(self, x):
        a = self.a(x)
        return self.head(self.b(a * torch.softmax(a, dim=1)))


class TwoInputsTwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = ConvBN(3, 6), ConvBN(1, 4)
        self.c = ConvBN(10, 8)
        self.head, self.aux = Head(8), Head(6, 2)
        self.unused = nn.Linear(5, 5)  # never called

    def forward(self, x1, x2):
        a = self.a(x1)
        y = self.c(torch.cat([a, self.b(x2)], 1))
        return self.head(y), self.aux(a)


class FlattenNet(nn.Module):
    """A final linear layer reads a flattened 64 x 16 x 16 map (16384
    features): matching must not build a 16384^2 correlation."""

    def __init__(self):
        super().__init__()
        self.a = ConvBN(3, 64)
        self.fc = nn.Linear(64 * 16 * 16, 4)

    def forward(self, x):
        return self.fc(self.a(x).flatten(1))


# net, example inputs, whether an op combines channels the merge would widen
class PackedBiasNet(nn.Module):
    """A convolution whose bias is concatenated from a parameter and a
    non-persistent zero buffer (BEiT's q/k/v bias), outside state_dict."""

    def __init__(self):
        super().__init__()
        self.a = ConvBN(3, 8)
        self.conv = nn.Conv2d(8, 12, 3, padding=1, bias=False)
        self.bias_learned = nn.Parameter(torch.randn(6) * 0.1)
        self.register_buffer("bias_zero", torch.zeros(6), persistent=False)
        self.head = Head(12)

    def forward(self, x):
        bias = torch.cat((self.bias_learned, self.bias_zero))
        return self.head(F.relu(F.conv2d(self.a(x), self.conv.weight, bias, padding=1)))


class SamePaddingNet(nn.Module):
    """Convolutions with ``padding='same'`` (ConvMixer), odd and even kernels."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding="same")
        self.b = nn.Conv2d(8, 8, 2, padding="same")
        self.head = Head(8)

    def forward(self, x):
        return self.head(F.gelu(self.b(F.gelu(self.a(x)))))


class FunctionalGroupNorm(nn.Module):
    """A norm module whose forward calls ``F.group_norm`` with its own group
    count (timm's GroupNormAct, traced through): the traced call carries the
    count as a constant that must grow with the channels."""

    def __init__(self, groups, channels):
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(channels))
        self.bias = nn.Parameter(0.1 * torch.randn(channels))

    def forward(self, x):
        return F.relu(F.group_norm(x, self.groups, self.weight, self.bias, 1e-5))


class GroupNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.norm_a = FunctionalGroupNorm(4, 8)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.norm_b = nn.GroupNorm(2, 8)
        self.head = Head(8)

    def forward(self, x):
        return self.head(F.relu(self.norm_b(self.b(self.norm_a(self.a(x))))))


class SplitAttentionNet(nn.Module):
    """ResNeSt's split attention: a grouped convolution whose groups are the
    radix splits, reshaped to ``(batch, radix, channels, h, w)``, summed over
    the radix for a gate computed by dense layers, and gated per split (the
    per-split channels appear both inside the convolution's blocks and as
    an axis of their own)."""

    def __init__(self, radix=2, channels=8):
        super().__init__()
        self.radix = radix
        self.stem = ConvBN(3, 8)
        self.conv = nn.Conv2d(8, channels * radix, 3, padding=1, groups=radix)
        self.bn = nn.BatchNorm2d(channels * radix)
        self.fc1 = nn.Conv2d(channels, 8, 1)
        self.fc2 = nn.Conv2d(8, channels * radix, 1)
        self.head = Head(channels)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(self.stem(x))))
        b, rc, h, w = x.shape
        x = x.reshape(b, self.radix, rc // self.radix, h, w)
        gap = x.sum(dim=1).mean((2, 3), keepdim=True)
        attn = self.fc2(F.relu(self.fc1(gap))).view(b, self.radix, -1).softmax(dim=1)
        out = (x * attn.reshape(b, self.radix, rc // self.radix, 1, 1)).sum(dim=1)
        return self.head(out)


class StackedMultipliersNet(nn.Module):
    """Depthwise convolutions with a channel multiplier, three in a row (as
    FastViT's patch embedding and final convolution): each one's blocks are
    the channels the one before made, so its within-block orders can only be
    matched once the blocks they sit in are."""

    def __init__(self, depth=3):
        super().__init__()
        self.stem = ConvBN(3, 4)
        c, self.dws = 4, nn.ModuleList()
        for _ in range(depth):
            self.dws.append(nn.Conv2d(c, 2 * c, 3, padding=1, groups=c))
            c *= 2
        self.head = Head(c)

    def forward(self, x):
        x = self.stem(x)
        for dw in self.dws:
            x = F.gelu(dw(x))
        return self.head(x)


class PerHeadQKVNet(nn.Module):
    """Attention whose projection packs ``[q | k | v]`` per head (CoAtNet's
    and MaxViT's layout): a head's block of the projection is made of three
    parts, q and k sharing their within-head order."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.stem = ConvBN(3, dim)
        self.qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)
        self.head = Head(dim)

    def split(self, qkv, b, c, hw):
        """q, k and v as ``(batch, heads, head dim, positions)``."""
        return qkv.view(b, self.heads, 3 * c // self.heads, hw).chunk(3, dim=2)

    def join(self, out, b, c, h, w):
        """The heads' outputs back as channels."""
        return out.reshape(b, c, h, w)

    def forward(self, x):
        x = self.stem(x)
        b, c, h, w = x.shape
        q, k, v = self.split(self.qkv(x), b, c, h * w)
        attn = (q.transpose(-2, -1) @ k).softmax(dim=-1)
        out = self.join(v @ attn.transpose(-2, -1), b, c, h, w)
        return self.head(x + self.proj(out))


class HeadsLastNet(PerHeadQKVNet):
    """Attention whose output lays its channels out as (head dim, heads), the
    transpose of its projection's (heads, head dim) (NesT's
    ``permute(0, 2, 3, 4, 1)``): the value order, shared by every head, is
    also the blocks of a product whose inner dim is the heads."""

    def __init__(self, dim=16, heads=4):
        super().__init__(dim, heads)

    def split(self, qkv, b, c, hw):
        return qkv.view(b, 3, self.heads, c // self.heads, hw).unbind(1)

    def join(self, out, b, c, h, w):
        return out.permute(0, 2, 1, 3).reshape(b, c, h, w)


class InPlaceNet(nn.Module):
    """Activations that overwrite a convolution's output in place, the way
    squeeze-excitation and ResNet code writes them: ``nn.ReLU(inplace=True)``
    right after a convolution, ``F.relu(..., inplace=True)``, ``x.relu_()``
    and ``x += y``."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.reduce, self.act, self.expand = nn.Conv2d(c, 4, 1), nn.ReLU(inplace=True), nn.Conv2d(4, c, 1)
        self.head = Head(c)

    def forward(self, x):
        x = F.relu(self.stem(x), inplace=True)
        y = self.conv(x).relu_()
        gate = torch.sigmoid(self.expand(self.act(self.reduce(y.mean((2, 3), keepdim=True)))))
        y = y * gate
        y += x
        return self.head(y)


SIZE = 16
NETS = {
    "concat": (ConcatNet, None, False),
    "cascaded_concat": (CascadedConcatNet, None, False),
    "split": (SplitNet, None, False),
    "reshape": (ReshapeNet, None, False),
    "conv_transpose": (UNetLike, None, False),
    "customized_layer": (CustomizedNet, None, False),
    "cosine_classifier": (CosineClassifier, None, False),
    "channel_softmax": (ChannelSoftmaxNet, None, False),
    "two_inputs_two_outputs": (TwoInputsTwoOutputs, "two", False),
    "flatten_linear": (FlattenNet, None, False),
    "packed_bias": (PackedBiasNet, None, False),
    "same_padding": (SamePaddingNet, None, False),
    "group_norm": (GroupNormNet, None, False),
    "split_attention": (SplitAttentionNet, None, "widen whole, never within"),
    "stacked_multipliers": (StackedMultipliersNet, None, False),
    "per_head_qkv": (PerHeadQKVNet, None, False),
    "in_place": (InPlaceNet, None, False),
    # the heads widen whole in one layout and sit inside the value order in the other
    "heads_last": (HeadsLastNet, None, "widen whole, never within"),
}


def inputs(kind, n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, SIZE, SIZE, generator=g)
    if kind == "two":
        return (x, torch.randn(n, 1, SIZE, SIZE, generator=g))
    return (x,)


def data(kind, seed=0):
    return [inputs(kind, 16, seed + i) for i in range(3)]


def call(model, xs):
    with torch.no_grad(), without_fast_path():
        return model(*xs)


def assert_outputs_close(a, b, **tol):
    a = a if isinstance(a, tuple) else (a,)
    b = b if isinstance(b, tuple) else (b,)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **tol)


def pair(name):
    cls, kind, _ = NETS[name]
    torch.manual_seed(0)
    a = cls().eval()
    torch.manual_seed(1)
    b = cls().eval()
    return a, b, kind


def with_bn_stats(model, batches):
    m = copy.deepcopy(model).train()
    for bn in m.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.momentum = None
    with torch.no_grad():
        for xs in batches:
            m(*xs)
    return m.eval()


@pytest.mark.parametrize("matching", ["activation", "weight"])
@pytest.mark.parametrize("name", list(NETS))
def test_groups_verify_and_a_permuted_copy_merges_back(name, matching):
    a, _, kind = pair(name)
    batches = data(kind)
    a = with_bn_stats(a, batches)
    x = inputs(kind, 4, 99)
    groups = fxmerge.analyze(a, x)
    assert len(groups) > 0 and not groups.pinned
    assert fxmerge.verify(a, x, groups).ok
    sampler = groups.sampler(np.random.default_rng(3))
    state = a.state_dict()
    state.update(groups.permute_state(state, sampler))
    b = copy.deepcopy(a)
    b.load_state_dict(state)
    want = call(a, x)
    scale = max(float(y.abs().max()) for y in (want if isinstance(want, tuple) else (want,)))
    # the matching alone recovers the permutation: averaging B's aligned
    # weights with A's gives A's (least squares could hide a wrong match)
    res = fxmerge.merge(a, b, batches, budget=1.0, method="perm", bn_stats="source", matching=matching)
    assert_outputs_close(call(res.model, x), want, rtol=1e-4, atol=1e-5 * scale)
    res = fxmerge.merge(a, b, batches, budget=1.0, method="pleas", bn_stats="source", matching=matching,
                        max_memory="3G")
    # least squares re-solves every layer from float32 statistics: exact up to
    # their rounding (the 16385-column system of the flattened map has 48 samples)
    assert_outputs_close(call(res.model, x), want, rtol=1e-3, atol=2e-3 * scale)


@pytest.mark.parametrize("name", list(NETS))
def test_two_x_is_the_ensemble_or_says_why_not(name):
    a, b, kind = pair(name)
    mixes = NETS[name][2]
    x = inputs(kind, 4, 99)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = fxmerge.merge(a, b, data(kind), budget=2.0, method="perm", bn_stats="source", max_memory="3G")
    r = res.report
    if mixes:
        assert not r["budget_reachable"] and r["cost_measured"] < 2.0
        assert r["kept_merged"] and any(issubclass(w.category, fxmerge.BudgetWarning) for w in caught)
        why = "combines" if mixes is True else mixes
        assert any(why in k["reason"] for k in r["kept_merged"])
        return
    assert r["budget_reachable"] and r["cost_measured"] == pytest.approx(2.0, rel=1e-6)
    ya, yb = call(a, x), call(b, x)
    want = tuple((p + q) / 2 for p, q in zip(ya, yb)) if isinstance(ya, tuple) else (ya + yb) / 2
    assert_outputs_close(call(res.model, x), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(NETS))
def test_partial_merge_costs_what_was_planned_and_stays_small(name):
    a, b, kind = pair(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fxmerge.merge(a, b, data(kind), budget=1.5, method="pleas", max_memory="3G")
    r = res.report
    assert r["cost_measured"] == pytest.approx(r["cost_planned"], rel=1e-6)
    if r["budget_reachable"]:
        assert r["cost_measured"] == pytest.approx(1.5, abs=max(r["cost_resolution"], 0.02))
    assert r["sweep"]["statistics_peak_bytes"] + r["sweep"]["frontier_peak_bytes"] < 4 << 30
    out = call(res.model, inputs(kind, 2, 5))
    for y in (out if isinstance(out, tuple) else (out,)):
        assert torch.isfinite(y).all()


def test_multiple_inputs_from_dicts_and_a_custom_item_reader():
    a, b, kind = pair("two_inputs_two_outputs")
    batches = data(kind)
    as_dicts = [{"x1": x1, "x2": x2, "label": torch.zeros(len(x1))} for x1, x2 in batches]
    r1 = fxmerge.merge(a, b, batches, budget=1.3, method="pleas")
    r2 = fxmerge.merge(a, b, as_dicts, budget=1.3, method="pleas", example_inputs={"x1": batches[0][0][:2],
                                                                                   "x2": batches[0][1][:2]})
    r3 = fxmerge.merge(a, b, [(xs, torch.zeros(16)) for xs in batches], budget=1.3, method="pleas")
    r4 = fxmerge.merge(a, b, [{"pair": xs} for xs in batches], budget=1.3, method="pleas",
                       batch_inputs=lambda item: item["pair"])
    x = inputs(kind, 4, 7)
    for other in (r2, r3, r4):
        assert_outputs_close(call(other.model, x), call(r1.model, x), rtol=1e-5, atol=1e-6)


def test_calibration_items_that_do_not_name_the_inputs_are_a_clear_error():
    a, b, kind = pair("two_inputs_two_outputs")
    with pytest.raises(fxmerge.InputError, match="batch_inputs"):
        fxmerge.merge(a, b, [{"image": torch.randn(4, 3, SIZE, SIZE)}] * 2)
    with pytest.raises(fxmerge.InputError, match="2 inputs"):
        fxmerge.merge(a, b, [(torch.randn(4, 3, SIZE, SIZE),)] * 2)
