"""The fitting sweep: one walk over the graph that fits the merged model.

Least squares on the merged model's own inputs, and BatchNorm statistics
re-estimated on its own activations, both need statistics over all the
calibration data at a node before anything downstream of it can be computed
with the final weights. A *point* (``Point``) is such a need: a layer's
least-squares system, a BatchNorm's statistics. Points get *waves*: a point
that reads the merged model waits for every point upstream of it; a point
that reads only the source models (teacher-forced least squares) goes in
wave 0.

The sweep runs the waves in order. In each, it computes for every
calibration batch only the nodes that the wave's points need and that no
earlier wave computed, for each model (A, aligned B, merged), from the
*frontier*: the values of earlier waves that later ones still read. Every
node of every model is computed at most once, as late as possible (so the
frontier stays small) unless computing it earlier frees more than it holds
(a residual sum right after its branch), so a whole fit costs about one
forward pass of each model plus the statistics. After the last batch of a
wave its points finish (sum across ranks, solve, write into the merged
model).

The frontier lives in memory up to a cap (``max_memory`` less the largest
wave's statistics and solve, ``wave_bytes``) and spills beyond it, the
values read last first, to a temporary directory (``FrontierStore``), which
is removed on success, error and interrupt. Once the frontier has shrunk by
a quarter, the heap's free pages go back before the wave's solves
(``allocator.release_freed_memory``). ``schedule="recompute"`` keeps no
frontier and recomputes every wave from the inputs (the wave-by-wave
method: the same systems, one forward pass per wave).
"""
from __future__ import annotations

import time
from collections import defaultdict
from typing import Any, Callable, Iterable, Optional

import torch
import torch.fx as fx

from fxmerge.runtime.memory import release_freed_memory

from .frontier import FrontierStore, value_bytes

A, B, M = 0, 1, 2  # model slots: source A, aligned source B, merged


def source_slots(n_models: int) -> list:
    """The slots of ``n_models`` source models: A and B, then every further
    model after the merged one (``M`` stays the merged model's slot)."""
    return [A, B][:n_models] + [M + 1 + i for i in range(n_models - 2)]


def slotted(sources: list, merged) -> list:
    """The sweep's models list: the sources in their slots, the merged model in ``M``."""
    return sources[:2] + [merged] + sources[2:]
NEVER = 1 << 30
RELEASE_BYTES = 256 << 20  # the least frontier shrinkage after which freed pages go back to the system


class Point:
    """A statistic over all calibration data at one node (see the module
    docstring). Subclasses say what they read and how they finish."""

    node: str
    merged_inputs: bool = True  # reads merged values: waits for the points upstream of it
    wave: int = -1

    def reads(self, node: fx.Node) -> list:
        """``(model slot, node)`` pairs whose values ``collect`` reads."""
        raise NotImplementedError

    def start(self) -> None:
        """Called before the first batch of its wave."""

    def collect(self, batch: int, value: Callable[[int, fx.Node], Any]) -> None:
        """Add one batch: ``value(slot, node)`` is that model's value."""
        raise NotImplementedError

    def finish(self) -> None:
        """After the last batch: reduce, solve, write into the merged model."""
        raise NotImplementedError

    def nbytes(self) -> int:
        """Bytes of its accumulated statistics."""
        return 0

    def solve_nbytes(self) -> int:
        """Bytes its ``finish`` holds besides the statistics (the points of a
        wave finish one at a time)."""
        return 0


def wave_bytes(points: list) -> int:
    """Peak bytes of one wave's statistics: all of them, and the largest
    solve's working memory on top (they finish in turn)."""
    return sum(p.nbytes() for p in points) + max((p.solve_nbytes() for p in points), default=0)


class Schedule:
    """When each model computes each node: waves of the points, and for every
    slot and node (by name) the wave in which it is computed (as late as its
    readers allow, or earlier where that shrinks the frontier; never, when
    nothing reads it). ``graphs[slot]`` are the
    models' graphs: the same nodes, though a rewrite may have turned a
    computed size into a constant (one edge fewer)."""

    def __init__(self, graphs: dict, points: list, pull_forward: bool = True):
        """``pull_forward=False`` keeps every node at its first reader's
        wave (``_pull_forward``)."""
        slots = tuple(graphs)
        self.graph_nodes = {s: {n.name: n for n in graphs[s].nodes} for s in slots}
        ref = graphs[M] if M in graphs else graphs[slots[-1]]
        # each slot's graph order (the merged graph runs some parts per model view under other names)
        self.order = {s: [n.name for n in graphs[s].nodes] for s in slots}
        by_name = {n.name: n for n in ref.nodes}
        self.points_at: dict = defaultdict(list)
        for p in points:
            self.points_at[p.node].append(p)
        # waves: as the merged model's level, one more after every point it passes
        level: dict = {}
        for n in ref.nodes:
            up = max((level[i.name] for i in n.all_input_nodes), default=0)
            for p in self.points_at.get(n.name, ()):
                p.wave = up if p.merged_inputs else 0
                up = max(up, p.wave + 1)
            level[n.name] = up
        self.level = level
        self.waves = sorted({p.wave for p in points})
        # what each wave's points read, per slot
        need: dict = {s: defaultdict(set) for s in slots}
        self.point_reads: dict = {s: defaultdict(set) for s in slots}  # slot -> wave -> node names
        for p in points:
            for slot, node in p.reads(by_name[p.node]):
                need[slot][node.name].add(p.wave)
                self.point_reads[slot][p.wave].add(node.name)
        self.step: dict = {s: {} for s in slots}
        self.last: dict = {s: {} for s in slots}
        self.reads: dict = {s: {} for s in slots}  # slot -> node -> the waves that read it, in order
        self.inputs: dict = {}
        first = self.waves[0] if self.waves else 0
        for s in slots:
            step, last = self.step[s], self.last[s]
            self.inputs[s] = {n.name: [i.name for i in n.all_input_nodes] for n in graphs[s].nodes}
            for n in reversed(list(graphs[s].nodes)):
                consumers = self._consumers(s, n, need[s])
                if n.op == "output" or not consumers:
                    step[n.name] = NEVER
                    continue
                t = min(consumers)
                if n.op == "placeholder":
                    t = first  # the data is read once, in the first wave
                if s == M and t < level[n.name]:
                    raise AssertionError(f"the merged model's '{n.name}' is read before it is fitted")
                step[n.name] = t
                last[n.name] = max(consumers)
                self.reads[s][n.name] = sorted(consumers)
            if pull_forward:
                self._pull_forward(s, graphs[s], need[s])

    def _consumers(self, slot: int, node: fx.Node, need: dict) -> set:
        """The waves that read ``node``'s value: its points' (``need``) and
        those in which its users are computed."""
        step = self.step[slot]
        return set(need.get(node.name, ())) | {step[u.name] for u in node.users if step.get(u.name, NEVER) < NEVER}

    def _pull_forward(self, slot: int, graph: fx.Graph, need: dict) -> None:
        """Computes a node earlier than its first reader when that frees at
        least its own size in the frontier at every wave in between: a
        residual add (and the BatchNorm and activation around it) right
        after the branch's last convolution, so the frontier holds the sum
        instead of the branch's output and the shortcut. Sizes come from
        the traced shapes (``fxm_value``); a node without one stays put.
        The merged model's nodes never move before their level."""
        step, last, reads, inputs = self.step[slot], self.last[slot], self.reads[slot], self.inputs[slot]
        by_name = self.graph_nodes[slot]
        for n in graph.nodes:  # graph order: a node's inputs have moved already
            t = step.get(n.name, NEVER)
            if t >= NEVER or n.op in ("placeholder", "output") or not inputs[n.name]:
                continue
            earliest = max(step[i] for i in inputs[n.name])
            if slot == M:
                earliest = max(earliest, self.level[n.name])
            size = value_bytes(n)
            if earliest >= t or size is None:
                continue
            step[n.name] = earliest  # tentatively: what its inputs' readers become
            freed = 0
            for i in inputs[n.name]:
                if last[i] == t and max(self._consumers(slot, by_name[i], need)) <= earliest:
                    freed += value_bytes(by_name[i]) or 0
            if freed < size:
                step[n.name] = t
                continue
            for i in inputs[n.name]:
                c = self._consumers(slot, by_name[i], need)
                last[i], reads[i] = max(c), sorted(c)

    def computed_at(self, slot: int, wave: int) -> list:
        """Names of the nodes ``slot`` computes in ``wave``, in graph order."""
        step = self.step[slot]
        return [n for n in self.order[slot] if step.get(n, NEVER) == wave]

    def loaded_at(self, slot: int, wave: int) -> list:
        """The frontier values ``slot`` reads in ``wave`` (computed earlier)."""
        step = self.step[slot]
        want = set(self.point_reads[slot].get(wave, ()))
        for n in self.computed_at(slot, wave):
            want.update(self.inputs[slot][n])
        return [n for n in self.order[slot] if n in want and step.get(n, NEVER) < wave]

    def recomputed_at(self, slot: int, wave: int) -> list:
        """Without a frontier: everything ``wave`` reads and all that is
        upstream of it, in graph order."""
        want = set(self.computed_at(slot, wave)) | set(self.loaded_at(slot, wave))
        closure, stack = set(), list(want)
        while stack:
            n = stack.pop()
            if n in closure:
                continue
            closure.add(n)
            stack.extend(self.inputs[slot][n])
        return [n for n in self.order[slot] if n in closure]


class RowBlockInterpreter(fx.Interpreter):
    """The merged model's interpreter: a widened layer with structural zeros
    runs as the row-block module the emitted model will have (built from
    its current weights, rebuilt when the fit replaces them), not as the
    dense widened layer, whose fully widened convolutions cost twice the
    row blocks' arithmetic. ``row_blocks``: ``{target: (row-block class,
    in_index, out_index)}`` (``rewrite.module_row_blocks``)."""

    def __init__(self, module: fx.GraphModule, row_blocks: dict):
        super().__init__(module, garbage_collect_values=False)
        self.row_blocks = row_blocks
        self._built: dict = {}  # target -> (tensors it was built from, their versions, module)

    def call_module(self, target, args, kwargs):
        spec = self.row_blocks.get(target)
        if spec is None:
            return super().call_module(target, args, kwargs)
        mod = self.fetch_attr(target)
        source = tuple(t for t in (mod.weight, mod.bias) if t is not None)
        versions = tuple(t._version for t in source)
        built = self._built.get(target)
        if built is None or any(a is not b for a, b in zip(built[0], source)) or built[1] != versions:
            kind, in_index, out_index = spec
            built = self._built[target] = (source, versions, kind(mod, in_index, out_index).to(mod.weight.device))
        return built[2](*args, **kwargs)


class Sweep:
    """Runs the points of a fit over the calibration data (see the module
    docstring). ``models[slot]`` are GraphModules of one graph (A, aligned
    B, merged; a slot nobody reads may be None)."""

    def __init__(self, models: list, points: list, *, schedule: str = "frontier", max_memory: int = 1 << 62,
                 frontier_dtype: torch.dtype = torch.float32, spill_dir: Optional[str] = None,
                 progress: bool = False, desc: str = "fit", row_blocks: Optional[dict] = None):
        if schedule not in ("frontier", "recompute"):
            raise ValueError(f"unknown schedule '{schedule}'")
        self.models = models
        self.row_blocks = row_blocks or {}
        self.points = points
        self.mode = schedule
        self.progress = progress
        self.desc = desc
        self.slots = tuple(i for i, m in enumerate(models) if m is not None)
        self.schedule = Schedule({s: models[s].graph for s in self.slots}, points)
        self.nodes = self.schedule.graph_nodes
        self.stats_peak = max((wave_bytes([p for p in points if p.wave == w]) for w in self.schedule.waves), default=0)
        self.store = FrontierStore(max(0, max_memory - self.stats_peak), frontier_dtype, spill_dir,
                                   next_read=self._next_read)
        self._now = (-1, -1)  # (wave, batch) being computed
        self.report: dict = {}

    def _next_read(self, key) -> tuple:
        """``(wave, batch)`` at which a kept value is read next."""
        slot, node, batch = key
        wave, current = self._now
        for r in self.schedule.reads[slot].get(node, ()):
            if r > wave or (r == wave and batch > current):
                return (r, batch)
        return (NEVER, batch)

    @torch.no_grad()
    def run(self, batches: Callable[[], Iterable]) -> dict:
        """``batches()`` yields this rank's calibration ``Inputs`` of one pass."""
        from fxmerge.runtime.distributed import rank, sync, world_size

        t0 = time.perf_counter()
        sched = self.schedule
        interps = {s: RowBlockInterpreter(self.models[s], self.row_blocks) if s == M
                   else fx.Interpreter(self.models[s], garbage_collect_values=False) for s in self.slots}
        world, me = world_size(), rank()
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(sched.waves), desc=self.desc, leave=False)
        n_batches = None
        # where the time goes: the three models' nodes, the frontier's stores
        # and reads (RAM or disk), the statistics, the solves
        spent = {"forward": 0.0, "frontier": 0.0, "statistics": 0.0, "solve": 0.0}
        try:
            for wave in sched.waves:
                points = [p for p in self.points if p.wave == wave]
                for p in points:
                    p.start()
                if self.mode == "frontier":
                    compute = {s: sched.computed_at(s, wave) for s in self.slots}
                    load = {s: sched.loaded_at(s, wave) for s in self.slots}
                else:
                    compute = {s: sched.recomputed_at(s, wave) for s in self.slots}
                    load = {s: [] for s in self.slots}
                source = batches() if (self.mode == "recompute" or n_batches is None) else range(n_batches)
                count = 0
                for i, item in enumerate(source):
                    self._now = (wave, i)
                    envs = {}
                    for s in self.slots:
                        nodes = self.nodes[s]
                        t = time.perf_counter()
                        env = {nodes[n]: self.store.get((s, n, i)) for n in load[s]}
                        t1 = time.perf_counter()
                        self._compute(interps[s], [nodes[n] for n in compute[s]], env, item)
                        spent["frontier"] += t1 - t
                        spent["forward"] += time.perf_counter() - t1
                        envs[s] = env
                    value = lambda slot, node: envs[slot][self.nodes[slot][node.name]]  # noqa: E731
                    t = time.perf_counter()
                    for p in points:
                        p.collect(i * world + me, value)
                    t1 = time.perf_counter()
                    spent["statistics"] += t1 - t
                    if self.mode == "frontier":
                        self._keep(envs, compute, load, wave, i)
                        spent["frontier"] += time.perf_counter() - t1
                    count += 1
                if n_batches is None:
                    n_batches = count
                sync()  # every rank reached the end of the wave
                t = time.perf_counter()
                # once the frontier has shrunk by a quarter (and RELEASE_BYTES), the
                # pages of the values it freed go back before the solves allocate:
                # those values lay between live blocks, where a large Gram block
                # does not fit (fxmerge/runtime/memory.py); releasing every wave would
                # fault the steady waves' activations in afresh each time
                if self.store.shrunk_since_release(RELEASE_BYTES):
                    release_freed_memory()
                    self.store.mark_released()
                for p in points:
                    p.finish()
                spent["solve"] += time.perf_counter() - t
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
            self.store.close()
        self.report = {
            "schedule": self.mode,
            "waves": len(sched.waves),
            "batches": n_batches or 0,
            "frontier_peak_bytes": self.store.peak_total,
            "frontier_peak_memory_bytes": self.store.peak_ram,
            "frontier_spilled_bytes": self.store.spilled,
            "statistics_peak_bytes": self.stats_peak,
            "seconds": time.perf_counter() - t0,
            **{f"{k}_seconds": v for k, v in spent.items()},
        }
        return self.report

    def _compute(self, interp: fx.Interpreter, nodes: list, env: dict, item) -> None:
        interp.env = env
        positional = None
        for n in nodes:
            if n.op == "placeholder":
                if n.args:  # an optional argument pinned to its default
                    env[n] = n.args[0]
                    continue
                if positional is None:
                    required = [p for p in interp.module.graph.nodes if p.op == "placeholder" and not p.args]
                    positional = dict(zip(required, item.for_placeholders(interp.module)))
                env[n] = positional[n]
                continue
            env[n] = interp.run_node(n)

    def _keep(self, envs: dict, compute: dict, load: dict, wave: int, batch: int) -> None:
        """Store what later waves read; drop what no later wave reads."""
        sched = self.schedule
        for s in self.slots:  # drops first: their room goes to this wave's values
            for n in load[s]:
                if sched.last[s].get(n, -1) == wave:
                    self.store.drop((s, n, batch))
        for s in self.slots:
            last, nodes = sched.last[s], self.nodes[s]
            for n in compute[s]:
                if last.get(n, -1) > wave:
                    self.store.put((s, n, batch), envs[s][nodes[n]])
