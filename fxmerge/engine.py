"""One entry point for every merging method.

``merge`` is a pipeline of the passes:

    analyze (trace + ChannelAnalysis)        -> PermutationGroups
    matching pass (A, B in lockstep)         -> Matching (activation or weight)
    align B (permute_state)                  -> B's weights opposite A's
    plan_budget (CostModel)                  -> Plan: merged pairs per root
    WidenGraph                               -> widened GraphModule, W0
    least-squares pass (A, aligned B)        -> per-layer Gram systems, new W
    split_contractions                       -> row-block layers, no zero blocks
    reset_batch_norm                         -> BatchNorm statistics of the merged model

Methods: ``pleas`` (activation matching, partial merging at the budget, least
squares, BatchNorm reset), ``perm`` (the same without least squares),
``rebasin`` (Git Re-Basin: weight matching, full merge at 1x, BatchNorm
reset), ``avg`` (no permutation, full merge at 1x, BatchNorm reset) and
``ensemble`` (no merging: both models side by side at 2x, outputs averaged or
concatenated: the reference point).
"""
from __future__ import annotations

import copy
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from .analysis import PermutationGroups, analyze, permute_tensor
from .ir import Product, find
from .budget import CostModel, Plan, frozen_roots, plan_budget, roots_within
from .lstsq import GramCollector, LayerSystem, regmean_layer, solve_layer, supports
from .matching import ActivationCollector, Matching, activation_matching, check_finite_state, weight_matching
from .models import InputError
from .rewrite import WidenGraph, _set_tensor, check_shapes, in_axes_of, normalized_layouts, split_contractions, splittable
from .runner import LockstepRunner, input_batches
from .widening import LayoutWidener
from .zipit import JointCollector, ZipProjector, merge_matrices, root_order, zip_cut, zip_pairs

METHODS = ("pleas", "perm", "rebasin", "avg", "regmean", "zipit", "ensemble")
LABELS = ("shared", "disjoint")
NORM_POLICIES = ("split", "merged")
REGMEAN_ALPHA = 0.9  # off-diagonal scaling of RegMean's Gram matrices (its authors' default)


@dataclass
class MergePlan:
    """What was merged: per group, its width in each model, merged pairs and
    the merged model's width; the B permutation per group."""

    method: str
    budget: float
    labels: str
    groups: list  # dicts: id, kind, size, merged, width
    permutations: dict = field(default_factory=dict)  # group id -> B index per A index
    masks: dict = field(default_factory=dict)  # group id -> merged mask (A index order)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "budget": self.budget,
            "labels": self.labels,
            "groups": self.groups,
            "permutations": {str(k): v.tolist() for k, v in self.permutations.items()},
            "masks": {str(k): v.astype(int).tolist() for k, v in self.masks.items()},
        }


@dataclass
class MergeResult:
    model: fx.GraphModule
    plan: MergePlan
    report: dict
    groups: Optional[PermutationGroups] = field(default=None, repr=False)


def _as_reiterable(data) -> Iterable:
    if data is None:
        raise InputError("no calibration data: pass a DataLoader, a list of tensors or (inputs, targets) pairs")
    if iter(data) is data:  # a one-shot iterator: keep its items for the later passes
        data = list(data)
    return data


def _example_from(data, device) -> tuple:
    for x in input_batches(data, device):
        if x.shape[0] < 1:
            continue
        return (x[:2],)
    raise InputError("the calibration data is empty: give at least two inputs")


def check_same_architecture(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    for name, t in sa.items():
        if name not in sb:
            raise InputError(f"the models differ: model B has no parameter '{name}' (model A: {tuple(t.shape)})")
        if tuple(t.shape) != tuple(sb[name].shape):
            raise InputError(
                f"the models differ at '{name}': model A {tuple(t.shape)}, model B {tuple(sb[name].shape)}"
            )
    for name in sb:
        if name not in sa:
            raise InputError(f"the models differ: model A has no parameter '{name}'")


def _count_images(data, device) -> int:
    n = 0
    for i, x in enumerate(input_batches(data, device)):
        if not torch.isfinite(x).all():
            raise InputError(f"the calibration data has non-finite values (batch {i}): clean or re-normalise it")
        n += int(x.shape[0])
    return n


def _progress(it, enabled: bool, desc: str, total=None):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total, leave=False)


def _lockstep_pass(runner: LockstepRunner, collector, data, device, progress: bool, desc: str, until=None) -> None:
    """One pass over the calibration data, the collector seeing every node."""
    for i, x in enumerate(_progress(input_batches(data, device), progress, desc)):
        collector.batch = i
        runner.run((x,), collector, until=until)


def _group_of_root(pg: PermutationGroups) -> dict:
    return {r.uid: g for g in pg.all_groups for r in g.roots}


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the CPU's fused attention kernel (the counter has no formula
    for it): ``q k^T`` and ``attn v``, two FLOPs per multiply-accumulate."""
    *batch, n_q, d_qk = query_shape
    n_kv, d_v = key_shape[-2], value_shape[-1]
    return 2 * int(np.prod(batch)) * n_q * n_kv * (d_qk + d_v)


_EXTRA_FLOP_FORMULAS = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _EXTRA_FLOP_FORMULAS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_attention_flops


def measure_macs(model: nn.Module, example_inputs: tuple) -> float:
    """Multiply-accumulates of one forward pass per example, counted on the
    real ops (``torch.utils.flop_counter``)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS)
    # nn.MultiheadAttention's fused eval-mode kernel is invisible to the
    # counter: take the plain path while counting
    mha = torch.backends.mha
    fast = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), counter:
            model(*example_inputs)
    finally:
        mha.set_fastpath_enabled(fast)
    return counter.get_total_flops() / 2 / max(1, int(example_inputs[0].shape[0]))


@torch.no_grad()
def reset_batch_norm(model: nn.Module, data, device, progress: bool = False) -> int:
    """Recompute every BatchNorm's running statistics on ``data`` (cumulative
    average over all batches; the rest of the model stays in eval mode)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        for x in _progress(input_batches(data, device), progress, "batchnorm reset"):
            model(x)
    finally:
        for m, (mom, tr) in zip(bns, saved):
            m.momentum = mom
            m.train(tr)
    return len(bns)


def merge(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Iterable,
    *,
    budget: float = 1.0,
    method: str = "pleas",
    labels: str = "shared",
    example_inputs: Any = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    matching: Optional[str] = None,
    ridge: float = 1e-2,
    positions: int = 64,
    reset_bn: bool = True,
    norm_policy: str = "split",
    ls_inputs: str = "merged",
    progress: bool = False,
) -> MergeResult:
    """Merge two models of one architecture into one of ``budget`` x the cost
    of model A (multiply-accumulates).

    ``data`` yields input tensors or ``(inputs, targets)`` pairs (a DataLoader
    works); it is read once for matching, once for least squares and once for
    the BatchNorm reset. ``labels="disjoint"`` keeps both classifiers: the
    merged model outputs ``cat([logits_A, logits_B], -1)``. ``matching`` is
    ``"activation"`` or ``"weight"`` (default: activation for pleas and perm,
    weight for rebasin). ``norm_policy`` says what happens to features that
    a LayerNorm normalises (a transformer's residual stream): ``"split"``
    widens them like any other group and gives each such LayerNorm per-model
    statistics (exact at 2x); ``"merged"`` keeps them fully merged and spends
    the budget elsewhere (heads, MLP width). ``ls_inputs`` picks the inputs
    least squares fits on: the permuted ensemble's (``"ensemble"``, one pass)
    or the merged model's own (``"merged"``, one pass per wave of layers).
    ``ridge`` pulls each least-squares solution toward the permuted weights
    (default 1e-2 of the mean Gram diagonal, the best of 0 to 1e-1 on the
    demo's ResNets and ViTs: benchmarks/ridge.py). The source models are
    never modified.
    """
    t_start = time.perf_counter()
    timings: dict = {}
    if method not in METHODS:
        raise InputError(f"unknown method '{method}': choose one of {', '.join(METHODS)}")
    if labels not in LABELS:
        raise InputError(f"labels must be 'shared' or 'disjoint', got '{labels}'")
    try:
        budget = float(budget)
    except (TypeError, ValueError):
        raise InputError(f"budget must be a number between 1 and 2, got {budget!r}") from None
    if not 1.0 <= budget <= 2.0 or not np.isfinite(budget):
        raise InputError(f"budget must be between 1 and 2 (x the cost of one source model), got {budget}")
    if method in ("rebasin", "avg", "regmean") and budget != 1.0:
        raise InputError(f"method '{method}' merges everything (budget 1); use 'perm' or 'pleas' for budget {budget}")
    if norm_policy not in NORM_POLICIES:
        raise InputError(f"norm_policy must be 'split' or 'merged', got '{norm_policy}'")
    if not isinstance(positions, int) or positions < 0:
        raise InputError(f"positions must be a whole number >= 0 (0 keeps every position), got {positions!r}")
    if ls_inputs not in ("ensemble", "merged"):
        raise InputError(f"ls_inputs must be 'ensemble' or 'merged', got '{ls_inputs}'")
    if method == "ensemble":
        budget = 2.0
        norm_policy = "split"
    matching = matching or ("weight" if method == "rebasin" else "activation")
    if matching not in ("activation", "weight"):
        raise InputError(f"matching must be 'activation' or 'weight', got '{matching}'")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device '{device}': use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' requested but no CUDA GPU is available: use --device cpu")
    check_same_architecture(model_a, model_b)
    check_finite_state(model_a.state_dict(), "A")
    check_finite_state(model_b.state_dict(), "B")
    data = _as_reiterable(data)
    n_images = _count_images(data, device)
    if n_images < 2:
        raise InputError(f"the calibration data has {n_images} input(s): give at least two (a few hundred for least squares)")
    if example_inputs is None:
        example_inputs = _example_from(data, device)
    elif not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    example_inputs = tuple(x.to(device) for x in example_inputs)

    # -- analysis ------------------------------------------------------------
    t = time.perf_counter()
    a = copy.deepcopy(model_a).to(device).eval()
    b = copy.deepcopy(model_b).to(device).eval()
    pg = analyze(a, example_inputs, per_model_output=(labels == "disjoint"))
    gm_a = pg.gm
    gm_b = copy.deepcopy(gm_a)
    state_b_full = b.state_dict()
    gm_b.load_state_dict({k: state_b_full[k] for k in gm_b.state_dict()}, strict=True)
    state_a = {k: v for k, v in gm_a.state_dict().items()}
    timings["analysis"] = time.perf_counter() - t
    group_of = _group_of_root(pg)
    output_roots = {r.uid for g in pg.all_groups if g.kind == "output" for r in g.roots}

    # -- matching ------------------------------------------------------------
    t = time.perf_counter()
    if method in ("avg", "regmean", "ensemble"):
        match = Matching()
    elif method == "zipit":
        match = Matching()
        collector = JointCollector(pg, positions, seed, device)
        _lockstep_pass(LockstepRunner([gm_a, gm_b]), collector, data, device, progress, "matching")
        zip_sims = {u: c for u, c in collector.similarities().items() if u not in output_roots}
    elif matching == "weight":
        match = weight_matching(pg, state_a, gm_b.state_dict(), seed=seed, exclude=output_roots)
    else:
        collector = ActivationCollector(pg, positions, seed, device, models=(gm_a, gm_b))
        _lockstep_pass(LockstepRunner([gm_a, gm_b]), collector, data, device, progress, "matching")
        match = activation_matching(collector, exclude=output_roots)
    timings["matching"] = time.perf_counter() - t

    # -- align B -------------------------------------------------------------
    sampler = match.sampler()
    state_b = {}
    for k, v in gm_b.state_dict().items():
        lays = pg.members.get(k)
        state_b[k] = permute_tensor(v, lays, sampler) if lays is not None else v
    gm_b_aligned = copy.deepcopy(gm_a)
    gm_b_aligned.load_state_dict(state_b)

    # -- plan ----------------------------------------------------------------
    t = time.perf_counter()
    cost_model = CostModel.from_groups(pg)
    fixed = {u: 0 for u in output_roots if u in cost_model.uids}
    frozen = frozen_roots(pg)
    frozen |= _normalized_roots(pg, norm_policy)
    fixed.update({u: int(n) for u, n in zip(cost_model.uids, cost_model.sizes) if u in frozen})
    if method in ("rebasin", "avg", "regmean"):
        fixed.update({u: int(s) for u, s in zip(cost_model.uids, cost_model.sizes) if u not in fixed})
    if method == "zipit":
        plan, projector = _plan_zip(pg, cost_model, collector.keys, zip_sims, budget, fixed)
    else:
        plan = plan_budget(cost_model, match.sims, budget, fixed=fixed)
    timings["plan"] = time.perf_counter() - t

    # -- widen ---------------------------------------------------------------
    t = time.perf_counter()
    widener = LayoutWidener(plan.masks)
    merged = WidenGraph(pg, widener).run(state_a, state_b)
    if method == "zipit":
        contracted = in_axes_of(pg)
        for name, lays in pg.members.items():
            if name in state_a:
                _set_tensor(merged, name, projector.merge_tensor(state_a[name], state_b[name], lays, contracted.get(name, set())))
    check_shapes(merged, pg, widener, example_inputs)
    timings["widen"] = time.perf_counter() - t

    # -- least squares -------------------------------------------------------
    ls_report = {}
    if method == "pleas":
        t = time.perf_counter()
        ls_report = _least_squares(pg, merged, gm_a, gm_b_aligned, widener, data, device, positions, seed, ridge, progress,
                                   ls_inputs)
        timings["least_squares"] = time.perf_counter() - t
    elif method == "regmean":
        t = time.perf_counter()
        ls_report = _least_squares(pg, merged, gm_a, gm_b_aligned, widener, data, device, positions, seed, ridge, progress,
                                   "stacked")
        timings["least_squares"] = time.perf_counter() - t

    n_split = split_contractions(merged, pg, widener)
    if reset_bn and method != "ensemble":
        t = time.perf_counter()
        reset_batch_norm(merged, data, device, progress)
        timings["batchnorm_reset"] = time.perf_counter() - t
    merged.eval()
    timings["total"] = time.perf_counter() - t_start

    macs_a = measure_macs(gm_a, example_inputs)
    macs_m = measure_macs(merged, example_inputs)
    n_params_a = sum(p.numel() for p in gm_a.parameters())
    n_params_m = sum(p.numel() for p in merged.parameters())
    report = {
        "method": method,
        "budget": budget,
        "labels": labels,
        "matching": matching if method not in ("avg", "regmean", "ensemble") else "identity",
        "cost_planned": plan.ratio,
        "cost_measured": macs_m / macs_a if macs_a else float("nan"),
        "cost_feasible": list(plan.feasible),
        "cost_resolution": plan.resolution,
        "macs_source": macs_a,
        "macs_merged": macs_m,
        "params_source": n_params_a,
        "params_merged": n_params_m,
        "calibration_inputs": n_images,
        "source_num_classes": int(_output_width(pg)),
        "row_block_layers": n_split,
        "timings": timings,
        "least_squares": ls_report,
        "pinned_ops": [p.kind for p in pg.pinned],
        "norm_policy": norm_policy,
    }
    merge_plan = _describe_plan(pg, plan, match, group_of, method, budget, labels)
    return MergeResult(merged, merge_plan, report, pg)


def _plan_zip(pg, cost_model, keys, sims, budget, fixed):
    """ZipIt!'s plan: the cut of the root order nearest the budget; zipped
    roots get merge/unmerge matrices, the others stay separate."""
    order = [r.uid for r in root_order(pg)]
    k, ratio, feasible = zip_cut(cost_model, order, budget, fixed)
    sizes = dict(zip(cost_model.uids, cost_model.sizes.tolist()))
    zipped = {}
    for uid, corr in sims.items():
        r = keys[uid]
        s = r.structure
        if s is None:
            unit = r
        elif isinstance(s, Product) and s.inner_size == 1:
            unit = find(s.outer)  # one channel per block (depthwise): zip the blocks
        else:
            continue  # heads: ZipIt! has no notion of them; they are averaged
        if k.get(unit.uid, unit.size) == unit.size and corr.shape[0] == 2 * r.size:
            zipped[uid] = merge_matrices(zip_pairs(corr), r.size)
    separate = {u for u, kk in k.items() if kk == 0}
    masks = {u: np.full(sizes[u], kk == sizes[u]) for u, kk in k.items()}
    src = cost_model.source_cost()
    plan = Plan(k, masks, budget, ratio * src, src, feasible, 0.0)
    return plan, ZipProjector(zipped, separate)


def _normalized_roots(pg, policy: str) -> set:
    """Roots that must stay merged because a normalisation reads them across
    all features: all of them under the ``merged`` policy, those of
    normalisations the rewrite cannot split under ``split``."""
    nodes = {n.name: n for n in pg.gm.graph.nodes}
    roots: set = set()
    for name, norm in pg.normalizations.items():
        node = nodes[name]
        if policy == "merged" or not splittable(pg.gm, node, norm):
            for lay in normalized_layouts(pg, node, norm):
                roots_within(lay, roots)
    return roots


def _output_width(pg) -> int:
    for n in pg.gm.graph.nodes:
        if n.op == "output":
            v = n.args[0]
            v = v[0] if isinstance(v, (list, tuple)) else v
            meta = getattr(v, "meta", {}).get("fxm_value")
            return int(meta.shape[-1]) if hasattr(meta, "shape") else 0
    return 0


def _least_squares(pg, merged, gm_a, gm_b, widener, data, device, positions, seed, ridge, progress, inputs) -> dict:
    nodes = {n.name: n for n in merged.graph.nodes}
    pg_nodes = {n.name: n for n in pg.gm.graph.nodes}
    systems, modules = {}, {}  # keyed like pg.contractions (node name, or node#part)
    for key, c in pg.contractions.items():
        name = c.node
        node = nodes[name]
        if node.op != "call_module" or key in systems:
            continue
        mod = merged.get_submodule(node.target)
        lays = pg.members[c.weight]
        if c.taps is None:
            if not supports(mod):
                continue
            weight_name = f"{node.target}.weight"
            bias_name = f"{node.target}.bias" if getattr(mod, "bias", None) is not None else None
            x_lay = pg.layouts[pg_nodes[name].args[0]].lays[c.input_axis]
            y_lay = pg.layouts[pg_nodes[name]].lays[c.output_axis]
        else:
            # a weight inside an opaque module: its own axes are its input's and output's channels
            weight_name = c.weight
            bias_name = c.weight[: -len("weight")] + "bias" if c.weight.endswith("weight") else None
            if bias_name is not None and getattr(_owner(merged, bias_name), bias_name.rsplit(".", 1)[-1], None) is None:
                bias_name = None
            x_lay, y_lay = lays[1], lays[0]
        if inputs == "stacked" and tuple(merged.get_parameter(weight_name).shape) != tuple(
                gm_a.get_parameter(weight_name).shape):
            continue  # RegMean merges same-shape layers; a widened one (both heads kept) stays as widened
        systems[key] = LayerSystem(name, weight_name, bias_name, getattr(mod, "groups", 1) if c.taps is None else 1,
                                   widener.widen(lays[1]), widener.widen(lays[0]),
                                   widener.widen(x_lay), widener.widen(y_lay), taps=c.taps)
        modules[key] = mod
    if not systems:
        return {"layers": 0}
    if inputs in ("ensemble", "stacked"):
        waves = [list(systems)]
        models = [gm_a, gm_b]
    else:
        waves = _waves(merged, systems)
        models = [gm_a, gm_b, merged]
    per_layer = {}
    runner = LockstepRunner(models)
    for w, wave in enumerate(waves):
        collector = GramCollector({k: systems[k] for k in wave}, modules, models, positions, seed,
                                  stacked=inputs == "stacked")
        desc = "least squares" if len(waves) == 1 else f"least squares {w + 1}/{len(waves)}"
        # waves are in graph order: nothing after a wave's last layer is needed
        _lockstep_pass(runner, collector, data, device, progress, desc,
                       until=systems[wave[-1]].node if len(waves) > 1 else None)
        collector.finish()
        for key in wave:
            sysm = systems[key]
            weight = merged.get_parameter(sysm.weight)
            bias = merged.get_parameter(sysm.bias) if sysm.bias is not None else None
            if inputs == "stacked":
                src = [(gm.get_parameter(sysm.weight), gm.get_parameter(sysm.bias) if sysm.bias else None)
                       for gm in (gm_a, gm_b)]
                w_new, bias = regmean_layer(sysm, [s[0] for s in src], [s[1] for s in src], REGMEAN_ALPHA, ridge)
            else:
                w_new, bias = solve_layer(sysm, weight, bias, ridge)
            if not torch.isfinite(w_new).all():
                raise InputError(f"least squares for '{key}' produced non-finite weights: give more calibration data or a larger ridge")
            _set_tensor(merged, sysm.weight, w_new)
            if bias is not None:
                _set_tensor(merged, sysm.bias, bias)
            modules[key] = merged.get_submodule(nodes[sysm.node].target)
            per_layer[key] = {"samples": sysm.n, "loss_init": sysm.loss_init, "loss_fit": sysm.loss_fit}
            sysm.gram = sysm.cross = None  # free
    return {"layers": len(systems), "ridge": ridge, "inputs": inputs, "passes": len(waves), "per_layer": per_layer}


def _waves(gm: fx.GraphModule, systems: dict) -> list:
    """The fitted weights (system keys) in waves: a weight joins the first
    wave after every fitted weight upstream of it; the weights of one node
    (a packed attention's input and output projections) go in successive
    waves, in the order of their systems."""
    by_node: dict = defaultdict(list)
    for key, sysm in systems.items():
        by_node[sysm.node].append(key)
    level: dict = {}
    waves: dict = defaultdict(list)
    for node in gm.graph.nodes:
        up = max((level[a] for a in node.all_input_nodes), default=0)
        for key in by_node.get(node.name, ()):
            waves[up].append(key)
            up += 1
        level[node] = up
    return [waves[k] for k in sorted(waves)]


def _owner(gm: nn.Module, name: str) -> nn.Module:
    """The module that holds the parameter or attribute ``name``."""
    return gm.get_submodule(name.rsplit(".", 1)[0]) if "." in name else gm


def _describe_plan(pg, plan: Plan, match: Matching, group_of, method, budget, labels) -> MergePlan:
    groups, perms, masks = [], {}, {}
    for g in pg.groups:
        if g.parent is not None:
            groups.append({"id": g.id, "kind": g.kind, "size": g.size, "blocks": g.blocks, "merged": g.size, "width": g.size})
            continue
        uid = g.roots[0].uid
        k = plan.k.get(uid, g.size)
        groups.append({"id": g.id, "kind": g.kind, "size": g.size, "merged": int(k), "width": int(2 * g.size - k)})
        if uid in match.perms:
            perms[g.id] = np.asarray(match.perms[uid])
        if uid in plan.masks:
            masks[g.id] = plan.masks[uid]
    return MergePlan(method, budget, labels, groups, perms, masks)

