"""Spatial ops act per channel: pooling, interpolation, padding, unfold/fold."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from rulecheck import check, kinds

X = torch.randn(2, 3, 8, 8)


class Resampling(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3)
        self.pool = nn.AvgPool2d(2)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        y = F.max_pool2d(F.relu(self.a(x)), 2, ceil_mode=True)
        y = F.pad(F.interpolate(self.pool(y), scale_factor=4.0, mode="nearest"), (1, 1, 1, 1), mode="reflect")
        return self.head(F.adaptive_avg_pool2d(F.relu(self.b(y)), 1).flatten(1))


class UnfoldFold(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Conv2d(3, 4, 1), nn.Linear(4, 3)

    def forward(self, x):
        cols = F.unfold(F.relu(self.a(x)), 2, stride=2)  # (b, 4*4, 16)
        y = F.fold(cols, (8, 8), 2, stride=2)
        return self.head(y.mean((2, 3)))


def test_pooling_interpolation_and_padding_pass_channels_through():
    assert kinds(check(Resampling, X)) == {"hidden": 2}


def test_unfold_and_fold_keep_channels_with_their_taps():
    # each channel's taps are a block that moves whole
    assert kinds(check(UnfoldFold, X)) == {"blocks": 1}
