"""The float32 products behind the merge's statistics, timed on this machine.

Most of a merge's arithmetic is Gram matrices ``X^T X`` and cross products
``X^T Y`` of sampled layer inputs (least squares) and activations
(matching). ``fxmerge.runtime.tensors.matmul`` runs them on the CPU as 1x1
convolutions through oneDNN instead of torch's matrix product; this
benchmark measures both, on shapes of a resnet50 merge at 224x224 (batches
of 32 images, 49 or 64 sampled positions each), and times
``lstsq.add_gram_upper`` (upper block triangle added into float64 sums)
with either product. Ratios within one run; writes docs/products.md.

    python benchmarks/products.py [--threads 2] [--repeat 5]
"""
from __future__ import annotations

import argparse
import os
import platform
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

import fxmerge  # noqa: E402
from fxmerge.fit import lstsq
from fxmerge.runtime import tensors  # noqa: E402

# (rows, p, q): a Gram block row of a widened 3x3 layer4 conv (4608 columns
# per model side), a 1x1 layer's block, a matching cross product
SHAPES = [(1568, 512, 4608), (2048, 512, 1152), (2048, 2048, 2048)]
GRAMS = [(1568, 4608), (2048, 1152)]


def timed(fn, repeat: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "docs", "products.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    lines = []
    for n, p, q in SHAPES:
        a, b = torch.randn(n, p, generator=g), torch.randn(n, q, generator=g)
        flops = 2 * n * p * q
        t_mm = timed(lambda: a.T @ b, args.repeat)
        t_dnn = timed(lambda: tensors.matmul(a.T, b), args.repeat)
        lines.append(f"| `X^T Y`, X {n}x{p}, Y {n}x{q} | {flops / t_mm / 1e9:.0f} | {flops / t_dnn / 1e9:.0f} | "
                     f"{t_mm / t_dnn:.2f}x |")
    grams = []
    for n, d in GRAMS:
        X = torch.randn(n, d, generator=g)
        acc = torch.zeros(d, d, dtype=torch.float64)
        t_dnn = timed(lambda: lstsq.add_gram_upper(acc, X), args.repeat)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch notes that it has no Intel GPU support
            with torch.backends.mkldnn.flags(enabled=False):  # tensors.matmul falls back to torch's product
                t_mm = timed(lambda: lstsq.add_gram_upper(acc, X), args.repeat)
        grams.append(f"| {n} x {d} | {t_mm * 1e3:.0f} | {t_dnn * 1e3:.0f} | {t_mm / t_dnn:.2f}x |")
    cmd = f"python benchmarks/products.py --threads {args.threads} --repeat {args.repeat}"
    text = f"""# Statistics products: torch's matrix product vs oneDNN

Produced by `{cmd}` (fxmerge {fxmerge.__version__}, torch {torch.__version__}, {args.threads} CPU threads,
{cpu_name()}). Mean of {args.repeat} runs after one warm-up; ratios within this run.

`fxmerge.runtime.tensors.matmul` runs a float32 product on the CPU as a 1x1 convolution, through oneDNN
(the library behind torch's CPU convolutions), instead of torch's matrix product (MKL in the
standard builds, whose float32 kernels are slower on some CPUs). Same float32 arithmetic; sums
may round differently.

| product | torch `@` (GFLOP/s) | `tensors.matmul` (GFLOP/s) | speed-up |
|---|---|---|---|
{chr(10).join(lines)}

`lstsq.add_gram_upper` (upper block triangle of `X^T X`, blocks of {lstsq.GRAM_BLOCK} columns, added into float64
sums) with either product:

| X (rows x columns) | torch `@` (ms) | `tensors.matmul` (ms) | speed-up |
|---|---|---|---|
{chr(10).join(grams)}
"""
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
