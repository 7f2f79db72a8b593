#!/usr/bin/env bash
# The device check: the test suite with the CUDA tests enabled, then the
# performance benchmark on CUDA (resnet50 and vit_tiny at 224x224, 2048
# images). Run on a machine with a GPU, from the repository root; the
# figures go to docs/performance-cuda*.md.
set -euo pipefail
cd "$(dirname "$0")/.."
make install
nvidia-smi || true
.venv/bin/python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name())"
FXMERGE_CUDA_TESTS=1 .venv/bin/python -m pytest -n 2 tests -q
.venv/bin/python -m benchmarks.performance --arch resnet50 --calib 2048 --device cuda --adam-max-cols 0 \
    --memory-calib "" --out docs/performance-cuda.md
.venv/bin/python -m benchmarks.performance --arch vit_tiny_patch16_224 --calib 2048 --device cuda --adam-max-cols 0 \
    --memory-calib "" --out docs/performance-cuda-vit.md
