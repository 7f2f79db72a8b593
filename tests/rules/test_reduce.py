"""Reductions: symmetric ones keep the kept axes (over widened channels they
run once per model view); order-dependent ones pin what they scan."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from rulecheck import check, kinds

X = torch.randn(2, 3, 8, 8)


class SpatialPooling(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Conv2d(3, 6, 3, padding=1), nn.Linear(6, 4)

    def forward(self, x):
        y = F.relu(self.a(x))
        return self.head(y.mean((2, 3)) + y.amax((2, 3)) + y.std((2, 3)))


class ChannelReduction(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Conv2d(3, 6, 3, padding=1), nn.Linear(6, 4)

    def forward(self, x):
        y = F.relu(self.a(x))
        return self.head((y / (y.norm(dim=1, keepdim=True) + 1)).mean((2, 3)))


class Scan(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 1), nn.Linear(6, 4)

    def forward(self, x):
        return self.head(self.b(F.relu(self.a(x)).cumsum(dim=1)).mean((2, 3)))


def test_pooling_over_positions_keeps_channels_free():
    assert kinds(check(SpatialPooling, X)) == {"residual": 1}  # three pooled sums joined


def test_a_reduction_over_channels_runs_per_model_view_when_widened():
    check(ChannelReduction, X)


def test_an_order_dependent_scan_pins_its_axis_and_says_so():
    check(Scan, X, min_groups=1, pinned={"call_method:cumsum"}, exact_two_x=False)


class LRN(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.lrn, self.b, self.head = nn.Conv2d(3, 6, 1), nn.LocalResponseNorm(3), nn.Conv2d(6, 6, 1), \
            nn.Linear(6, 4)

    def forward(self, x):
        return self.head(self.b(self.lrn(F.relu(self.a(x)))).mean((2, 3)))


class Cosine(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.sim = nn.Conv2d(3, 6, 1), nn.Conv2d(3, 6, 1), nn.CosineSimilarity(dim=1)
        self.head = nn.Linear(1, 4)

    def forward(self, x):
        return self.head(self.sim(F.relu(self.a(x)), F.relu(self.b(x))).mean((1, 2))[:, None])


def test_local_response_norm_pins_its_channel_order():
    check(LRN, X, pinned={"call_module:nn.LocalResponseNorm"}, exact_two_x=False)


def test_cosine_similarity_compares_each_model_s_own_features():
    check(Cosine, X)
