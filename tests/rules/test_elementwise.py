"""Elementwise ops (activations, arithmetic with broadcasting, clamps):
every axis of the output is the matching axis of the inputs."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from rulecheck import check, kinds

X = torch.randn(2, 3, 8, 8)


class Activations(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 5, 1)
        self.act = nn.Hardswish()

    def forward(self, x):
        y = F.silu(self.a(x)) + self.act(self.a(x)).clamp(-1, 1) * torch.tanh(self.a(x)).abs()
        return self.b(torch.sigmoid(y) - y.neg().exp() / 4).mean((2, 3))


class Broadcasting(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 5, 1)
        self.gamma = nn.Parameter(torch.rand(6, 1, 1) + 0.5)
        self.shift = nn.Parameter(torch.randn(1, 6, 1, 1))

    def forward(self, x):
        y = self.a(x)
        y = y * self.gamma + self.shift + x.mean(1, keepdim=True)  # a per-position scalar broadcast over channels
        return self.b(F.relu(y)).mean((2, 3))


class ResidualJoin(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 4, 3, padding=1), nn.Conv2d(4, 6, 1)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        s = F.relu(self.stem(x))
        return self.head((s + self.b(F.relu(self.a(s)))).mean((2, 3)))


def test_activations_keep_channels_permutable():
    # the sum of full tensors is read as a residual join
    assert kinds(check(Activations, X)) == {"residual": 1}


def test_broadcast_operands_join_the_channel_group():
    groups = check(Broadcasting, X)
    members = {m for g in groups.groups for m, _ in g.members}
    assert {"gamma", "shift"} <= members


def test_a_residual_add_ties_both_branches():
    assert kinds(check(ResidualJoin, X)) == {"residual": 1, "hidden": 1}


class PReLUGLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.prelu = nn.Conv2d(3, 8, 3, padding=1), nn.PReLU(8)
        self.b, self.glu = nn.Conv2d(8, 12, 1), nn.GLU(dim=1)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        return self.head(self.glu(self.b(self.prelu(self.a(x)))).mean((2, 3)))


def test_prelu_slopes_follow_their_channels_and_glu_halves_share_one_order():
    groups = check(PReLUGLU, X)
    assert any(("prelu.weight", 0) in g.members for g in groups.groups)
    # b's two output halves permute alike: one group covers both
    assert any(sum(1 for m in g.slices if m.param == "b.weight" and m.axis == 0) == 2 for g in groups.groups)


class SlicedGates(nn.Module):
    """FocalNet's modulation: one projection split into a context and
    per-level gates; each gate is a one-channel slice broadcast over the
    context's channels."""

    def __init__(self):
        super().__init__()
        self.f = nn.Conv2d(3, 6 + 2, 1)
        self.ctx = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        ctx, gates = torch.split(self.f(x), (6, 2), 1)
        out = 0
        for level in range(2):
            ctx = F.gelu(self.ctx(ctx))
            out = out + ctx * gates[:, level:level + 1]
        return self.head(out.mean((2, 3)))


def test_a_one_channel_slice_broadcast_over_channels_runs_per_model_view():
    # widened, the gate slice holds one channel per model and no longer
    # broadcasts in place: each model's gate scales its own channels
    groups = check(SlicedGates, X)
    assert any(m.kind == "call_function:operator.mul" for m in groups.mixings)
