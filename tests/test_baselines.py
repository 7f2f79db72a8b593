"""ZipIt!, RegMean and the least-squares input variants, in the same harness
as PLeaS."""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxmerge
from fxmerge.fit.passes import REGMEAN_ALPHA
from fxmerge.merging.zipit import merge_matrices, zip_pairs
from test_merge import CNN_KINDS, X, calib, net, permuted_copy, with_bn_stats_from

# ZipIt! pairs single features; the channels inside a depthwise block with a
# channel multiplier are averaged in place, so a copy permuted inside those
# blocks is out of its reach
zip_specs = st.lists(st.tuples(st.sampled_from([k for k in CNN_KINDS if k != "depthwise"]), st.integers(0, 3)),
                     min_size=1, max_size=3)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=zip_specs, seed=st.integers(0, 1000))
def test_zipit_at_two_x_is_the_ensemble_and_recovers_a_permuted_copy_at_one_x(spec, seed):
    a, b = net(spec, seed), net(spec, seed + 1)
    res = fxmerge.merge(a, b, calib(2), budget=2.0, method="zipit", reset_bn=False)
    if res.report["cost_feasible"][1] >= 2.0:
        with torch.no_grad():
            torch.testing.assert_close(res.model(X), (a(X) + b(X)) / 2, rtol=1e-4, atol=1e-5)
    data = calib(3, seed=seed)
    a = with_bn_stats_from(a, data)
    res = fxmerge.merge(a, permuted_copy(a, seed), data, budget=1.0, method="zipit")
    with torch.no_grad():
        torch.testing.assert_close(res.model(X), a(X), rtol=1e-3, atol=1e-4)


def test_zipit_partial_zipping_cost_is_measured_as_planned():
    spec = [("residual", 1), ("concat", 0), ("residual", 2)]
    a, b = net(spec, 5, stem=16), net(spec, 6, stem=16)
    costs = []
    for budget in (1.0, 1.3, 1.6, 2.0):
        r = fxmerge.merge(a, b, calib(2), budget=budget, method="zipit").report
        assert r["cost_measured"] == pytest.approx(r["cost_planned"], rel=1e-3)
        costs.append(r["cost_measured"])
    assert costs == sorted(costs) and costs[0] == pytest.approx(1.0) and costs[-1] == pytest.approx(2.0)


def test_zip_pairs_merge_the_most_correlated_features_within_or_across_models():
    # features 0,1 (model A) are copies of each other; 2,3 (model B) too
    corr = np.array([
        [1.0, 0.99, 0.1, 0.2],
        [0.99, 1.0, 0.3, 0.1],
        [0.1, 0.3, 1.0, 0.95],
        [0.2, 0.1, 0.95, 1.0],
    ])
    pairs = zip_pairs(corr)
    assert sorted(pairs) == [(0, 1), (2, 3)]
    M, U = merge_matrices(pairs, 2)
    np.testing.assert_allclose(M.sum(1), 1.0)
    np.testing.assert_allclose(U.sum(1), 1.0)


def test_regmean_of_a_model_with_itself_is_the_same_function():
    spec = [("residual", 1), ("widen", 0)]
    data = calib(3)
    a = with_bn_stats_from(net(spec, 8), data)
    res = fxmerge.merge(a, copy.deepcopy(a), data, method="regmean")
    with torch.no_grad():
        torch.testing.assert_close(res.model(X), a(X), rtol=1e-4, atol=1e-5)


def test_regmean_solves_its_closed_form_on_a_linear_model():
    torch.manual_seed(0)
    a, b = nn.Sequential(nn.Linear(6, 3)), nn.Sequential(nn.Linear(6, 3))
    xs = [torch.randn(40, 6) for _ in range(2)]
    res = fxmerge.merge(a, b, xs, method="regmean", ridge=0.0, positions=0)
    Xa = torch.cat([torch.cat(xs), torch.ones(80, 1)], 1).double()
    G = Xa.T @ Xa  # both models see the same inputs
    Gt = REGMEAN_ALPHA * G + (1 - REGMEAN_ALPHA) * torch.diag(torch.diagonal(G))
    Wa = torch.cat([a[0].weight, a[0].bias[:, None]], 1).double()
    Wb = torch.cat([b[0].weight, b[0].bias[:, None]], 1).double()
    want = torch.linalg.solve(2 * Gt, Gt @ Wa.T + Gt @ Wb.T).T
    got_lin = res.model.get_submodule("0")
    got = torch.cat([got_lin.weight, got_lin.bias[:, None]], 1).double()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_least_squares_on_merged_inputs_fits_each_layer_and_keeps_the_self_merge():
    spec = [("residual", 1), ("concat", 0)]
    data = calib(3)
    a = with_bn_stats_from(net(spec, 13), data)
    res = fxmerge.merge(a, permuted_copy(a, 2), data, method="pleas", ls_inputs="merged")
    with torch.no_grad():
        torch.testing.assert_close(res.model(X), a(X), rtol=1e-3, atol=1e-4)
    b = net(spec, 14)
    res = fxmerge.merge(a, b, data, budget=1.3, method="pleas", ls_inputs="merged")
    ls = res.report["least_squares"]
    assert ls["inputs"] == "merged" and res.report["sweep"]["waves"] > 1
    for name, v in ls["per_layer"].items():
        assert v["loss_fit"] <= v["loss_init"] * (1 + 1e-6) + 1e-9, name


def test_regmean_and_zipit_keep_both_heads_with_disjoint_labels():
    spec = [("residual", 1)]
    a, b = net(spec, 3), net(spec, 4)
    for method in ("regmean", "zipit"):
        res = fxmerge.merge(a, b, calib(2), method=method, labels="disjoint")
        with torch.no_grad():
            assert res.model(X).shape == (2, 10), method
