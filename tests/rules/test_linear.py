"""Weighted layers: linear, convolutions (grouped, depthwise, transposed),
functional ones and matmul with a weight."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from rulecheck import check, kinds

X = torch.randn(2, 4, 8, 8)


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 8, 1)
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.dw = nn.Conv2d(8, 16, 3, padding=1, groups=8)  # depthwise with a channel multiplier
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(F.relu(self.dw(F.relu(self.g(F.relu(self.a(x)))))).mean((2, 3)))


class Transposed(nn.Module):
    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(6, 5, 3, stride=2, padding=1, output_padding=1)
        self.head = nn.Conv2d(5, 3, 1)

    def forward(self, x):
        return self.head(F.relu(self.up(F.relu(self.down(x))))).mean((2, 3))


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(6, 4, 3, 3) * 0.3)
        self.w2 = nn.Parameter(torch.randn(6, 5) * 0.3)
        self.w3 = nn.Parameter(torch.randn(3, 5) * 0.3)

    def forward(self, x):
        y = F.relu(F.conv2d(x, self.w1, padding=1)).mean((2, 3))
        return F.linear(F.relu(y @ self.w2), self.w3)


def test_grouped_and_depthwise_convolutions_move_whole_blocks():
    k = kinds(check(Grouped, X))
    assert k.get("blocks", 0) >= 1 and k.get("block_inner", 0) >= 1


def test_transposed_convolution_reads_axis_zero_and_writes_axis_one():
    groups = check(Transposed, X)
    axes = {(m, a) for g in groups.groups for m, a in g.members}
    assert ("up.weight", 0) in axes and ("up.weight", 1) in axes


def test_functional_layers_and_matmul_with_a_weight():
    groups = check(Functional, X)
    axes = {(m, a) for g in groups.groups for m, a in g.members}
    assert {("w1", 0), ("w2", 0), ("w2", 1), ("w3", 1)} <= axes
