"""The small models, training and evaluation that the demo, the tests and
the benchmarks share: a half-width ResNet-18, a small timm ViT and the same
ViT written with ``nn.TransformerEncoder``, trained on the digits that
scikit-learn ships (``fxmerge.runtime.data``), and their joint and per-task
accuracy. Trained demo pairs are cached under ``.cache/fxmerge-demo``.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxmerge.constants import DEMO_ARCHS
from fxmerge.runtime.data import Split, augment, digit_task, digits, generic

TASK_A, TASK_B = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
# ResNets: SGD with Nesterov momentum. ViTs learn slowly from 600 images: AdamW,
# more epochs, and 8x8 patches (the digits have 8x8 pixels of information).
TRAIN = {
    "resnet": {"epochs": 20, "lr": 0.05, "batch": 64, "weight_decay": 5e-4},
    "vit": {"epochs": 60, "lr": 1e-3, "batch": 64, "weight_decay": 0.05},
    "torch-vit": {"epochs": 60, "lr": 1e-3, "batch": 64, "weight_decay": 0.05},
}
assert tuple(TRAIN) == DEMO_ARCHS


class TorchViT(nn.Module):
    """A ViT written the common way with ``torch.nn`` only:
    ``nn.TransformerEncoder`` over pre-norm ``nn.TransformerEncoderLayer``s
    (batch first, GELU), a convolutional patch embedding, a class token and
    learned position embeddings."""

    def __init__(self, num_classes: int = 5, img_size: int = 32, patch: int = 8, dim: int = 192, depth: int = 6,
                 heads: int = 3, mlp: int = 768):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (img_size // patch) ** 2 + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, mlp, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, norm=nn.LayerNorm(dim), enable_nested_tensor=False)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        t = self.patch_embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1) + self.pos_embed
        return self.head(self.encoder(t)[:, 0])


def demo_model(arch: str = "resnet", num_classes: int = 5) -> nn.Module:
    """The demo architectures: a ResNet-18 layout at half width, a small timm
    ViT (depth 6, width 192, 3 heads, patch 8) for 32x32 inputs, and the same
    ViT written with ``nn.TransformerEncoder`` (``torch-vit``)."""
    if arch == "resnet":
        from timm.models.resnet import BasicBlock, ResNet

        return ResNet(BasicBlock, (2, 2, 2, 2), num_classes=num_classes, channels=(32, 64, 128, 256), stem_width=32)
    if arch == "vit":
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(img_size=32, patch_size=8, embed_dim=192, depth=6, num_heads=3, num_classes=num_classes)
    if arch == "torch-vit":
        return TorchViT(num_classes)
    raise ValueError(f"unknown demo architecture '{arch}': choose one of {', '.join(DEMO_ARCHS)}")


def train(model: nn.Module, split: Split, *, seed: int, epochs: int, lr: float, batch: int, weight_decay: float,
          device="cpu", log: Optional[Callable] = None) -> nn.Module:
    torch.manual_seed(seed)
    model.to(device).train()
    vit = not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    if vit:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    steps = epochs * ((len(split) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=opt.param_groups[0]["lr"], total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        total = 0.0
        for x, y in split.batches(batch, shuffle=True, seed=seed * 1000 + epoch):
            x = augment(x, gen).to(device)
            loss = F.cross_entropy(model(x), y.to(device), label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(y)
        if log:
            log(f"  epoch {epoch + 1}/{epochs}: loss {total / len(split):.3f}")
    return model.eval()


def cached_pair(arch: str = "resnet", *, cache_dir: str = ".cache/fxmerge-demo", device="cpu", log=print):
    """Models A (digits 0-4, seed 0) and B (digits 5-9, seed 1), trained once."""
    cfg = {"arch": arch, "train": TRAIN[arch], "tasks": [TASK_A, TASK_B], "version": 2, "split": "train 1006"}
    key = hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]
    os.makedirs(cache_dir, exist_ok=True)
    train_split = digits(split="train")
    models = []
    for name, classes, seed in (("a", TASK_A, 0), ("b", TASK_B, 1)):
        path = os.path.join(cache_dir, f"{arch}-{name}-{key}.pt")
        model = demo_model(arch, len(classes))
        if os.path.exists(path):
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        else:
            if log:
                log(f"training model {name.upper()} ({arch}, digits {classes[0]}-{classes[-1]}, seed {seed}) ...")
            train(model, digit_task(train_split, classes), seed=seed, device=device, **TRAIN[arch])
            model.cpu()
            tmp = path + ".tmp"
            torch.save(model.state_dict(), tmp)
            os.replace(tmp, path)
        models.append(model.eval())
    return models[0], models[1]


@torch.no_grad()
def evaluate(model: nn.Module, test: Split, *, device="cpu", which: Optional[str] = None) -> dict:
    """Joint and per-task accuracy (percent). ``which='a'``/``'b'``: a source
    model with only its own 5 logits (joint: its argmax mapped to its classes)."""
    model = model.to(device).eval()
    logits = torch.cat([model(x.to(device)).cpu() for x, _ in test.batches(256)])
    y = test.y
    in_a = torch.isin(y, torch.tensor(TASK_A))
    if which is None:
        joint = (logits.argmax(1) == y).float().mean()
        ta = (logits[in_a, :5].argmax(1) == y[in_a]).float().mean()
        tb = (logits[~in_a, 5:].argmax(1) == y[~in_a] - 5).float().mean()
        return {"joint": 100 * float(joint), "task_a": 100 * float(ta), "task_b": 100 * float(tb)}
    offset = 0 if which == "a" else 5
    pred = logits.argmax(1) + offset
    own = in_a if which == "a" else ~in_a
    out = {"joint": 100 * float((pred == y).float().mean()), "task_a": float("nan"), "task_b": float("nan")}
    out["task_" + which] = 100 * float((pred[own] == y[own]).float().mean())
    return out


def calibration(source: str = "digits", n: int = 512, seed: int = 0) -> list:
    """Calibration batches: task data (both tasks' training images) or the
    generic source (PLeaS-free)."""
    if source == "digits":
        return digits(split="train").subset(n, seed=seed).batches(64, with_targets=False)
    if source == "generic":
        x = generic(n, 32, seed=seed)
        return [x[i:i + 64] for i in range(0, n, 64)]
    raise ValueError(f"unknown calibration source '{source}'")
