"""Layout ops: reshape, permute, cat, split/chunk, slicing, repeat, expand,
stack/unbind, integer-tensor indexing, Tensor.unfold."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from rulecheck import check, kinds

X = torch.randn(2, 3, 8, 8)


class CatSplit(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 6, 1)
        self.c, self.d = nn.Conv2d(5, 4, 1), nn.Conv2d(5, 4, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        y = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1)
        p, q = y.split([5, 5], dim=1)
        return self.head(torch.cat([self.c(p), self.d(q)], 1).mean((2, 3)))


class ReshapeHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 12, 2, stride=2)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        t = self.a(x).flatten(2).transpose(1, 2)  # (b, n, 12)
        b, n, c = t.shape
        u = t.reshape(b, n, 3, 4).permute(0, 2, 1, 3)  # (b, 3, n, 4)
        return self.head(u.permute(0, 2, 1, 3).reshape(b, n, c).mean(1))


class Slices(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.c = nn.Conv2d(10, 5, 1)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        y = torch.cat([y[:, :4], y.narrow(1, 4, 4), y[:, 2:4].repeat(1, 1, 1, 1)], 1)
        return self.head(self.c(F.relu(y)).mean((2, 3)))


class StackUnbind(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, 6, 1), nn.Conv2d(3, 6, 1), nn.Linear(6, 3)

    def forward(self, x):
        s = torch.stack([self.a(x), self.b(x)], 0)
        p, q = s.unbind(0)
        return self.head(F.relu(p + q).mean((2, 3)))


class BiasTable(nn.Module):
    """A relative position bias table read through an index buffer (beit, swin)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.table = nn.Parameter(torch.randn(7, 2) * 0.1)
        self.register_buffer("index", (torch.arange(16) * 5) % 7)  # the same in every instance, as a real one
        self.embed, self.head = nn.Conv2d(3, 8, 2, stride=2), nn.Linear(8, 3)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)[:, :4]  # 4 tokens
        b, n, c = t.shape
        q, k, v = self.qkv(t).reshape(b, n, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.table[self.index].reshape(4, 4, 2).permute(2, 0, 1)
        attn = (q @ k.transpose(-2, -1) + bias).softmax(-1)
        return self.head((attn @ v).transpose(1, 2).reshape(b, n, c).mean(1))


class Windows(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Conv2d(3, 6, 1), nn.Linear(6, 3)

    def forward(self, x):
        w = F.relu(self.a(x)).unfold(2, 4, 4).unfold(3, 4, 4)  # (b, 6, 2, 2, 4, 4)
        return self.head(w.mean((2, 3, 4, 5)))


class MaskInPlace(nn.Module):
    """A shifted-window mask built next to the features (``x.new_zeros``,
    regions written in place, as torchvision's Swin does) and a constant
    shaped like them (``zeros_like``): no channel flows into either."""

    def __init__(self):
        super().__init__()
        self.qkv, self.embed, self.head = nn.Linear(8, 24), nn.Conv2d(3, 8, 2, stride=2), nn.Linear(8, 3)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)[:, :4]  # 4 tokens
        b, n, c = t.shape
        q, k, v = self.qkv(t).reshape(b, n, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        mask = t.new_zeros((n, n))
        mask[:2, 2:] = -100.0
        mask[2:, :2] = -100.0
        attn = (q @ k.transpose(-2, -1) + mask).softmax(-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.head((out + torch.zeros_like(out)).mean(1))


def test_cat_and_split_keep_each_part_apart():
    assert kinds(check(CatSplit, X)).get("concat", 0) >= 2


def test_reshape_into_heads_and_back():
    check(ReshapeHeads, X)


def test_slices_and_repeat_of_concatenated_parts():
    check(Slices, X)


def test_stack_and_unbind():
    check(StackUnbind, X)


def test_integer_tensor_indexing_keeps_heads_free():
    groups = check(BiasTable, X)
    assert "heads" in kinds(groups)
    assert any(("table", 1) in g.members for g in groups.groups if g.kind == "heads")


def test_a_mask_built_in_place_and_constants_pin_no_channel():
    assert kinds(check(MaskInPlace, X)).get("heads", 0) >= 1


def test_tensor_unfold_windows_keep_channels_free():
    assert kinds(check(Windows, X)) == {"hidden": 1}


class Shuffles(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.shuffle = nn.Conv2d(3, 16, 3, padding=1), nn.PixelShuffle(2)
        self.b = nn.Conv2d(4, 6, 1)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.b(self.shuffle(F.relu(self.a(x)))).mean((2, 3)))


class ChannelShuffleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.shuffle, self.b = nn.Conv2d(3, 8, 1), nn.ChannelShuffle(2), nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.b(self.shuffle(F.relu(self.a(x)))).mean((2, 3)))


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, ids):
        return self.fc(F.relu(self.emb(ids)).mean(1))


def test_pixel_shuffle_moves_blocks_of_channels_into_space():
    groups = check(Shuffles, X)
    assert any(("a.weight", 0) in g.members for g in groups.groups)


def test_channel_shuffle_permutes_blocks_but_stays_merged():
    groups = check(ChannelShuffleNet, X, exact_two_x=False)
    assert kinds(groups) == {"blocks": 2, "hidden": 1}


def test_an_embedding_table_feeds_its_feature_axis():
    torch.manual_seed(0)
    model = Tokens().eval()
    ids = torch.randint(0, 20, (2, 5))
    import fxmerge

    groups = fxmerge.analyze(model, ids)
    assert any(("emb.weight", 1) in g.members and ("fc.weight", 1) in g.members for g in groups.groups)
    assert fxmerge.verify(model, ids, groups).ok
