"""Run by tests/test_distributed.py in each of several processes (ranks):
merge two small networks with every data-driven method (and three with
PLeaS, ZipIt! and CCA Merge) and save rank 0's
merged weights and every rank's report (``torch.distributed`` from the
environment, or a single process without it)."""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nets import build  # noqa: E402

import fxmerge  # noqa: E402
from fxmerge.runtime import distributed  # noqa: E402

torch.set_num_threads(1)
out_dir = sys.argv[1]
distributed.init_from_env("cpu")
spec = [("residual", 1), ("concat", 0), ("residual", 2)]
torch.manual_seed(0)
a = build(8, spec).eval()
torch.manual_seed(1)
b = build(8, spec).eval()
torch.manual_seed(2)
c = build(8, spec).eval()
g = torch.Generator().manual_seed(5)
data = [torch.randn(8, 3, 12, 12, generator=g) for _ in range(6)]  # every rank passes all; merge shards them
weights, reports = {}, {}
runs = [(method, [a, b], budget, method) for method, budget in (("pleas", 1.3), ("perm", 1.3), ("zipit", 1.3),
                                                                 ("regmean", 1.0))]
runs += [(f"{method}-3", [a, b, c], budget, method) for method, budget in (("pleas", 1.8), ("zipit", 1.5), ("cca", 1.0))]
for label, models, budget, method in runs:
    res = fxmerge.merge(models, data, budget=budget, method=method, labels="disjoint")
    weights[label] = {k: v.clone() for k, v in res.model.state_dict().items()}
    reports[label] = {k: res.report[k] for k in ("world_size", "images_per_rank", "calibration_inputs")}
rank, world = distributed.rank(), distributed.world_size()
if rank == 0:
    torch.save(weights, os.path.join(out_dir, f"weights-{world}.pt"))
with open(os.path.join(out_dir, f"report-{world}-{rank}.json"), "w") as f:
    json.dump(reports, f)
distributed.shutdown()
