"""Adding a merging method is one record plus its passes: a toy method
("the average of the permuted weights, counted") registered here runs
through ``merge()`` and the command line's choices like a built-in one."""
from __future__ import annotations

import pytest
import torch

import fxmerge
import fxmerge.api  # noqa: F401  (registers the built-in passes)
from fxmerge.cli import main
from fxmerge.merging.pipeline import PASSES, MergeState, merge_pass
from fxmerge.methods import METHODS, Method, get_method, method_names, register_method, unregister_method
from fxmerge.runtime.tensors import tensor_state
from test_merge import X, calib, net, permuted_copy

SPEC = [("residual", 2), ("concat", 2)]


class Counted:
    """The toy method's own state: how many tensors the merged model has."""

    def __init__(self, n: int):
        self.n = n

    def report(self) -> dict:
        return {"toy_tensors": self.n}


def count_tensors(st: MergeState) -> None:
    st.method_state = Counted(len(tensor_state(st.merged)))


@pytest.fixture
def toy_method():
    if "toy_count" not in PASSES:
        merge_pass("toy_count", "widen")(count_tensors)
    method = register_method(Method("toy", ("analyze", "match", "align", "plan_full", "widen", "toy_count"),
                                    "the average of the permuted weights, counted", fixed_budget=1.0, bn_stats="source"))
    yield method
    unregister_method("toy")


def test_a_registered_method_runs_through_merge_like_a_built_in_one(toy_method):
    a, b = net(SPEC, 0), net(SPEC, 1)
    res = fxmerge.merge(a, b, calib(), method="toy")
    ref = fxmerge.merge(a, b, calib(), method="rebasin", matching="activation", bn_stats="source")
    assert res.report["method"] == "toy" and res.report["toy_tensors"] == len(tensor_state(res.model))
    assert res.report["cost_measured"] == pytest.approx(1.0)
    for k, v in ref.model.state_dict().items():
        torch.testing.assert_close(res.model.state_dict()[k], v, rtol=0, atol=0)
    # and a permuted copy of a model merges back into the model itself
    same = fxmerge.merge(a, permuted_copy(a, 3), calib(), method="toy")
    torch.testing.assert_close(same.model(X), a(X), rtol=1e-5, atol=1e-5)


def test_a_registered_method_is_a_command_line_choice(toy_method, tmp_path, capsys):
    from test_cli import _ckpts

    with pytest.raises(SystemExit) as exit_:
        main(["merge", "--help"])
    assert exit_.value.code == 0 and "toy: the average of the permuted weights" in " ".join(capsys.readouterr().out.split())
    a, b = _ckpts(tmp_path)
    out = tmp_path / "merged.pt"
    assert main(["merge", "--arch", "resnet18", "--a", a, "--b", b, "--data", "generic", "--calib", "16",
                 "--input-size", "3,32,32", "--method", "toy", "--quiet", "-o", str(out)]) == 0
    _, plan, report = fxmerge.load(str(out))
    assert plan["method"] == "toy" and report["toy_tensors"] > 0


def test_the_registry_refuses_a_second_record_of_a_name_and_names_the_choices():
    with pytest.raises(ValueError, match="already registered"):
        register_method(Method("pleas", (), "again"))
    with pytest.raises(fxmerge.InputError, match="choose one of pleas, perm"):
        get_method("nope")
    assert all(p in PASSES for m in METHODS.values() for p in m.passes)
