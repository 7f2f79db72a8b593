"""The exported groups are lossless: for every model of the coverage run
(docs/coverage-models.json, written by benchmarks/coverage.py: the smallest
model of each traced timm family and the torchvision classifiers), the JSON
applied by the reference applier with random permutations leaves the output
unchanged. And the docs' example applies as written."""
import copy
import json
import pathlib
import re

import pytest
import torch

import fxmerge
from fxmerge.analysis.apply import apply_permutations, apply_to_model
from fxmerge.analysis.tracing import without_fast_path

ROOT = pathlib.Path(__file__).parent.parent
MODELS = json.loads((ROOT / "docs" / "coverage-models.json").read_text())


def build(entry, **extra):
    import timm
    import torchvision

    torch.manual_seed(0)
    kw = {**entry["kw"], **extra}
    if entry["source"] == "torchvision":
        model = torchvision.models.get_model(entry["model"], weights=None, **kw).eval()
    else:
        model = timm.create_model(entry["model"], pretrained=False, **kw).eval()
    with torch.no_grad():  # a zero-initialised head makes every output zero: the check would be vacuous
        for p in model.parameters():
            if p.ndim >= 2 and p.numel() > 1 and not bool(p.any()):
                p.normal_(0.0, 0.02)
    return model


def model_and_input(entry):
    """The model at the small input the coverage run merged it at (as built,
    or rebuilt with ``img_size``), else at its default input: the export
    does not depend on the resolution, and float64 at 224x224 over the zoo
    would take most of the suite's time."""
    gen = torch.Generator().manual_seed(0)
    size = entry.get("merge_size") or entry["size"]
    model = build(entry)
    x = torch.randn(1, *size, generator=gen)
    if size == entry["size"]:
        return model, x
    try:
        with torch.no_grad(), without_fast_path():
            model(x)
        return model, x
    except Exception:
        pass
    try:
        model = build(entry, img_size=size[-1])
        with torch.no_grad(), without_fast_path():
            model(x)
        return model, x
    except Exception:
        return build(entry), torch.randn(1, *entry["size"], generator=gen)


def known_shortfall(entry):
    """Models whose export the coverage run found not to apply (listed with
    the reason in docs/coverage.md): expected to fail until fixed."""
    if entry.get("applier_ok", True):
        return ()
    return (pytest.mark.xfail(strict=True, reason="docs/coverage.md lists its export as not applying"),)


def first(y):
    return y[0] if isinstance(y, (tuple, list)) else y


@pytest.mark.parametrize("entry", [pytest.param(e, marks=known_shortfall(e)) for e in MODELS],
                         ids=lambda e: f"{e['source']}-{e['model']}")
def test_exported_groups_applied_without_fxmerge_keep_the_function(entry):
    model, x = model_and_input(entry)
    groups = fxmerge.analyze(model, x)
    exported = json.loads(groups.to_json())
    assert exported["schema"].startswith("fxmerge-groups/2")
    base = model.double()
    # the state dict and the non-persistent buffers (members marked "persistent": false)
    permuted = apply_to_model(copy.deepcopy(base), exported, seed=7)
    changed = sum(not torch.equal(a, b) for a, b in zip(base.state_dict().values(), permuted.state_dict().values()))
    assert changed > 0 or not exported["groups"]
    with torch.no_grad(), without_fast_path():
        y0, y1 = first(base(x.double())), first(permuted(x.double()))
    # the coverage run's criterion: max change below 1e-6 of the output's scale (float64)
    torch.testing.assert_close(y1, y0, rtol=0, atol=1e-6 * float(y0.abs().max()))


def test_the_coverage_run_lists_the_torchvision_models_and_most_timm_families():
    sources = [e["source"] for e in MODELS]
    assert sources.count("torchvision") == 8
    assert sources.count("timm") >= 80


def test_the_documented_example_applies_as_written():
    """docs/cli.md's applier example, run verbatim."""
    text = (ROOT / "docs" / "cli.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    example = [b for b in blocks if "apply_permutations" in b]
    assert example, "docs/cli.md has no applier example"
    scope: dict = {}
    exec(compile(example[0], "docs/cli.md", "exec"), scope)  # it asserts the function is unchanged
    assert scope["changed"]
    # the JSON shown beside it is what the export says
    exported = {g["id"]: g for g in json.loads(scope["exported"])["groups"]}
    shown = [json.loads(b) for b in re.findall(r"```json\n(.*?)```", text, flags=re.S)]
    assert shown
    for g in shown:
        assert exported[g["id"]] == g


class SharedEncoding(torch.nn.Module):
    """One depthwise position encoding shared by two blocks (CoaT's): the
    state dict names its tensors once per place."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.pos = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.blocks = torch.nn.ModuleList([torch.nn.ModuleDict({"pos": self.pos, "conv": torch.nn.Conv2d(8, 8, 1)})
                                           for _ in range(2)])
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        for blk in self.blocks:
            x = x + blk["conv"](torch.relu(blk["pos"](x)))
        return self.head(x.mean((2, 3)))


def test_a_module_shared_by_two_places_is_permuted_under_every_name():
    torch.manual_seed(0)
    model = SharedEncoding().eval().double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    groups = fxmerge.analyze(model, x)
    state = model.state_dict()
    assert {"pos.weight", "blocks.0.pos.weight", "blocks.1.pos.weight"} <= set(state)
    exported = json.loads(groups.to_json())
    named = {m["param"] for g in exported["groups"] for m in g["members"]}
    assert {"pos.weight", "blocks.0.pos.weight", "blocks.1.pos.weight"} <= named
    permuted = copy.deepcopy(model)
    permuted.load_state_dict(apply_permutations(state, exported, seed=3))
    assert not torch.equal(permuted.pos.weight, model.pos.weight)
    with torch.no_grad():
        torch.testing.assert_close(permuted(x), model(x), rtol=1e-9, atol=1e-12)
    # fxmerge's own permutation of a state dict reaches every name too
    import numpy as np
    again = copy.deepcopy(model)
    state2 = dict(state)
    state2.update(groups.permute_state(state, groups.sampler(np.random.default_rng(1))))
    again.load_state_dict(state2)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=1e-9, atol=1e-12)


class BufferScaled(torch.nn.Module):
    """A per-channel scale kept as a non-persistent buffer (rotary bands are)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 6), torch.nn.Linear(6, 3)
        self.register_buffer("scale", torch.rand(6) + 0.5, persistent=False)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)) * self.scale)


def test_a_non_persistent_buffer_is_marked_and_applies_with_the_buffers():
    torch.manual_seed(0)
    model = BufferScaled().eval().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    exported = json.loads(fxmerge.analyze(model, x).to_json())
    marked = [m for g in exported["groups"] for m in g["members"] if m["param"] == "scale"]
    assert marked and all(m["persistent"] is False for m in marked)
    assert "scale" not in model.state_dict()
    permuted = apply_to_model(copy.deepcopy(model), exported, seed=2)
    assert not torch.equal(permuted.scale, model.scale)
    with torch.no_grad():
        torch.testing.assert_close(permuted(x), model(x), rtol=1e-9, atol=1e-12)
