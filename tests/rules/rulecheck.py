"""What every rule family's tests check on a small module built around its
ops: the analysis finds the expected groups and pins nothing it should not;
a random permutation of every group leaves the function unchanged; the
exported groups, applied by the reference applier, leave it unchanged too;
and widening is sound (at 2x the merged model is the ensemble, or the budget
is reported out of reach; a model merged with a randomly permuted copy of
itself keeps its function at every budget, and costs the budget within 1% or
says why)."""
import warnings

import numpy as np
import torch

import fxmerge
from fxmerge.analysis.apply import apply_permutations
from fxmerge.analysis.tracing import without_fast_path


def groups_of(model, x):
    model = model.eval()
    groups = fxmerge.analyze(model, x)
    return groups


def kinds(groups) -> dict:
    out = {}
    for g in groups.groups:
        out[g.kind] = out.get(g.kind, 0) + 1
    return out


def check(model_fn, x, *, min_groups: int = 1, pinned=(), exact_two_x: bool = True):
    """The checks above on ``model_fn(seed)``; returns the groups."""
    torch.manual_seed(0)
    a = model_fn().eval()
    groups = groups_of(a, x)
    assert len(groups) >= min_groups, groups.table()
    found = {p.kind for p in groups.pinned} | set(groups.rule_pins)
    assert found == set(pinned), (found, pinned)
    assert fxmerge.verify(a, x, groups).ok
    # the exported JSON, applied without fxmerge, keeps the function
    state = {k: v.double() if v.is_floating_point() else v for k, v in a.state_dict().items()}
    permuted = apply_permutations(state, groups.to_json(), seed=3)
    b = type(a)() if _rebuildable(a) else None
    if b is not None:
        b = b.double().eval()
        b.load_state_dict(permuted)
        ad = a.double()
        xd = x.double() if torch.is_tensor(x) else x
        with torch.no_grad(), without_fast_path():
            torch.testing.assert_close(b(xd), ad(xd), rtol=1e-6, atol=1e-8)
        a = a.float()
    # widening
    torch.manual_seed(1)
    other = model_fn().eval()
    data = [torch.randn(8, *x.shape[1:], generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = fxmerge.merge(a, other, data, budget=2.0, method="perm", bn_stats="source")
    with torch.no_grad(), without_fast_path():
        if res.report["budget_reachable"]:
            torch.testing.assert_close(res.model(x), (a(x) + other(x)) / 2, rtol=1e-4, atol=1e-5)
        else:
            assert not exact_two_x, res.report["warnings"]
            assert any(issubclass(w.category, fxmerge.BudgetWarning) for w in caught)
    twin = permuted_copy(a, groups)
    for budget in BUDGETS:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            merged = fxmerge.merge(a, twin, data, budget=budget, method="perm", bn_stats="source")
        with torch.no_grad(), without_fast_path():
            torch.testing.assert_close(merged.model(x), a(x), rtol=1e-4, atol=1e-5)
        measured = merged.report["cost_measured"]
        assert abs(measured - budget) <= 0.01 * budget or any(
            issubclass(w.category, fxmerge.BudgetWarning) for w in caught), (budget, measured)
    return groups


BUDGETS = (1.0, 1.25, 1.5, 1.75, 2.0)


def permuted_copy(model, groups, seed: int = 5):
    """``model`` with every group randomly permuted: the same function."""
    return groups.permuted_copy(model, groups.sampler(np.random.default_rng(seed)))


def _rebuildable(model) -> bool:
    try:
        type(model)()
        return True
    except TypeError:
        return False
