"""Normalisations: per-channel statistics (BatchNorm, InstanceNorm),
per-group (GroupNorm: blocks move whole), over the whole axis (LayerNorm:
split per model when widened; GroupNorm with one group: run once per model
view)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from rulecheck import check, kinds

X = torch.randn(2, 3, 8, 8)


class BatchAndInstance(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn, self.inorm = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.InstanceNorm2d(6, affine=True)
        self.head = nn.Linear(6, 4)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        return self.head(self.inorm(F.relu(self.bn(self.a(x)))).mean((2, 3)))


class Groups(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.gn = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(F.relu(self.gn(self.a(x))).mean((2, 3)))


class OneGroup(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.gn = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(1, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(F.relu(self.gn(self.a(x))).mean((2, 3)))


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.ln, self.rms = nn.Conv2d(3, 8, 2, stride=2), nn.LayerNorm(8), nn.RMSNorm(8)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        t = self.a(x).flatten(2).transpose(1, 2)
        t = t + self.fc(self.ln(t))
        return self.head(self.rms(t).mean(1))


def test_batch_and_instance_norm_statistics_follow_their_channels():
    groups = check(BatchAndInstance, X)
    assert any(("bn.running_var", 0) in g.members for g in groups.groups)


def test_group_norm_groups_move_whole():
    assert "blocks" in kinds(check(Groups, X))


def test_group_norm_with_one_group_runs_per_model_view_when_widened():
    check(OneGroup, X)


def test_layer_and_rms_norm_split_per_model_when_widened():
    assert kinds(check(Tokens, X)) == {"residual": 1}
