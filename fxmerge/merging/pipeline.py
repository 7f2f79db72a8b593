"""What the merge's passes share: its options, its state and the registry
of passes.

A pass is a function of the ``MergeState`` registered under a name with
``@merge_pass(name, phase)``; a method (``fxmerge.methods.Method``) lists the
names of the passes it runs, and ``run_passes`` runs them in order, timing
each under its phase. Passes of every stage register here: the merging
stage's in ``fxmerge.merging.passes`` and ``fxmerge.merging.zip_passes``, the
fitting stage's in ``fxmerge.fit.passes``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from fxmerge.analysis.groups import PermutationGroups
from fxmerge.runtime import distributed as dist
from fxmerge.runtime.inputs import Inputs, calibration_inputs

from .matching import Matching
from .plan import Plan
from .widening import LayoutWidener


@dataclass(frozen=True)
class MergeOptions:
    """Everything ``merge`` was asked for, checked (``fxmerge.options``)."""

    method: str
    budget: float
    labels: str
    n_models: int
    matching: str
    ridge: float
    positions: int
    bn_stats: str
    norm_policy: str
    ls_inputs: str
    ls_targets: str
    planner: str
    device: torch.device
    max_memory: int  # bytes for the sweep's frontier, statistics and solves
    frontier_dtype: str = "float32"
    schedule: str = "frontier"
    spill_dir: Optional[str] = None
    zip_heads: str = "align"
    universe: str = "mean"
    strict: bool = False
    seed: int = 0
    progress: bool = False
    on_least_squares: Optional[Callable] = None


@dataclass
class MergeState:
    """What the passes read and write. ``method_state`` is a method's own
    (ZipIt!'s ``ZipState``); its ``report()``, if any, joins the report."""

    opts: MergeOptions
    method: Any  # the fxmerge.methods.Method record
    models: list  # the source modules (copies), model A first
    data: Any
    example_inputs: Inputs
    n_images: int
    input_names: list = field(default_factory=list)
    batch_inputs: Optional[Callable] = None
    images_per_rank: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    pg: Optional[PermutationGroups] = None
    # every model's weights in A's graph (A's own first), aligned once ``align`` ran
    sources: list = field(default_factory=list)
    match: Matching = field(default_factory=Matching)  # B's features opposite A's (two models)
    universe: Any = None  # every model's features opposite one shared order (``Universe``; more than two models)
    plan: Optional[Plan] = None
    widener: Optional[LayoutWidener] = None
    merged: Optional[fx.GraphModule] = None
    method_state: Any = None
    fit_points: list = field(default_factory=list)  # the sweep's points, gathered by the fitting passes
    least_squares: dict = field(default_factory=dict)
    sweep: dict = field(default_factory=dict)
    skipped_layers: list = field(default_factory=list)
    kept_merged: dict = field(default_factory=dict)  # root uid -> why it cannot widen (reasons)
    pinned_layers: dict = field(default_factory=dict)  # layer -> (why its rows stay merged, channels)
    budget_reachable: bool = True
    pinned_share: float = 0.0
    macs_a: Optional[float] = None
    node_macs_a: Optional[dict] = None  # per node, where parts run per model view
    macs_merged: Optional[float] = None  # measured once the model is emitted
    warnings: list = field(default_factory=list)
    row_block_layers: int = 0
    per_model_views: list = field(default_factory=list)  # nodes the rewrite runs once per model view
    bytes_reduced: int = 0  # summed across ranks by this merge

    @property
    def n_models(self) -> int:
        return len(self.models)

    @property
    def model_a(self) -> nn.Module:
        return self.models[0]

    @property
    def model_b(self) -> nn.Module:
        return self.models[1]

    @property
    def gm_a(self) -> Optional[fx.GraphModule]:
        return self.sources[0] if self.sources else None

    @property
    def gm_b(self) -> Optional[fx.GraphModule]:
        return self.sources[1] if len(self.sources) > 1 else None

    def batches(self) -> Iterable[Inputs]:
        """This rank's calibration inputs, batch by batch, on the device."""
        return calibration_inputs(self.data, self.input_names, self.opts.device, self.batch_inputs)

    @property
    def output_roots(self) -> set:
        return self.pg.output_roots


@dataclass(frozen=True)
class Pass:
    name: str
    phase: str  # the report's timing it counts under
    run: Callable[[MergeState], None]


PASSES: dict[str, Pass] = {}


def merge_pass(name: str, phase: str) -> Callable:
    """Register the decorated function of the state as pass ``name``."""

    def register(fn: Callable[[MergeState], None]) -> Callable[[MergeState], None]:
        if name in PASSES:
            raise ValueError(f"pass '{name}' is already registered")
        PASSES[name] = Pass(name, phase, fn)
        return fn

    return register


def run_passes(st: MergeState, names: Iterable[str]) -> None:
    """Run the named passes in order, each timed under its phase; under
    ``torch.distributed`` every rank ends with the same error."""
    try:
        for name in names:
            p = PASSES[name]
            t = time.perf_counter()
            p.run(st)
            st.timings[p.phase] = st.timings.get(p.phase, 0.0) + time.perf_counter() - t
    except Exception as e:
        if dist.world_size() > 1:
            dist.agree(e)
        raise


def with_progress(it, enabled: bool, desc: str, total=None):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total, leave=False)


def lockstep_pass(runner, collector, batches: Iterable[Inputs], progress: bool, desc: str) -> None:
    """One pass over this rank's calibration batches, the collector seeing
    every node (``collector.batch``: the batch's index over all ranks)."""
    world, me = dist.world_size(), dist.rank()
    for i, x in enumerate(with_progress(batches, progress, desc)):
        collector.batch = i * world + me
        runner.run(x, collector)
