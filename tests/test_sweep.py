"""The fitting sweep: one walk over the graph with a frontier.

Properties: the frontier gives the weights of the wave-by-wave recomputation
(the same systems); spilling the frontier to disk changes nothing (bitwise);
its temporary files are gone after success, error and interrupt; BatchNorm
statistics re-estimated in the sweep are the statistics of what each
BatchNorm sees in the final merged model.
"""
import glob
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxmerge
from fxmerge.fit.frontier import FrontierStore
from fxmerge.runtime.memory import parse_memory
from test_merge import CNN_KINDS, X, calib, net

specs = st.lists(st.tuples(st.sampled_from(CNN_KINDS + ["layernorm", "attention", "mha"]), st.integers(0, 3)),
                 min_size=1, max_size=3)


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a, b, **tol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k, **tol)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs, seed=st.integers(0, 1000), budget=st.sampled_from([1.0, 1.3]),
       bn_stats=st.sampled_from(["reset", "sweep"]))
def test_the_frontier_gives_the_weights_of_the_wave_by_wave_recomputation(spec, seed, budget, bn_stats):
    a, b = net(spec, seed), net(spec, seed + 1)
    kw = dict(budget=budget, method="pleas", bn_stats=bn_stats)
    one = fxmerge.merge(a, b, calib(3), schedule="frontier", **kw)
    many = fxmerge.merge(a, b, calib(3), schedule="recompute", **kw)
    assert one.report["sweep"]["waves"] == many.report["sweep"]["waves"]
    assert_same_weights(weights(one.model), weights(many.model), rtol=1e-5, atol=1e-6)


def test_a_spilled_frontier_gives_bitwise_the_same_weights_and_leaves_no_files(tmp_path):
    spec = [("residual", 1), ("concat", 0), ("residual", 2)]
    a, b = net(spec, 3), net(spec, 4)
    ram = fxmerge.merge(a, b, calib(3), budget=1.2, bn_stats="sweep")
    # room for the statistics only: every frontier value goes to disk
    cap = ram.report["sweep"]["statistics_peak_bytes"] + 1
    spill = fxmerge.merge(a, b, calib(3), budget=1.2, bn_stats="sweep", max_memory=cap, spill_dir=str(tmp_path))
    assert spill.report["sweep"]["frontier_spilled_bytes"] > 0 and ram.report["sweep"]["frontier_spilled_bytes"] == 0
    wa, wb = weights(ram.model), weights(spill.model)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), RuntimeError("disk gone")])
def test_the_spill_directory_is_removed_on_error_and_interrupt(tmp_path, exc):
    spec = [("residual", 1), ("residual", 2)]
    a, b = net(spec, 3), net(spec, 4)
    batches = calib(3)
    cap = fxmerge.merge(a, b, batches, budget=1.2).report["sweep"]["statistics_peak_bytes"] + 1
    written = []

    def on_least_squares(system, weight, bias):
        # called between waves: spill files of the frontier exist now
        written.extend(glob.glob(str(tmp_path / "*" / "*.bin")))
        if len(written) and system.node.startswith("blocks_1"):
            raise exc

    with pytest.raises(type(exc)):
        fxmerge.merge(a, b, batches, budget=1.2, max_memory=cap, spill_dir=str(tmp_path),
                      on_least_squares=on_least_squares)
    assert written and os.listdir(tmp_path) == []
    store = FrontierStore(0, spill_dir=str(tmp_path))
    store.put((0, "x", 0), torch.ones(4))
    assert glob.glob(str(tmp_path / "*" / "*.bin"))
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        store.close()
    assert os.listdir(tmp_path) == []


def test_reduced_precision_frontier_stays_close():
    spec = [("residual", 1), ("se", 0)]
    a, b = net(spec, 5), net(spec, 6)
    full = fxmerge.merge(a, b, calib(3), budget=1.2, bn_stats="sweep")
    half = fxmerge.merge(a, b, calib(3), budget=1.2, bn_stats="sweep", frontier_dtype="bfloat16")
    with torch.no_grad():
        y, z = full.model(X), half.model(X)
    assert (y - z).abs().max() <= 0.05 * y.abs().max()


def _bn_inputs(model, data):
    seen = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            hooks.append(m.register_forward_pre_hook(lambda mod, inp, name=name: seen.setdefault(name, []).append(
                inp[0].detach().transpose(0, 1).reshape(inp[0].shape[1], -1))))
    with torch.no_grad():
        for x in data:
            model(x)
    for h in hooks:
        h.remove()
    return {k: torch.cat(v, 1).double() for k, v in seen.items()}


@pytest.mark.parametrize("method", ["pleas", "perm"])
def test_batch_norm_statistics_from_the_sweep_are_what_each_batch_norm_sees(method):
    spec = [("residual", 1), ("concat", 0), ("depthwise", 1)]
    a, b = net(spec, 7), net(spec, 8)
    data = calib(3)
    res = fxmerge.merge(a, b, data, budget=1.2, method=method, bn_stats="sweep")
    model = res.model.eval()
    inputs = _bn_inputs(model, data)
    assert inputs
    for name, x in inputs.items():
        bn = model.get_submodule(name)
        torch.testing.assert_close(bn.running_mean.double(), x.mean(1), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bn.running_var.double(), x.var(1), rtol=1e-4, atol=1e-5)


def test_source_statistics_are_kept_throughout():
    spec = [("residual", 1)]
    a = net(spec, 9)
    res = fxmerge.merge(a, a, calib(2), budget=1.0, bn_stats="source")
    for name, m in res.model.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            src = a.get_submodule(name)
            torch.testing.assert_close(m.running_var, src.running_var)


def test_max_memory_parsing():
    assert parse_memory("2G") == 2 << 30 and parse_memory("512M") == 512 << 20 and parse_memory(1000) == 1000
    assert parse_memory("1.5GB") == int(1.5 * (1 << 30)) and parse_memory(None) is None
    for bad in ("lots", "-1G", 0):
        with pytest.raises(ValueError):
            parse_memory(bad)
    with pytest.raises(fxmerge.InputError, match="max_memory"):
        fxmerge.merge(net([("residual", 1)], 0), net([("residual", 1)], 1), calib(2), max_memory="lots")


def _planned_frontier(schedule) -> list:
    """Bytes the frontier holds after each wave (traced batch size)."""
    from fxmerge.fit.frontier import value_bytes
    from fxmerge.fit.sweep import NEVER

    out = []
    for w in schedule.waves:
        total = 0
        for s, step in schedule.step.items():
            nodes = schedule.graph_nodes[s]
            total += sum(value_bytes(nodes[n]) or 0 for n, t in step.items()
                         if t <= w < schedule.last[s].get(n, -1) and t < NEVER)
        out.append(total)
    return out


@pytest.mark.parametrize("spec", [[("residual", 1), ("residual", 2)], [("concat", 0), ("residual", 0), ("se", 1)]])
def test_pulling_source_nodes_forward_never_grows_the_frontier(monkeypatch, spec):
    from fxmerge.fit import sweep as S

    seen = []
    original = S.Sweep.run

    def run(self, batches):
        seen.append(self)
        return original(self, batches)

    monkeypatch.setattr(S.Sweep, "run", run)
    a, b = net(spec, 1), net(spec, 2)
    fxmerge.merge(a, b, calib(2), budget=1.2, bn_stats="sweep")
    sweep = seen[-1]
    graphs = {s: sweep.models[s].graph for s in sweep.slots}
    pulled, late = _planned_frontier(sweep.schedule), _planned_frontier(S.Schedule(graphs, sweep.points,
                                                                                     pull_forward=False))
    assert all(p <= q for p, q in zip(pulled, late))
    if spec[0][0] == "residual":  # the block's sum replaces its branch output and shortcut
        assert sum(pulled) < sum(late)


def test_the_store_spills_the_value_read_last():
    reads = {"near": 1, "far": 5, "new": 2}
    store = FrontierStore(2 * 16, next_read=lambda key: reads[key[1]])
    store.put((0, "far", 0), torch.ones(4))
    store.put((0, "near", 0), torch.ones(4))
    store.put((0, "new", 0), torch.ones(4))  # no room: "far" is read after it, so "far" goes to disk
    try:
        assert store.in_memory == {(0, "near", 0), (0, "new", 0)}
        assert store.spilled == 16 and store.ram == 32
        assert torch.equal(store.get((0, "far", 0)), torch.ones(4))
        reads["newer"] = 9  # read after everything kept: it spills itself
        store.put((0, "newer", 0), torch.zeros(4))
        assert (0, "newer", 0) not in store.in_memory and store.spilled == 32
    finally:
        store.close()


def test_the_merged_model_runs_its_widened_layers_as_row_blocks_and_follows_refits():
    from fxmerge.runtime.layers import PartialConv
    from fxmerge.fit.sweep import RowBlockInterpreter

    torch.manual_seed(0)
    gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Conv2d(4, 6, 3, padding=1)))
    conv = gm.get_submodule("0")
    in_index, out_index = [np.arange(0, 2), np.arange(2, 4)], [np.arange(0, 3), np.arange(3, 6)]
    with torch.no_grad():  # the structural zeros of a fully widened layer
        conv.weight[:3, 2:] = 0
        conv.weight[3:, :2] = 0
    interp = RowBlockInterpreter(gm, {"0": (PartialConv, in_index, out_index)})
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(interp.run(x), gm(x))
    assert isinstance(interp._built["0"][2], PartialConv)
    new = torch.randn_like(conv.weight)  # a fit writes a new weight
    new[:3, 2:] = 0
    new[3:, :2] = 0
    conv.weight = torch.nn.Parameter(new)
    torch.testing.assert_close(interp.run(x), gm(x))
    with torch.no_grad():
        conv.weight.mul_(2)  # or changes it in place
    torch.testing.assert_close(interp.run(x), gm(x))


def test_freed_memory_goes_back_once_the_frontier_has_shrunk(monkeypatch):
    import fxmerge.fit.sweep as sweep

    spec = [("residual", 1), ("concat", 0), ("residual", 2)]
    a, b = net(spec, 3), net(spec, 4)
    calls = []
    monkeypatch.setattr(sweep, "release_freed_memory", lambda: calls.append(1) or True)
    res = fxmerge.merge(a, b, calib(3), budget=1.2)
    frontier = res.report["sweep"]["frontier_peak_memory_bytes"]
    assert frontier < sweep.RELEASE_BYTES and calls == []  # a small frontier never releases
    monkeypatch.setattr(sweep, "RELEASE_BYTES", 1)
    again = fxmerge.merge(a, b, calib(3), budget=1.2)
    assert 0 < len(calls) < again.report["sweep"]["waves"]  # not every wave: only after it shrank by a quarter
    assert_same_weights(weights(res.model), weights(again.model), rtol=0, atol=0)
