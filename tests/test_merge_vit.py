"""Merging Vision Transformers: attention heads widen and merge as units, and
LayerNorms over a widened residual stream keep per-model statistics."""
import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from timm.models.deit import VisionTransformerDistilled

import fxmerge
from test_merge import permuted_copy

X = torch.randn(2, 3, 16, 16)

VARIANTS = {
    "cls-token": dict(),
    "avg-pool, no qkv bias": dict(global_pool="avg", class_token=False, qkv_bias=False),
    "unfused attention": dict(),
    "distilled": dict(distilled=True),
}


def vit(variant: str, seed: int):
    torch.manual_seed(seed)
    kw = dict(VARIANTS[variant])
    cls = VisionTransformerDistilled if kw.pop("distilled", False) else VisionTransformer
    m = cls(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=3, mlp_ratio=2, num_classes=5, **kw)
    if variant == "unfused attention":
        for mod in m.modules():
            if hasattr(mod, "fused_attn"):
                mod.fused_attn = False
    # break the symmetry of timm's zero-initialised parts
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def calib(n=2, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 16, 16, generator=g) for _ in range(n)]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_vit_two_x_with_split_layer_norms_is_the_ensemble(variant):
    a, b = vit(variant, 0), vit(variant, 1)
    res = fxmerge.merge(a, b, calib(), budget=2.0, method="perm")
    with torch.no_grad():
        torch.testing.assert_close(res.model(X), (a(X) + b(X)) / 2, rtol=1e-4, atol=1e-5)
    assert res.report["cost_measured"] == pytest.approx(2.0, rel=1e-6)
    heads = [g for g in res.plan.groups if g["kind"] == "heads"]
    assert heads and all(g["width"] == 2 * g["size"] for g in heads)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_vit_self_merge_with_head_and_feature_permuted_copy_is_the_same_function(variant):
    a = vit(variant, 3)
    b = permuted_copy(a, 4, example=X)
    with torch.no_grad():
        assert not torch.equal(a.blocks[0].attn.qkv.weight, b.blocks[0].attn.qkv.weight)
        torch.testing.assert_close(b(X), a(X), rtol=1e-4, atol=1e-5)
    res = fxmerge.merge(a, b, calib(3), budget=1.0, method="pleas")
    with torch.no_grad():
        torch.testing.assert_close(res.model(X), a(X), rtol=1e-3, atol=1e-4)


def test_partial_vit_merge_widens_whole_heads_and_hits_the_budget():
    a, b = vit("cls-token", 5), vit("cls-token", 6)
    for policy in ("split", "merged"):
        res = fxmerge.merge(a, b, calib(), budget=1.5, method="perm", norm_policy=policy)
        r = res.report
        assert r["cost_measured"] == pytest.approx(r["cost_planned"], rel=1e-3)
        assert abs(r["cost_measured"] - 1.5) <= max(0.015, r["cost_resolution"] / 2) + 1e-9
        by_kind = {}
        for g in res.plan.groups:
            by_kind.setdefault(g["kind"], []).append(g)
        if policy == "merged":
            assert all(g["merged"] == g["size"] for g in by_kind["residual"])
        for g in by_kind["head_dim_qk"] + by_kind["head_dim_v"]:
            assert g["merged"] == g["size"]  # heads merge or split whole
        attn = res.model.get_submodule("blocks.0.attn")
        with torch.no_grad():
            assert res.model(X).shape == (2, 5)
        qkv = attn.qkv
        width = qkv.out_features if hasattr(qkv, "out_features") else None
        assert width is not None and width % (3 * 8) == 0


def test_merged_norm_policy_keeps_the_residual_stream_merged_at_two_x():
    a, b = vit("cls-token", 7), vit("cls-token", 8)
    res = fxmerge.merge(a, b, calib(), budget=2.0, method="perm", norm_policy="merged")
    lo, hi = res.report["cost_feasible"]
    assert hi < 2.0 and res.report["cost_measured"] == pytest.approx(hi, rel=1e-6)
    assert not any(type(m).__name__ == "SplitLayerNorm" for m in res.model.modules())


def test_split_layer_norm_interpolates_between_the_plain_and_the_per_model_norm():
    from fxmerge.runtime.layers import SplitLayerNorm

    x = torch.randn(4, 7, 10)
    # everything merged: the plain LayerNorm
    full = SplitLayerNorm(np.full(10, 3), 1e-5)
    torch.testing.assert_close(full(x), torch.nn.functional.layer_norm(x, (10,)))
    # nothing merged: each half on its own
    apart = SplitLayerNorm(np.array([1] * 5 + [2] * 5), 1e-5)
    want = torch.cat([torch.nn.functional.layer_norm(x[..., :5], (5,)), torch.nn.functional.layer_norm(x[..., 5:], (5,))], -1)
    torch.testing.assert_close(apart(x), want)
    # a scattered layout computes the same as the contiguous one, reordered
    role = np.array([1, 1, 3, 3, 2, 2, 3, 1, 2, 2])
    order = np.array([0, 1, 7, 2, 3, 6, 4, 5, 8, 9])  # A | merged | B
    scattered = SplitLayerNorm(role, 1e-5)
    contiguous = SplitLayerNorm(role[order], 1e-5)
    assert contiguous.contiguous and not scattered.contiguous
    torch.testing.assert_close(scattered(x)[..., order], contiguous(x[..., order]))


def tv(seed):
    from torchvision.models.vision_transformer import VisionTransformer as TVViT

    torch.manual_seed(seed)
    m = TVViT(image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=5)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def test_torchvision_vit_self_merge_with_permuted_copy_matches_heads_inside_multihead_attention():
    """The heads of a packed nn.MultiheadAttention are matched from its q/k/v
    (a probe of the opaque module), so a permuted copy merges back exactly."""
    a = tv(3)
    b = permuted_copy(a, 3, example=X)
    res = fxmerge.merge(a, b, calib(), budget=1.0, method="perm")
    with torch.no_grad():
        torch.testing.assert_close(res.model(X), a(X), rtol=1e-4, atol=1e-5)


def test_torchvision_vit_with_packed_multihead_attention_is_the_ensemble_at_two_x():
    a, b = tv(0), tv(1)
    res = fxmerge.merge(a, b, calib(), budget=2.0, method="perm")
    attn = res.model.get_submodule("encoder.layers.encoder_layer_0.self_attention")
    assert attn.num_heads == 4 and (attn.in_proj.in_features, attn.in_proj.out_features) == (32, 3 * 32)
    with torch.no_grad():
        torch.testing.assert_close(res.model(X), (a(X) + b(X)) / 2, rtol=1e-4, atol=1e-5)
    # the packed projections are computed as row blocks: measured cost = plan
    assert res.report["cost_measured"] == pytest.approx(2.0, rel=1e-6)
    r = fxmerge.merge(a, b, calib(), budget=1.5, method="perm").report
    assert r["cost_measured"] == pytest.approx(r["cost_planned"], rel=1e-3)
    res = fxmerge.merge(a, b, calib(), budget=1.0, method="pleas")
    with torch.no_grad():
        assert torch.isfinite(res.model(X)).all()


@pytest.mark.parametrize("ls_inputs", ["ensemble", "merged"])
def test_least_squares_fits_the_packed_projections_inside_multihead_attention(ls_inputs):
    """The packed q/k/v and output projections are fitted from the values
    the module computes inside (its taps), and a permuted copy still merges
    back exactly with least squares on."""
    a, b = tv(0), tv(1)
    res = fxmerge.merge(a, b, calib(3), budget=1.5, method="pleas", ls_inputs=ls_inputs)
    fitted = {k: v for k, v in res.report["least_squares"]["per_layer"].items() if "#" in k}
    assert {k.rsplit("#", 1)[1] for k in fitted} == {"in_proj", "out_proj"} and len(fitted) == 4
    for v in fitted.values():
        assert v["loss_fit"] < v["loss_init"]
    assert res.report["cost_measured"] == pytest.approx(res.report["cost_planned"], rel=1e-3)
    same = fxmerge.merge(a, permuted_copy(a, 5, example=X), calib(), budget=1.0, method="pleas", ls_inputs=ls_inputs)
    with torch.no_grad():
        torch.testing.assert_close(same.model(X), a(X), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_attention_products_enter_the_cost_model_and_measured_cost_equals_the_plan(fused):
    """256 tokens of width 12: q k^T and attn v are over half the MACs."""
    from fxmerge.merging.cost import CostModel

    def tokens_heavy(seed):
        torch.manual_seed(seed)
        m = VisionTransformer(img_size=32, patch_size=2, embed_dim=12, depth=1, num_heads=2, mlp_ratio=2, num_classes=5)
        for mod in m.modules():
            if hasattr(mod, "fused_attn"):
                mod.fused_attn = fused
        return m.eval()

    a, b = tokens_heavy(0), tokens_heavy(1)
    x = torch.randn(2, 3, 32, 32)
    cm = CostModel.from_groups(fxmerge.analyze(a, x))
    attention = sum(p.scale * np.prod([d for d, _ in p.dims]) for p in cm.products)
    assert attention > 0.5 * cm.source_cost()
    assert cm.source_cost() == pytest.approx(fxmerge.merging.cost.measure_macs(a, (x[:1],)), rel=1e-9)
    data = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    for budget in (1.3, 2.0):
        r = fxmerge.merge(a, b, data, budget=budget, method="perm").report
        assert r["cost_measured"] == pytest.approx(r["cost_planned"], rel=1e-3)
        assert abs(r["cost_measured"] - budget) <= max(0.01 * budget, r["cost_resolution"] / 2) + 1e-9


@pytest.mark.parametrize("variant", ["cls-token", "unfused attention"])
def test_zipit_aligns_heads_as_units(variant):
    """ZipIt! with heads aligned as units (as its successors do): a copy with
    heads and within-head orders permuted zips back to the same function;
    averaging heads index to index would not."""
    a = vit(variant, 3)
    b = permuted_copy(a, 4, example=X)
    res = fxmerge.merge(a, b, calib(3), budget=1.0, method="zipit", bn_stats="source")
    with torch.no_grad():
        torch.testing.assert_close(res.model(X), a(X), rtol=1e-3, atol=1e-4)


def test_zipit_partial_zipping_cuts_the_graph_and_keeps_everything_after_it_separate():
    a, b = vit("cls-token", 5), vit("cls-token", 6)
    costs = []
    for budget in (1.0, 1.3, 1.6, 2.0):
        res = fxmerge.merge(a, b, calib(), budget=budget, method="zipit")
        r = res.report
        assert r["cost_measured"] == pytest.approx(r["cost_planned"], rel=1e-4)
        assert r["cost_measured"] <= budget + 1e-6  # the deepest cut that fits
        costs.append(r["cost_measured"])
        names = {n for n, _ in res.model.named_modules()}
        separate = any(n.startswith("side_a.") for n in names) and any(n.startswith("side_b.") for n in names)
        assert separate == (r["zip_cut"] is not None) == (budget > 1.0)
    assert costs == sorted(costs) and costs[-1] == pytest.approx(2.0)
    # at 2x the cut is before the first layer: both models whole, averaged
    with torch.no_grad():
        torch.testing.assert_close(res.model(X), (a(X) + b(X)) / 2, rtol=1e-4, atol=1e-5)


def test_a_partially_zipped_model_saves_and_loads(tmp_path):
    a, b = vit("cls-token", 5), vit("cls-token", 6)
    res = fxmerge.merge(a, b, calib(), budget=1.3, method="zipit")
    assert res.report["zip_cut"] is not None
    fxmerge.save(res, str(tmp_path / "z.pt"))
    gm, _, report = fxmerge.load(str(tmp_path / "z.pt"), model=a)
    with torch.no_grad():
        torch.testing.assert_close(gm(X), res.model(X))
    assert report["zip_cut"] == res.report["zip_cut"]
