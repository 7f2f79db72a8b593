"""The matching statistics: streaming correlations that survive features
whose mean dwarfs their spread (saturated gates, biased channels)."""
import copy

import numpy as np
import pytest
import timm
import torch

import fxmerge
from fxmerge.merging.statistics import CorrelationStats
from fxmerge.merging.zipit import JointStats


def features(seed, n=4096, d=6):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g)
    b = 0.7 * a[:, torch.randperm(d, generator=g)] + 0.3 * torch.randn(n, d, generator=g)
    # large offsets and tiny spreads: E[ab] - E[a]E[b] in float32 loses them
    a[:, 0] = 1000.0 + 1e-3 * a[:, 0]
    b[:, 1] = -500.0 + 1e-3 * b[:, 1]
    a[:, 2] = 3.0  # constant: correlates with nothing
    return a, b


def corrcoef(x):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nan_to_num(np.corrcoef(x.double().numpy().T))  # a constant row has no correlation


def reference(a, b):
    return corrcoef(torch.cat([a, b], 1))[: a.shape[1], a.shape[1]:]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streaming_correlation_matches_float64_reference_despite_offsets(seed):
    a, b = features(seed)
    st = CorrelationStats(a.shape[1], "cpu")
    for i in range(0, a.shape[0], 512):
        st.add(a[i:i + 512], b[i:i + 512])
    np.testing.assert_allclose(st.correlation(), reference(a, b), atol=2e-3)


def test_pooled_zipit_correlation_matches_float64_reference_despite_offsets():
    a, b = features(3)
    st = JointStats(a.shape[1], "cpu")
    for i in range(0, a.shape[0], 512):
        st.add(a[i:i + 512], b[i:i + 512])
    x = torch.cat([a, b], 1)
    want = corrcoef(x)
    got = st.correlation()
    off_diagonal = ~np.eye(len(want), dtype=bool)
    np.testing.assert_allclose(got[off_diagonal], want[off_diagonal], atol=2e-3)
    assert np.abs(got).max() <= 1.0


def test_self_merge_is_exact_when_gates_saturate():
    # a random-init MobileNetV3 whose squeeze-excite gates (hard sigmoid)
    # saturate to constants: those sites must not steer the matching
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", num_classes=10).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(32, 3, 32, 32, generator=g) for _ in range(4)]
    x = torch.randn(8, 3, 32, 32, generator=g)
    res = fxmerge.merge(model, copy.deepcopy(model), data, budget=1.0, method="perm", reset_bn=False)
    for p in res.plan.permutations.values():
        np.testing.assert_array_equal(p, np.arange(len(p)))
    with torch.no_grad():
        torch.testing.assert_close(res.model(x), model(x), rtol=1e-4, atol=1e-5)
