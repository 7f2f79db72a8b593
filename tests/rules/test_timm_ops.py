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
