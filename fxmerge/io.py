"""Saving and loading merged models without pickling code.

A merged model is fully described by its architecture (a name fxmerge can
build, or a template module the caller passes), the example input shape, the
label mode, the number of source models and the plan's merge masks (or
partitions, for more than two models) per group: re-running the analysis and
the widening rewrite on the architecture rebuilds the same GraphModule, into
which the saved weights load. The file is a ``torch.save`` of tensors, strings
and numbers only, so ``torch.load(weights_only=True)`` reads it.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from fxmerge.errors import InputError

FORMAT = "fxmerge-merged/1"


def save(result, path: str, *, arch: Optional[str] = None) -> None:
    """Write ``result`` (a ``MergeResult``) to ``path`` atomically."""
    arch = arch or result.report.get("arch")
    pg = result.groups
    example = [n.meta["fxm_value"].shape for n in pg.gm.graph.nodes if n.op == "placeholder" and hasattr(n.meta.get("fxm_value"), "shape")]
    payload = {
        "format": FORMAT,
        "arch": arch or "",
        "source_num_classes": int(result.report.get("source_num_classes", 0)),
        "input_shape": list(example[0]),
        "labels": result.plan.labels,
        "n_models": int(result.plan.n_models),
        "masks": {str(k): torch.as_tensor(v.astype(np.int8)) for k, v in result.plan.masks.items()},
        "plan": json.dumps(result.plan.to_dict()),
        "report": json.dumps(result.report, default=float),
        "state_dict": {k: v.detach().cpu() for k, v in result.model.state_dict().items()},
    }
    directory = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(directory):
        raise InputError(f"cannot write '{path}': directory '{directory}' does not exist")
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".fxmerge-", suffix=".pt")
    except OSError as e:
        raise InputError(f"cannot write '{path}': {e.strerror}") from None
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load(path: str, model: Optional[nn.Module] = None, *, device="cpu"):
    """Rebuild a merged model saved by ``save``. ``model`` is a source-model
    instance (any weights) when the architecture has no fxmerge-buildable name.
    Returns ``(GraphModule, plan dict, report dict)``."""
    from fxmerge.runtime import models
    from fxmerge.analysis.channels import analyze
    from fxmerge.merging.rewrite import WidenGraph, split_contractions
    from fxmerge.merging.widening import LayoutWidener

    if not os.path.isfile(path):
        raise InputError(f"'{path}' does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(f"cannot read '{path}': {type(e).__name__}: {str(e).splitlines()[0]}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InputError(f"'{path}' is not a merged model saved by fxmerge")
    if model is None:
        if not payload["arch"]:
            raise InputError(f"'{path}' records no architecture name: pass a source model instance as model=")
        kw = {"num_classes": payload["source_num_classes"]} if payload["source_num_classes"] else {}
        model = models.create(payload["arch"], **kw)
    model = model.eval()
    x = torch.zeros(*payload["input_shape"])
    pg = analyze(model, (x,), per_model_output=payload["labels"] == "disjoint", fold_weights=True)
    masks = {}
    n_models = int(payload.get("n_models", 2))
    for gid, m in payload["masks"].items():
        g = pg.groups[int(gid)]
        masks[g.roots[0].uid] = m.numpy().astype(bool) if m.ndim == 1 else m.numpy().astype(np.int64)
    widener = LayoutWidener(masks, n_models)
    state = pg.gm.state_dict()
    gm = WidenGraph(pg, widener).run([state] * n_models)
    split_contractions(gm, pg, widener)
    report = json.loads(payload["report"])
    cut = report.get("zip_cut_position")
    if cut is not None and cut < len(pg.gm.graph.nodes):
        # ZipIt!'s partial zipping: every model after the cut; their weights
        # and the unzip indices come with the state dict
        from fxmerge.analysis.permute import PermutationSampler
        from fxmerge.merging.zip_cut import emit_partial_zip

        identity = PermutationSampler(np.random.default_rng(0), set())
        gm = emit_partial_zip(gm, [pg.gm] * n_models, pg, cut, {}, [identity] * n_models, payload["labels"])
    try:
        gm.load_state_dict(payload["state_dict"])
    except RuntimeError as e:
        raise InputError(f"'{path}' does not fit the rebuilt architecture: {str(e).splitlines()[0]}") from None
    return gm.to(device).eval(), json.loads(payload["plan"]), report
