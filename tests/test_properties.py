"""Property: random assemblies of the building blocks always verify, i.e.
a random permutation of every group leaves the function unchanged."""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxmerge
from nets import KINDS, build

spec_strategy = st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 3)), min_size=1, max_size=5)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stem=st.sampled_from([4, 6, 8]), spec=spec_strategy, seed=st.integers(0, 2**16))
def test_random_networks_verify(stem, spec, seed):
    torch.manual_seed(seed)
    model = build(stem, spec).eval()
    x = torch.randn(2, 3, 6, 6)
    groups = fxmerge.analyze(model, x)
    report = fxmerge.verify(model, x, groups, seed=seed)
    assert report.ok, (spec, str(report))
    # a grouped convolution whose groups cut through a concatenation is the
    # one pattern the analysis pins (and says so); everything else is
    # understood, and every conv/linear weight except the fixed stem
    # input/head output has a group
    known = [p for p in groups.pinned if "groups cut through a concatenation" in p.reason]
    assert len(known) == len(groups.pinned), [(p.kind, p.reason) for p in groups.pinned]
    if not known:
        assert groups.covered_fraction() > 0.5


@settings(max_examples=10, deadline=None)
@given(spec=spec_strategy)
def test_permutation_changes_parameters(spec):
    """The verification is not vacuous: the sampled permutation really moves
    the parameters of every permutable group."""
    import numpy as np

    torch.manual_seed(0)
    model = build(8, spec).eval()
    groups = fxmerge.analyze(model, torch.randn(1, 3, 6, 6))
    state = dict(model.named_parameters())
    permuted = groups.permute_state(state, groups.sampler(np.random.default_rng(0)))
    for g in groups.groups:
        if g.size > 1 and g.kind not in ("block_inner",):
            name, _ = next((m for m in g.members if m[0] in state), (None, None))
            if name is not None and state[name].numel() > 1 and state[name].std() > 0:
                assert not torch.equal(permuted[name], state[name]), (g.kind, name)
