"""Functions timm registers as no-trace: its attention-mask helpers and the
resampling of absolute position embeddings (dynamic-size ViTs)."""
import timm
import torch

import fxmerge
from rulecheck import kinds


def test_dynamic_size_vit_resamples_position_embeddings_per_channel():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, dynamic_img_size=True).eval()
    x = torch.randn(1, 3, 32, 32)
    groups = fxmerge.analyze(model, x)
    assert not groups.pinned
    assert kinds(groups)["residual"] == 1
    residual = next(g for g in groups.groups if g.kind == "residual")
    assert ("pos_embed", 2) in residual.members
    assert fxmerge.verify(model, x, groups).ok


def test_swin_window_reverse_passes_channels_so_2x_is_the_ensemble():
    kw = dict(img_size=32, patch_size=4, window_size=4, embed_dim=24, depths=(1, 1), num_heads=(2, 4))
    torch.manual_seed(0)
    a = timm.create_model("swin_tiny_patch4_window7_224", **kw).eval()
    torch.manual_seed(1)
    b = timm.create_model("swin_tiny_patch4_window7_224", **kw).eval()
    x = torch.randn(2, 3, 32, 32)
    groups = fxmerge.analyze(a, x)
    assert not groups.pinned and fxmerge.verify(a, x, groups).ok
    data = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    res = fxmerge.merge(a, b, data, budget=2.0, method="perm", bn_stats="source")
    assert res.report["budget_reachable"]
    with torch.no_grad():
        torch.testing.assert_close(res.model(x), (a(x) + b(x)) / 2, rtol=1e-4, atol=1e-5)


def test_a_model_without_classifier_names_its_output_as_what_keeps_it_under_2x():
    kw = dict(img_size=32, patch_size=8, depth=1, num_classes=0, embed_dim=32, num_heads=2)
    torch.manual_seed(0)
    a = timm.create_model("vit_tiny_patch16_224", **kw).eval()
    torch.manual_seed(1)
    b = timm.create_model("vit_tiny_patch16_224", **kw).eval()
    data = [torch.randn(4, 3, 32, 32)]
    import pytest

    with pytest.warns(fxmerge.BudgetWarning, match="the model's output: features its own layers read"):
        res = fxmerge.merge(a, b, data, budget=2.0, method="perm", bn_stats="source")
    assert not res.report["budget_reachable"]
