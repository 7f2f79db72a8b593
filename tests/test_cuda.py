"""The passes on CUDA: the merged model matches the CPU merge. Skipped
without a GPU (benchmarks/gpu_check.sh runs them on one)."""
import pytest
import torch

import fxmerge
from nets import build

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SPEC = [("residual", 1), ("concat", 0), ("depthwise", 1), ("attention", 0)]


def _pair():
    torch.manual_seed(0)
    a = build(8, SPEC).eval()
    torch.manual_seed(1)
    return a, build(8, SPEC).eval()


def _data():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 3, 12, 12, generator=g) for _ in range(3)]


@pytest.mark.parametrize("method,kw", [("pleas", {}), ("pleas", {"bn_stats": "sweep", "max_memory": 1 << 20}),
                                       ("perm", {}), ("zipit", {}), ("regmean", {"budget": 1.0})])
def test_a_cuda_merge_matches_the_cpu_merge(method, kw):
    a, b = _pair()
    kw = {"budget": 1.3, **kw}
    cpu = fxmerge.merge(a, b, _data(), method=method, **kw)
    gpu = fxmerge.merge(a, b, _data(), method=method, device="cuda", **kw)
    x = _data()[0]
    with torch.no_grad():
        want = cpu.model(x)
        got = gpu.model.cuda()(x.cuda()).cpu()
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))
    assert gpu.report["cost_measured"] == pytest.approx(cpu.report["cost_measured"], rel=1e-6)


def test_saved_cuda_merge_loads_on_the_cpu(tmp_path):
    a, b = _pair()
    res = fxmerge.merge(a, b, _data(), budget=1.3, device="cuda")
    fxmerge.save(res, str(tmp_path / "m.pt"), arch="")
    gm, _, _ = fxmerge.load(str(tmp_path / "m.pt"), model=a)
    x = _data()[0]
    with torch.no_grad():
        torch.testing.assert_close(gm(x), res.model(x.cuda()).cpu(), rtol=1e-4, atol=1e-5)
