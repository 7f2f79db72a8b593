"""Merging more than two models: N randomly permuted copies of one model
merge back into it at every budget in [1, N]; at budget N the merge is the
N-model ensemble (or, with disjoint labels, every model's logits side by
side); two models given as a sequence merge as the two-model call does; the
universe's permutations recover the copies' own, so any two models'
correspondence is consistent; the cluster cost model is the two-model one
for two models; bad input is one line and exit 2."""
from __future__ import annotations

import copy
import numpy as np
import pytest
import torch
import torch.nn as nn

import fxmerge
from fxmerge.errors import InputError
from fxmerge.merging.cca import cca_maps
from fxmerge.merging.clusters import plan_clusters, ward_splits
from fxmerge.merging.cost import ClusterCost, CostModel
from fxmerge.merging.plan import plan_budget
from fxmerge.merging.zipit import zip_clusters
from nets import build
from test_hand_written import Mixer

X = torch.randn(4, 3, 8, 8)
SPEC = [("residual", 1), ("concat", 0), ("depthwise", 1), ("attention", 0), ("se", 1), ("grouped", 0)]


def net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    m = build(8, SPEC).eval()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.3)
            mod.running_var.uniform_(0.5, 2.0)
    return m


def calib(shape=(3, 8, 8)):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(16, *shape, generator=g) for _ in range(4)]


def permuted_copies(m, n, example=X):
    pg = fxmerge.analyze(m, example[:2])
    samplers = [pg.sampler(np.random.default_rng(10 + i)) for i in range(1, n)]
    return [m] + [pg.permuted_copy(m, s) for s in samplers], pg, samplers


def rel(x, y):
    return float((x - y).norm() / y.norm())


@pytest.mark.parametrize("method,tol", [("perm", 1e-5), ("pleas", 1e-3)])
def test_permuted_copies_merge_back_at_every_budget(method, tol):
    m = net(0)
    models, _, _ = permuted_copies(m, 3)
    # aligned copies agree as the model agrees with itself (constant units correlate with nothing)
    itself = fxmerge.merge([m, m, m], calib(), method="perm", bn_stats="source").report["universe"]["agreement"]
    with torch.no_grad():
        ref = m(X)
        for budget in (1.0, 1.5, 2.0, 2.5, 3.0):
            with _budget_warnings() as caught:
                r = fxmerge.merge(models, calib(), budget=budget, method=method, bn_stats="source")
            assert rel(r.model(X), ref) < tol, budget
            measured = r.report["cost_measured"]
            assert abs(measured - budget) <= 0.01 * budget or caught, (budget, measured)
            assert r.report["n_models"] == 3 and r.report["universe"]["agreement"] == pytest.approx(itself, abs=1e-6)


class _budget_warnings:
    """Records BudgetWarnings (a tiny net's cost moves in steps over 1%)."""

    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings(record=True)
        self.caught = self._cm.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)

    def __bool__(self):
        return any(issubclass(w.category, fxmerge.BudgetWarning) for w in self.caught)


def test_universe_recovers_every_copys_permutation_cycle_consistently():
    m = net(1)
    models, pg, samplers = permuted_copies(m, 4)
    r = fxmerge.merge(models, calib(), budget=1.0, method="perm", bn_stats="source")
    perms = r.plan.permutations
    checked = 0
    for g in pg.groups:
        if g.id not in perms or g.roots[0].pinned or g.size < 2:
            continue
        p = perms[g.id]  # (N, size): each model's feature at each shared position
        assert p.shape == (4, g.size)
        for k, s in enumerate(samplers, start=1):
            # copy k holds A's feature idx[j] at its position j; the shared
            # position i holds A's feature p[0][i], which copy k keeps at
            # argsort(idx)[p[0][i]]
            expect = np.argsort(s.atom(g.roots[0]))
            assert np.array_equal(p[k], expect[p[0]])
        checked += 1
        # i -> j through the universe, composed, is i -> k
        inv = [np.argsort(q) for q in p]
        for i, j, k in [(0, 1, 2), (1, 2, 3), (3, 0, 2)]:
            ij = p[j][inv[i]]
            jk = p[k][inv[j]]
            assert np.array_equal(jk[ij], p[k][inv[i]])
    assert checked >= 3


@pytest.mark.parametrize("labels", ["shared", "disjoint"])
def test_budget_n_is_the_ensemble(labels):
    models = [net(s) for s in range(3)]
    with torch.no_grad():
        outs = [m(X) for m in models]
        ref = sum(outs) / 3 if labels == "shared" else torch.cat(outs, -1)
        for method in ("perm", "pleas", "ensemble"):
            r = fxmerge.merge(models, calib(), budget=3.0, method=method, labels=labels, bn_stats="source")
            assert rel(r.model(X), ref) < 1e-5, method
            assert abs(r.report["cost_measured"] - 3.0) < 1e-6


def test_mixer_runs_per_model_view_for_three_models():
    torch.manual_seed(0)
    m = Mixer().eval()
    x = torch.randn(4, 3, 16, 16)
    models, _, _ = permuted_copies(m, 3, example=x)
    others = [m] + [Mixer().eval() for _ in range(2)]
    with torch.no_grad():
        for budget in (1.5, 2.25):
            r = fxmerge.merge(models, calib((3, 16, 16)), budget=budget, method="perm", bn_stats="source",
                              example_inputs=x[:2])
            assert rel(r.model(x), m(x)) < 1e-5
        r = fxmerge.merge(others, calib((3, 16, 16)), budget=3.0, method="perm", example_inputs=x[:2])
        assert rel(r.model(x), sum(o(x) for o in others) / 3) < 1e-5


def test_two_models_as_a_sequence_are_the_two_model_merge():
    a, b = net(0), net(1)
    one = fxmerge.merge(a, b, calib(), budget=1.5, method="pleas")
    two = fxmerge.merge([a, b], calib(), budget=1.5, method="pleas")
    sa, sb = one.model.state_dict(), two.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_cluster_cost_is_the_two_model_cost_and_plans_agree():
    pg = fxmerge.analyze(net(0), X[:2])
    model = CostModel.from_groups(pg)
    clusters = ClusterCost(model, 2)
    rng = np.random.default_rng(0)
    for _ in range(5):
        k = np.array([rng.integers(0, s + 1) for s in model.sizes])
        hists = {u: np.array([0, s - kk, s - kk, kk], dtype=float) for u, s, kk in zip(model.uids, model.sizes, k)}
        assert clusters.cost(hists) == pytest.approx(model.cost(k), rel=1e-12)
    sims = {u: rng.uniform(0, 1, s) for u, s in zip(model.uids, model.sizes)}
    pair = {u: np.stack([np.stack([np.ones(len(v)), v]), np.stack([v, np.ones(len(v))])]) for u, v in sims.items()}
    for budget in (1.3, 1.7):
        p2 = plan_budget(model, sims, budget, score="pairs")
        pn = plan_clusters(model, pair, budget, 2)
        assert pn.achieved == pytest.approx(p2.achieved, rel=1e-9)
        for u, mask in p2.masks.items():
            labels = pn.masks[u]
            assert np.array_equal(labels[0] == labels[1], mask)


def test_ward_splits_repair_the_most_first():
    sim = np.array([[1.0, 0.9, 0.1], [0.9, 1.0, 0.2], [0.1, 0.2, 1.0]])
    gains, labels = ward_splits(sim)
    assert gains[0] >= gains[1] >= 0
    assert labels[1][0] == labels[1][1] != labels[1][2]  # the odd model leaves first
    assert len(set(labels[2].tolist())) == 3


def test_save_and_load_three_models(tmp_path):
    models = [net(s) for s in range(3)]
    r = fxmerge.merge(models, calib(), budget=2.0, method="perm")
    path = tmp_path / "m.pt"
    fxmerge.save(r, str(path))
    gm, plan, report = fxmerge.load(str(path), net(5))
    with torch.no_grad():
        assert torch.allclose(gm(X), r.model(X), atol=1e-6)
    assert plan["n_models"] == 3 and report["n_models"] == 3


def test_zipit_n_way_zips_and_cuts_for_the_budget():
    others = [net(s) for s in range(3)]
    with torch.no_grad():
        ref = torch.cat([o(X) for o in others], -1)
        full = fxmerge.merge(others, calib(), method="zipit", budget=1.0, labels="disjoint", bn_stats="source")
        assert full.report["cost_measured"] < 1.1  # the heads (each model's classes) stay apart
        assert rel(full.model(X), ref) > 1e-2  # zipped: not the ensemble
        apart = fxmerge.merge(others, calib(), method="zipit", budget=3.0, labels="disjoint", bn_stats="source")
        # cut before the first layer: every model whole, side by side
        assert rel(apart.model(X), ref) < 1e-5 and abs(apart.report["cost_measured"] - 3.0) < 1e-6


def test_zip_clusters_merge_until_one_feature_per_position():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(200, 4))
    pooled = np.concatenate([f + 0.05 * rng.normal(size=f.shape) for _ in range(3)], 1)[:, [0, 1, 2, 3, 5, 4, 7, 6, 9, 8, 11, 10]]
    corr = np.corrcoef(pooled.T)
    clusters = zip_clusters(corr, 3, alpha=1.0)  # a merged cluster keeps its members' least correlation
    assert len(clusters) == 4 and sorted(i for c in clusters for i in c) == list(range(12))
    # each cluster holds the three noisy copies of one feature
    truth = {0: 0, 1: 1, 2: 2, 3: 3, 4: 1, 5: 0, 6: 3, 7: 2, 8: 1, 9: 0, 10: 3, 11: 2}
    assert all(len({truth[i] for i in c}) == 1 for c in clusters)


def test_cca_maps_undo_a_permutation_and_invert_each_other():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6))
    perm = rng.permutation(6)
    mixed = a @ rng.normal(size=(6, 6))  # a model whose features are another basis of A's
    cov = np.cov(np.concatenate([a, a[:, perm], mixed], 1).T)
    M, U = cca_maps(cov, 3, ridge=0.0)
    d = 6
    # the permuted copy maps back onto A's features exactly
    np.testing.assert_allclose(M[:, d:2 * d] @ a[:, perm].T, a.T, atol=1e-6)
    # and so does a model whose features are any invertible mix of A's
    np.testing.assert_allclose(M[:, 2 * d:] @ mixed.T, a.T, atol=1e-6)
    for m in (1, 2):
        np.testing.assert_allclose(U[m * d:(m + 1) * d] @ M[:, m * d:(m + 1) * d], np.eye(d), atol=1e-6)


def test_cca_merge_runs_on_n_models_and_costs_1x():
    others = [net(s) for s in range(3)]
    with torch.no_grad():
        r = fxmerge.merge(others, calib(), method="cca")
        assert abs(r.report["cost_measured"] - 1.0) < 1e-6 and torch.isfinite(r.model(X)).all()
        two = fxmerge.merge(others[0], others[1], calib(), method="cca")
        assert abs(two.report["cost_measured"] - 1.0) < 1e-6


def test_weight_matching_for_three_models_is_merge_many():
    m = net(2)
    models, _, _ = permuted_copies(m, 3)
    with torch.no_grad():
        for method in ("rebasin", "perm"):
            r = fxmerge.merge(models, calib(), method=method, matching="weight", budget=1.0, bn_stats="source")
            assert rel(r.model(X), m(X)) < 1e-5


def test_vit_with_three_models_aligns_to_the_mean():
    # nodes whose value is no float tensor (an attention map not asked for,
    # sizes) pass through the universe's statistics untouched
    from fxmerge.training import demo_model

    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(demo_model("vit", 4).eval())
    x = torch.randn(32, 3, 32, 32)
    data = [x[i:i + 8] for i in range(0, 32, 8)]
    r = fxmerge.merge(models, data, budget=1.5, method="perm", labels="disjoint")
    assert r.report["universe"]["rounds"] >= 1 and abs(r.report["cost_measured"] - 1.5) < 0.015


def test_reference_universe_stops_at_model_a_order():
    models = [net(s) for s in range(3)]
    ref = fxmerge.merge(models, calib(), budget=1.0, method="perm", universe="reference")
    assert ref.report["universe"]["rounds"] == 0
    m = net(0)
    copies, _, _ = permuted_copies(m, 3)
    with torch.no_grad():
        back = fxmerge.merge(copies, calib(), budget=1.5, method="perm", universe="reference", bn_stats="source")
        assert rel(back.model(X), m(X)) < 1e-5


def test_bad_input():
    a, b, c = net(0), net(1), net(2)
    with pytest.raises(InputError, match="at least two models"):
        fxmerge.merge([a], calib())
    with pytest.raises(InputError, match="between 1 and 3"):
        fxmerge.merge([a, b, c], calib(), budget=3.5)
    with pytest.raises(InputError, match="universe must be one of mean, reference"):
        fxmerge.merge([a, b, c], calib(), universe="median")
    other = build(8, [("residual", 2)]).eval()
    with pytest.raises(InputError, match="model C"):
        fxmerge.merge([a, b, other], calib())
    before = copy.deepcopy(c.state_dict())
    fxmerge.merge([a, b, c], calib(), budget=1.2, method="perm")
    assert all(torch.equal(before[k], v) for k, v in c.state_dict().items())


def test_cli_models(tmp_path, capsys):
    import timm

    from fxmerge.cli import main

    paths = []
    for seed in range(3):
        torch.manual_seed(seed)
        p = tmp_path / f"m{seed}.pt"
        torch.save(timm.create_model("resnet18", num_classes=4).state_dict(), p)
        paths.append(str(p))
    common = ["--arch", "resnet18", "--data", "generic", "--calib", "16", "--input-size", "3,32,32",
              "--method", "perm", "--quiet"]
    out = tmp_path / "merged.pt"
    assert main(["merge", *common, "--models", *paths, "--budget", "2.2", "-o", str(out)]) == 0
    gm, plan, report = fxmerge.load(str(out))
    assert plan["n_models"] == 3 and abs(report["cost_measured"] - 2.2) < 0.022
    assert gm(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    capsys.readouterr()
    for argv, message in ((["--models", paths[0], "--budget", "1.0"], "at least two"),
                          (["--models", *paths, "--budget", "3.5"], "between 1 and 3"),
                          (["--models", *paths, "--a", paths[0], "--budget", "1.0"], "either")):
        bad = tmp_path / "bad.pt"
        assert main(["merge", *common, *argv, "-o", str(bad)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
        assert not bad.exists()
