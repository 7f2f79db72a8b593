"""Calibration and evaluation data that needs no download.

``digits``: scikit-learn's handwritten digits (1797 real 8x8 scans), scaled to
32x32 and three channels, split once with a fixed seed into ``train`` (1006
images: training the sources, calibration), ``val`` (251, carved from the
training data: every tuned choice is made on it) and ``test`` (540: the
reported accuracy, seen by no choice).
``digit_task`` selects a class subset with labels renumbered from 0, which is
how the demo builds two models with different label spaces.

``generic``: procedurally generated natural-looking images (1/f "pink" noise
textures, oriented gratings, soft-edged coloured shapes, blur), the data source
of PLeaS-free merging: calibration from a distribution neither model saw.

``image_folder``: a directory of images (``DIR/class/*.png`` or flat), resized.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from fxmerge.errors import InputError

DIGITS_MEAN, DIGITS_STD = 0.3, 0.4


@dataclass
class Split:
    x: torch.Tensor  # (N, 3, H, W), normalised
    y: torch.Tensor  # (N,)

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, batch_size: int = 64, *, shuffle: bool = False, seed: int = 0, with_targets: bool = True):
        idx = torch.arange(len(self))
        if shuffle:
            idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        out = []
        for i in range(0, len(self), batch_size):
            j = idx[i:i + batch_size]
            out.append((self.x[j], self.y[j]) if with_targets else self.x[j])
        return out

    def subset(self, n: int, seed: int = 0) -> "Split":
        g = torch.Generator().manual_seed(seed)
        j = torch.randperm(len(self), generator=g)[:n]
        return Split(self.x[j], self.y[j])


SPLITS = ("train", "val", "test")
TEST_SHARE, VAL_SHARE = 0.3, 0.2  # of all digits; of the training digits


def digits(size: int = 32, *, split: str = "train", seed: int = 0) -> Split:
    """One split of the digits data set at ``size`` x ``size``, three
    channels: ``train``, ``val`` (carved from the training data) or ``test``
    (the split is fixed by ``seed``)."""
    if split not in SPLITS:
        raise InputError(f"unknown split '{split}': choose one of {', '.join(SPLITS)}")
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = ((x - DIGITS_MEAN) / DIGITS_STD).repeat(1, 3, 1, 1)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    n_train = int((1 - TEST_SHARE) * len(y))
    n_val = int(VAL_SHARE * n_train)
    idx = {"train": perm[:n_train - n_val], "val": perm[n_train - n_val:n_train], "test": perm[n_train:]}[split]
    return Split(x[idx].contiguous(), y[idx].contiguous())


def digit_task(split: Split, classes: Sequence[int]) -> Split:
    """The examples of ``classes``, labels renumbered ``0..len(classes)-1``."""
    classes = list(classes)
    mask = torch.isin(split.y, torch.tensor(classes))
    remap = torch.full((int(split.y.max()) + 1,), -1, dtype=torch.long)
    remap[torch.tensor(classes)] = torch.arange(len(classes))
    return Split(split.x[mask], remap[split.y[mask]])


def augment(x: torch.Tensor, gen: torch.Generator, shift: int = 2) -> torch.Tensor:
    """Random translations by up to ``shift`` pixels (zero padded)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (shift,) * 4, value=float(x.min()))
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None])  # (n, h)
    cols = (dx[:, None] + torch.arange(w)[None])  # (n, w)
    return padded[torch.arange(n)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


def generic(n: int, size: int = 32, *, seed: int = 0, channels: int = 3) -> torch.Tensor:
    """``n`` procedurally generated natural-looking images, per-image
    standardised (zero mean, unit variance)."""
    g = torch.Generator().manual_seed(seed)
    fy = torch.fft.fftfreq(size)[:, None]
    fx = torch.fft.rfftfreq(size)[None, :]
    radius = torch.sqrt(fx ** 2 + fy ** 2).clamp_min(1.0 / size)
    out = torch.empty(n, channels, size, size)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    for i in range(n):
        # texture: 1/f^alpha noise, correlated across channels
        alpha = 1.0 + torch.rand((), generator=g).item()
        spec = torch.randn(channels, size, size // 2 + 1, generator=g, dtype=torch.complex64) / radius ** alpha
        base = torch.fft.irfft2(spec, s=(size, size))
        mix = torch.rand(channels, channels, generator=g) * 0.5 + torch.eye(channels)
        img = torch.einsum("cd,dhw->chw", mix, base)
        img = img / (img.std() + 1e-6)
        # an oriented grating
        theta = torch.rand((), generator=g).item() * math.pi
        freq = 2 + torch.rand((), generator=g).item() * 8
        grating = torch.sin(freq * math.pi * (xx * math.cos(theta) + yy * math.sin(theta)))
        img = img + 0.5 * torch.rand(channels, 1, 1, generator=g) * grating
        # a few soft-edged coloured shapes
        for _ in range(int(torch.randint(1, 4, (), generator=g))):
            cx, cy = (torch.rand(2, generator=g) * 1.6 - 0.8).tolist()
            rx, ry = (torch.rand(2, generator=g) * 0.5 + 0.1).tolist()
            edge = torch.rand((), generator=g).item() * 0.1 + 0.02
            d = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2
            mask = torch.sigmoid((1 - d) / edge)
            colour = torch.randn(channels, 1, 1, generator=g) * 1.5
            img = img * (1 - mask) + colour * mask
        out[i] = img
    # mild blur, then standardise each image
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None, :]) / 16
    out = F.conv2d(F.pad(out, (1, 1, 1, 1), mode="reflect"), k.expand(channels, 1, 3, 3), groups=channels)
    out = (out - out.mean((1, 2, 3), keepdim=True)) / (out.std((1, 2, 3), keepdim=True) + 1e-6)
    return out


def image_files(path: str, *, limit: Optional[int] = None) -> list:
    """The image files below ``path`` (png, jpg, jpeg, bmp), sorted."""
    if not os.path.isdir(path):
        raise InputError(f"data directory '{path}' does not exist: pass 'digits', 'generic' or a folder of images")
    files = []
    for root, _, names in sorted(os.walk(path)):
        for name in sorted(names):
            if name.lower().endswith((".png", ".jpg", ".jpeg", ".bmp")):
                files.append(os.path.join(root, name))
    if limit:
        files = files[:limit]
    if not files:
        raise InputError(f"no images (png, jpg, jpeg, bmp) found under '{path}'")
    return files


def image_folder(path: str, size: int, *, limit: Optional[int] = None, files: Optional[list] = None) -> torch.Tensor:
    """Every image below ``path`` (or the given ``files``), resized to
    ``size`` and standardised with ImageNet statistics."""
    from torchvision.io import ImageReadMode, read_image

    files = image_files(path, limit=limit) if files is None else files
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    out = []
    for f in files:
        try:
            img = read_image(f, mode=ImageReadMode.RGB).float() / 255
        except Exception as e:
            raise InputError(f"cannot read image '{f}': {e}") from None
        img = F.interpolate(img[None], size=(size, size), mode="bilinear", align_corners=False)[0]
        out.append((img - mean) / std)
    return torch.stack(out)


STYLES = ("clean", "inverted", "edges", "noisy", "rotated")


def styled(split: Split, style: str, seed: int = 0) -> Split:
    """A domain-shifted copy of a split (the same digits, drawn differently):
    ``inverted`` (dark strokes on light), ``edges`` (Sobel gradient
    magnitude), ``noisy`` (Gaussian noise, fixed per image), ``rotated``
    (90 degrees)."""
    x = split.x
    if style == "clean":
        pass
    elif style == "inverted":
        x = -x
    elif style == "edges":
        k = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
        g = x[:, :1]
        gx = F.conv2d(g, k[None, None], padding=1)
        gy = F.conv2d(g, k.T[None, None], padding=1)
        mag = torch.sqrt(gx ** 2 + gy ** 2)
        mag = (mag - mag.mean()) / (mag.std() + 1e-6)
        x = mag.repeat(1, x.shape[1], 1, 1)
    elif style == "noisy":
        gen = torch.Generator().manual_seed(seed)
        x = x + 0.6 * torch.randn(x.shape, generator=gen)
    elif style == "rotated":
        x = torch.rot90(x, 1, dims=(2, 3))
    else:
        raise InputError(f"unknown style '{style}': choose one of {', '.join(STYLES)}")
    return Split(x.contiguous(), split.y)
