"""Properties of the merge engine, on small networks assembled from the blocks
the analysis understands."""
import copy

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import fxmerge
from fxmerge.fit import lstsq
from fxmerge.fit import solve
from fxmerge.fit.lstsq import sample_rows
from fxmerge.fit.solve import cholesky_in_place, solve_block
from fxmerge.runtime import tensors
from fxmerge.runtime.tensors import rows
from fxmerge.fit.batchnorm import reset_batch_norm
from nets import build

CNN_KINDS = ["residual", "concat", "split", "depthwise", "se", "widen"]
# GroupNorm over a concatenation cut by its groups cannot be widened block by
# block yet (the rewrite refuses it); grouped blocks are tested on their own.
X = torch.randn(2, 3, 12, 12)


def calib(n=4, batch=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 12, 12, generator=g) for _ in range(n)]


def net(spec, seed, stem=8):
    torch.manual_seed(seed)
    return build(stem, spec).eval()


def permuted_copy(model, seed, example=X):
    """A function-equal copy of ``model`` with every group permuted."""
    pg = fxmerge.analyze(model, example)
    sampler = pg.sampler(np.random.default_rng(seed))
    state = model.state_dict()
    state.update(pg.permute_state(state, sampler))
    other = copy.deepcopy(model)
    other.load_state_dict(state)
    return other


def with_bn_stats_from(model, data):
    m = copy.deepcopy(model)
    reset_batch_norm(m, data)
    return m.eval()


specs = st.lists(st.tuples(st.sampled_from(CNN_KINDS), st.integers(0, 3)), min_size=1, max_size=3)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs, seed=st.integers(0, 1000))
def test_two_x_before_least_squares_is_the_ensemble(spec, seed):
    a, b = net(spec, seed), net(spec, seed + 1)
    res = fxmerge.merge(a, b, calib(2), budget=2.0, method="perm", reset_bn=False)
    if res.report["cost_feasible"][1] < 2.0:
        # a channel segment of width 1 (a concat cut through a group) is
        # shared in the IR and stays merged: 2x is then out of reach
        assert res.report["cost_measured"] == pytest.approx(res.report["cost_feasible"][1])
        return
    with torch.no_grad():
        want = (a(X) + b(X)) / 2
        got = res.model(X)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert res.report["cost_measured"] == pytest.approx(2.0, rel=1e-6)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs, seed=st.integers(0, 1000))
# a depthwise multiplier over a concatenation: within-block orders are matched
# after the concatenation's parts
@example(spec=[("concat", 0), ("depthwise", 1)], seed=0)
def test_self_merge_with_permuted_copy_at_one_x_is_the_same_function(spec, seed):
    data = calib(3, seed=seed)
    a = with_bn_stats_from(net(spec, seed), data)
    b = permuted_copy(a, seed)
    res = fxmerge.merge(a, b, data, budget=1.0, method="pleas")
    with torch.no_grad():
        torch.testing.assert_close(res.model(X), a(X), rtol=1e-3, atol=1e-4)
    assert res.report["params_merged"] == sum(p.numel() for p in a.parameters())


def test_the_budget_is_counted_at_the_example_inputs_size():
    # the classifier after the pooling costs the same at every size, the
    # convolutions grow with the image: a budget counted on large example
    # inputs is met there (calibration stays small), and is another plan
    from fxmerge.merging.cost import measure_macs

    spec = [("widen", 8), ("residual", 1)]
    a, b = net(spec, 3, stem=4), net(spec, 11, stem=4)
    a.head = torch.nn.Linear(a.head.in_features, 1024)
    b.head = torch.nn.Linear(b.head.in_features, 1024)
    small, large = torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 32, 32)
    ratio = lambda res, x: measure_macs(res.model, x) / measure_macs(a, x)  # noqa: E731
    at_small = fxmerge.merge(a, b, calib(2), budget=1.4, method="perm", example_inputs=small)
    at_large = fxmerge.merge(a, b, calib(2), budget=1.4, method="perm", example_inputs=large)
    for res, x in ((at_small, small), (at_large, large)):
        assert res.report["cost_measured"] == pytest.approx(ratio(res, x), rel=1e-6)
        assert ratio(res, x) == pytest.approx(1.4, abs=max(0.014, res.report["cost_resolution"] / 2))
    assert ratio(at_small, large) > 1.4 + 0.1  # counted at the wrong size, the budget is missed
    with torch.no_grad():
        assert at_large.model(calib(1)[0]).shape == a(calib(1)[0]).shape


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs, seed=st.integers(0, 1000), budget=st.floats(1.05, 1.95))
def test_measured_cost_equals_the_plan_and_hits_the_budget(spec, seed, budget):
    a, b = net(spec, seed, stem=24), net(spec, seed + 7, stem=24)
    res = fxmerge.merge(a, b, calib(2), budget=budget, method="perm")
    r = res.report
    assert r["cost_measured"] == pytest.approx(r["cost_planned"], rel=1e-3)
    lo, hi = r["cost_feasible"]
    target = min(max(budget, lo), hi)
    # within 1%, or as close as the coarsest single step next to the target allows
    assert abs(r["cost_measured"] - target) <= max(0.01 * target, r["cost_resolution"] / 2) + 1e-9
    with torch.no_grad():
        assert res.model(X).shape == a(X).shape


def test_disjoint_labels_at_two_x_concatenate_both_heads():
    spec = [("residual", 1), ("widen", 0)]
    a, b = net(spec, 1), net(spec, 2)
    res = fxmerge.merge(a, b, calib(2), budget=2.0, method="ensemble", labels="disjoint")
    with torch.no_grad():
        torch.testing.assert_close(res.model(X), torch.cat([a(X), b(X)], -1), rtol=1e-4, atol=1e-5)


def test_weight_matching_recovers_a_permutation():
    spec = [("residual", 2), ("widen", 1), ("residual", 0)]
    data = calib(3)
    a = with_bn_stats_from(net(spec, 3), data)
    b = permuted_copy(a, 5)
    res = fxmerge.merge(a, b, data, method="rebasin")
    with torch.no_grad():
        torch.testing.assert_close(res.model(X), a(X), rtol=1e-3, atol=1e-4)


def test_least_squares_solution_satisfies_the_normal_equations(monkeypatch):
    g = torch.Generator().manual_seed(0)
    Xs = torch.randn(200, 12, generator=g, dtype=torch.float64)
    Ys = torch.randn(200, 5, generator=g, dtype=torch.float64)
    W0 = torch.randn(5, 12, generator=g, dtype=torch.float64)
    G, C = Xs.T @ Xs, Xs.T @ Ys
    for ridge in (0.0, 1e-3, 1.0):
        W = solve_block(G, C, W0, ridge)
        # the in-place LAPACK route of wide systems gives the same solution
        monkeypatch.setattr(solve, "IN_PLACE_MIN_COLS", 1)
        torch.testing.assert_close(solve_block(G, C, W0, ridge), W, rtol=1e-9, atol=1e-9)
        monkeypatch.undo()
        lam = max(ridge * float(torch.diagonal(G).sum()) / 12, 1e-12)
        lhs = (G + lam * torch.eye(12, dtype=torch.float64)) @ W.T
        torch.testing.assert_close(lhs, C + lam * W0.T, rtol=1e-9, atol=1e-9)
    # and it is the minimiser: any perturbation increases the objective
    W = solve_block(G, C, W0, 1e-3)
    lam = 1e-3 * float(torch.diagonal(G).sum()) / 12

    def obj(w):
        return float(((Xs @ w.T - Ys) ** 2).sum() + lam * ((w - W0) ** 2).sum())

    for _ in range(5):
        assert obj(W + 1e-3 * torch.randn(5, 12, generator=g, dtype=torch.float64)) > obj(W)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cholesky_in_place_factors_in_the_matrix_own_memory(dtype):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(300, 40, generator=g, dtype=torch.float64)
    G = (X.T @ X).to(dtype)
    A = G.clone()
    where = A.data_ptr()
    assert cholesky_in_place(A)
    U = torch.triu(A)
    assert A.data_ptr() == where
    torch.testing.assert_close(U.T @ U, G, rtol=1e-4 if dtype == torch.float32 else 1e-10, atol=1e-3)
    torch.testing.assert_close(torch.tril(A, -1), torch.tril(G, -1))  # the lower triangle is left alone
    singular = torch.zeros(4, 4, dtype=dtype)
    singular[0, 0] = 1.0
    assert not cholesky_in_place(singular)


def test_gram_accumulation_and_mirroring_give_x_transpose_x():
    # block-upper accumulation over batches plus the in-place mirror is X^T X,
    # whatever was below the diagonal, across several column blocks
    from fxmerge.runtime.tensors import GRAM_BLOCK, add_gram_upper, symmetric

    g = torch.Generator().manual_seed(0)
    d = 2 * GRAM_BLOCK + 37
    X = torch.randn(300, d, generator=g)
    acc = torch.randn(d, d, generator=g, dtype=torch.float64).tril(-1)  # junk below the diagonal
    for part in X.split(100):
        add_gram_upper(acc, part)
    full = symmetric(acc)
    assert full.data_ptr() == acc.data_ptr()
    torch.testing.assert_close(full, X.double().T @ X.double(), rtol=1e-5, atol=1e-3)
    assert torch.equal(full, full.T)


@pytest.mark.parametrize("p,n,q", [(3, 5, 7), (300, 200, 150), (1, 4096, 1100)])
def test_the_statistics_product_is_the_matrix_product(p, n, q):
    # small products go to torch.mm, large ones through oneDNN's convolution;
    # both take transposed (non-contiguous) operands
    from fxmerge.runtime.tensors import matmul

    g = torch.Generator().manual_seed(p)
    x, y = torch.randn(n, p, generator=g), torch.randn(n, q, generator=g)
    ref = x.double().T @ y.double()
    out = matmul(x.T, y)
    assert out.shape == (p, q) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(matmul(y.T, x).double(), ref.T, rtol=1e-4, atol=1e-3)


def test_layout_without_merged_rows_skips_only_the_unread_gram_block(monkeypatch):
    # a layer whose output rows are all A-only or B-only never reads the Gram
    # block of A-only against B-only columns: accumulating in the layout that
    # skips it gives the same systems on every block a row class reads and
    # the same solution as the full Gram matrix
    from fxmerge.fit import lstsq
    from fxmerge.merging.widening import ROLE_A, ROLE_B, ROLE_M, Widening, row_blocks

    rng = np.random.default_rng(0)
    role_in = rng.permutation(np.array([ROLE_A] * 5 + [ROLE_M] * 3 + [ROLE_B] * 4, dtype=np.int8))
    role_out = rng.permutation(np.array([ROLE_A] * 3 + [ROLE_B] * 4, dtype=np.int8))
    w_in, w_out = Widening(np.arange(12), role_in), Widening(np.arange(7), role_out)
    taps = 3
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(50, 1, 12 * taps, generator=g), torch.randn(50, 1, 7, generator=g)) for _ in range(3)]
    weight, bias = torch.randn(7, 12 * taps, generator=g), torch.randn(7, generator=g)

    def fit():
        sysm = lstsq.LayerSystem("fc", "fc.weight", "fc.bias", 1, w_in, w_out, w_in, w_out)
        for X, Y in batches:
            lstsq.accumulate(sysm, X, Y)
        sysm.gram = tensors.symmetric(sysm.gram)
        return sysm, solve.solve_layer(sysm, weight, bias, 1e-3)

    skipped, (w_skip, b_skip) = fit()
    assert skipped.layout is not None
    monkeypatch.setattr(lstsq, "statistics_layout", lambda *args: None)
    full, (w_full, b_full) = fit()
    assert full.layout is None
    torch.testing.assert_close(w_skip, w_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b_skip, b_full, rtol=1e-5, atol=1e-5)
    assert skipped.loss_fit == pytest.approx(full.loss_fit, rel=1e-9)
    G, C, yy = skipped.dense()
    torch.testing.assert_close(yy, full.yy)
    for cols, out_rows in row_blocks(w_out, w_in):
        read = np.concatenate([(cols[:, None] * taps + np.arange(taps)).reshape(-1), [12 * taps]])
        torch.testing.assert_close(G[0][read][:, read], full.gram[0][read][:, read], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(C[0][read][:, out_rows], full.cross[0][read][:, out_rows], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel,stride,padding,dilation,mode", [
    (3, 1, 1, 1, "zeros"), (3, 2, 1, 1, "zeros"), (7, 2, 3, 1, "zeros"), (1, 1, 0, 1, "zeros"),
    ((3, 5), (2, 1), (1, 2), (1, 2), "zeros"), (3, 1, 1, 1, "reflect"), (3, 1, "same", 1, "zeros")])
def test_sampled_conv_rows_reproduce_the_layer_and_the_full_unfold(kernel, stride, padding, dilation, mode):
    # the rows least squares fits on are the layer's own input patches: X W^T + b
    # is the convolution's output at the sampled positions, and gathering only
    # those positions gives exactly the rows of the full im2col
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 4, kernel, stride=stride, padding=padding, dilation=dilation, padding_mode=mode)
    x = torch.randn(3, 6, 13, 11)
    y = conv(x)
    n_pos = y.shape[2] * y.shape[3]
    idx = torch.randperm(n_pos)[:7]
    X = sample_rows(conv, x, idx)
    pred = X.reshape(X.shape[0], -1) @ conv.weight.reshape(4, -1).T + conv.bias
    torch.testing.assert_close(pred, rows(y.flatten(2).transpose(1, 2), idx), rtol=1e-5, atol=1e-5)
    every = sample_rows(conv, x, None)
    assert torch.equal(every.reshape(3, n_pos, 6, -1)[:, idx].reshape(X.shape), X)


def test_least_squares_does_not_increase_the_layer_losses():
    spec = [("residual", 1), ("concat", 0), ("residual", 2)]
    a, b = net(spec, 11), net(spec, 12)
    res = fxmerge.merge(a, b, calib(4), budget=1.3, method="pleas")
    layers = res.report["least_squares"]["per_layer"]
    assert layers
    for name, v in layers.items():
        assert v["loss_fit"] <= v["loss_init"] * (1 + 1e-6) + 1e-9, name


def test_same_seed_gives_bit_identical_weights_and_sources_stay_unchanged():
    spec = [("residual", 1), ("depthwise", 1), ("grouped", 0)]
    a, b = net(spec, 21), net(spec, 22)
    a.train()  # the caller's mode must survive too
    before_a = {k: v.clone() for k, v in a.state_dict().items()}
    before_b = {k: v.clone() for k, v in b.state_dict().items()}
    r1 = fxmerge.merge(a, b, calib(2), budget=1.4, method="pleas", seed=3)
    r2 = fxmerge.merge(a, b, calib(2), budget=1.4, method="pleas", seed=3)
    s1, s2 = r1.model.state_dict(), r2.model.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k
    assert a.training
    for k, v in a.state_dict().items():
        assert torch.equal(v, before_a[k]), k
    for k, v in b.state_dict().items():
        assert torch.equal(v, before_b[k]), k


def test_widened_modules_have_consistent_attributes():
    spec = [("residual", 1), ("grouped", 0), ("depthwise", 1)]
    a, b = net(spec, 31), net(spec, 32)
    res = fxmerge.merge(a, b, calib(2), budget=1.5, method="perm")
    seen = 0
    for name, m in res.model.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            assert m.weight.shape[0] == m.out_channels and m.weight.shape[1] * m.groups == m.in_channels, name
            seen += 1
        elif isinstance(m, torch.nn.BatchNorm2d):
            assert m.weight.shape[0] == m.num_features == m.running_mean.shape[0], name
        elif isinstance(m, torch.nn.GroupNorm):
            assert m.weight.shape[0] == m.num_channels and m.num_channels % m.num_groups == 0, name
        elif isinstance(m, torch.nn.Linear):
            assert tuple(m.weight.shape) == (m.out_features, m.in_features), name
    assert seen


def test_save_and_load_round_trip(tmp_path):
    spec = [("residual", 1), ("widen", 0)]
    a, b = net(spec, 41), net(spec, 42)
    res = fxmerge.merge(a, b, calib(2), budget=1.5, method="pleas", example_inputs=X)
    path = tmp_path / "m.pt"
    fxmerge.save(res, str(path))
    gm, plan, report = fxmerge.load(str(path), model=net(spec, 99))
    with torch.no_grad():
        torch.testing.assert_close(gm(X), res.model(X))
    assert plan["method"] == "pleas" and report["cost_measured"] == pytest.approx(res.report["cost_measured"])


def test_timm_resnet_merges_at_every_method():
    import timm

    torch.manual_seed(0)
    a = timm.create_model("resnet18", num_classes=4).eval()
    b = timm.create_model("resnet18", num_classes=4).eval()
    data = [torch.randn(8, 3, 32, 32) for _ in range(2)]
    x = torch.randn(2, 3, 32, 32)
    for method, budget in (("pleas", 1.2), ("avg", 1.0), ("ensemble", 2.0)):
        res = fxmerge.merge(a, b, data, budget=budget, method=method, ridge=1e-2, positions=8)
        with torch.no_grad():
            assert torch.isfinite(res.model(x)).all()
        assert res.report["cost_measured"] == pytest.approx(budget, abs=0.01 * budget)


def test_bad_inputs_raise_clear_errors():
    spec = [("residual", 1)]
    a, b = net(spec, 1), net(spec, 2)
    other = net([("residual", 2)], 3)
    with pytest.raises(fxmerge.InputError, match=r"blocks.0.a.conv.weight.*\(3, 8, 3, 3\).*\(4, 8, 3, 3\)"):
        fxmerge.merge(a, other, calib(1))
    with pytest.raises(fxmerge.InputError, match="between 1 and 2"):
        fxmerge.merge(a, b, calib(1), budget=0.5)
    with pytest.raises(fxmerge.InputError, match="empty|at least two"):
        fxmerge.merge(a, b, [])
    with pytest.raises(fxmerge.InputError, match="non-finite"):
        fxmerge.merge(a, b, [torch.full((4, 3, 12, 12), float("inf"))])
    bad = copy.deepcopy(b)
    with torch.no_grad():
        bad.head.weight[0, 0] = float("nan")
    with pytest.raises(fxmerge.InputError, match="head.weight"):
        fxmerge.merge(a, bad, calib(1))
