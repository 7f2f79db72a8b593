"""Group structure of real timm/torchvision architectures (random init)."""
import pytest
import timm
import torch
import torchvision

import fxmerge


def _kinds(groups):
    out = {}
    for g in groups.groups:
        out[g.kind] = out.get(g.kind, 0) + 1
    return out


@pytest.mark.parametrize("name,expected", [("resnet18", 12), ("resnet50", 37)])
def test_resnet_group_counts(name, expected):
    model = timm.create_model(name).eval()
    x = torch.randn(1, 3, 64, 64)
    groups = fxmerge.analyze(model, x)
    assert len(groups) == expected
    kinds = _kinds(groups)
    # one residual stream per stage (resnet18's first stage shares the stem's width)
    assert kinds["residual"] == 4
    assert not groups.pinned
    assert fxmerge.verify(model, x, groups).ok


def _vit(fused, **kw):
    m = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=4, **kw)
    for blk in m.blocks:
        blk.attn.fused_attn = fused
    return m.eval()


def _check_vit(groups, depth, heads, head_dim, hidden):
    kinds = _kinds(groups)
    assert kinds["residual"] == 1
    assert kinds["hidden"] == depth
    assert kinds["heads"] == depth
    assert kinds["head_dim_qk"] == depth
    assert kinds["head_dim_v"] == depth
    for g in groups.by_kind("heads"):
        assert g.size == heads
    for g in groups.by_kind("head_dim_qk") + groups.by_kind("head_dim_v"):
        assert g.size == head_dim and g.blocks == heads
        assert groups.groups[g.parent].kind == "heads"
    for g in groups.by_kind("hidden"):
        assert g.size == hidden
    # q/k within-head dims are not shared with v, and the output projection
    # reads exactly the v dims
    for g in groups.by_kind("head_dim_qk"):
        assert not any(p.endswith("proj.weight") for p, _ in g.members)
    for g in groups.by_kind("head_dim_v"):
        assert any(p.endswith("proj.weight") and a == 1 for p, a in g.members)


@pytest.mark.parametrize("fused", [True, False])
def test_vit_head_structure(fused):
    model = _vit(fused)
    x = torch.randn(2, 3, 32, 32)
    groups = fxmerge.analyze(model, x)
    _check_vit(groups, depth=4, heads=3, head_dim=64, hidden=768)
    residual = groups.by_kind("residual")[0]
    names = {p for p, _ in residual.members}
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight", "head.weight"} <= names
    assert fxmerge.verify(model, x, groups).ok


def test_deit_distilled():
    model = timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, patch_size=4, depth=2).eval()
    x = torch.randn(2, 3, 32, 32)
    groups = fxmerge.analyze(model, x)
    _check_vit(groups, depth=2, heads=3, head_dim=64, hidden=768)
    assert "dist_token" in {p for p, _ in groups.by_kind("residual")[0].members}
    assert fxmerge.verify(model, x, groups).ok


def test_torchvision_vit_multihead_attention():
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=10
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    groups = fxmerge.analyze(model, x)
    _check_vit(groups, depth=2, heads=4, head_dim=16, hidden=128)
    assert fxmerge.verify(model, x, groups).ok


@pytest.mark.parametrize(
    "name,kinds",
    [
        ("densenet121", {"concat"}),
        ("resnext26ts", {"blocks", "block_inner"}),
        ("cspresnet50", {"concat", "residual"}),
        ("mobilenetv3_small_050", {"residual"}),
        ("resnetv2_50x1_bit", {"blocks"}),  # GroupNorm + StdConv through F.batch_norm on weights
    ],
)
def test_cnn_families_verify(name, kinds):
    model = timm.create_model(name).eval()
    x = torch.randn(1, 3, 64, 64)
    groups = fxmerge.analyze(model, x)
    assert kinds <= set(_kinds(groups))
    assert groups.covered_fraction() > 0.95
    assert fxmerge.verify(model, x, groups).ok


def test_a_wrapped_function_is_traced_into_and_an_op_without_a_rule_is_pinned():
    """torchvision swin's window attention, hidden with ``torch.fx.wrap``, is
    traced into: nothing is pinned and the groups are sound. A recurrent
    layer has no rule: its axes are pinned, the op kind is listed, and what
    remains is still sound."""
    model = torchvision.models.swin_t().eval()
    model.features = model.features[:2]
    model.norm = torch.nn.LayerNorm(96)
    model.head = torch.nn.Linear(96, 10)
    x = torch.randn(1, 3, 64, 64)
    groups = fxmerge.analyze(model, x)
    assert not groups.pinned and any(g.kind == "heads" for g in groups.groups)
    assert fxmerge.verify(model, x, groups).ok
    recurrent = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GRU(8, 8, batch_first=True))
    xs = torch.randn(2, 5, 6)
    groups = fxmerge.analyze(recurrent, xs)
    assert any("GRU" in p.kind for p in groups.pinned)
    assert fxmerge.verify(recurrent, xs, groups).ok


def test_json_and_networkx_exports():
    model = timm.create_model("resnet18").eval()
    groups = fxmerge.analyze(model, torch.randn(1, 3, 32, 32), model_name="resnet18")
    d = groups.to_dict()
    assert d["model"] == "resnet18" and len(d["groups"]) == 12
    first = d["groups"][0]
    assert {"id", "kind", "size", "members"} <= set(first)
    assert {"param": "conv1.weight", "axis": 0} in first["members"]
    g = groups.to_networkx()
    assert g.has_edge(("group", 0), ("param", "conv1.weight"))
