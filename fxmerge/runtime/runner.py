"""Running several GraphModules of one graph in lockstep.

Matching and least squares need model A's and model B's values of the same
node at the same time. ``LockstepRunner`` steps one ``fx.Interpreter`` per
model through the shared node order, hands every node's values to a callback,
and frees values after their last use, so memory stays that of one forward
pass per model.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.fx as fx

from .inputs import Inputs


class LockstepRunner:
    def __init__(self, gms: Sequence[fx.GraphModule]):
        self.gms = list(gms)
        names = [n.name for n in self.gms[0].graph.nodes]
        for gm in self.gms[1:]:
            if [n.name for n in gm.graph.nodes] != names:
                raise ValueError("lockstep runs need graphs with the same nodes")
        self.nodes = [list(gm.graph.nodes) for gm in self.gms]
        index = self.index = {n: i for i, n in enumerate(self.nodes[0])}
        last_use: dict = {}
        for i, node in enumerate(self.nodes[0]):
            for inp in node.all_input_nodes:
                last_use[index[inp]] = i
        self.free_after: dict[int, list] = {}
        for j, i in last_use.items():
            self.free_after.setdefault(i, []).append(j)

    @torch.no_grad()
    def run(self, inputs: Inputs, on_node: Callable, until: Optional[str] = None) -> None:
        """Run every model on ``inputs``; ``on_node(node, values, env)`` sees
        each node's values (one per model); ``env(n)`` gives the values of an
        earlier node that is still live. ``until``: stop after that node."""
        interps = [fx.Interpreter(gm, garbage_collect_values=False) for gm in self.gms]
        for it, gm in zip(interps, self.gms):
            it.env = {}
            it.args_iter = iter(inputs.for_placeholders(gm))
        index = self.index

        def env(n):
            i = index[n]
            return [it.env[nodes[i]] for it, nodes in zip(interps, self.nodes)]

        for i, node in enumerate(self.nodes[0]):
            if node.op == "output":
                break
            values = []
            for it, nodes in zip(interps, self.nodes):
                n = nodes[i]
                it.env[n] = it.run_node(n)
                values.append(it.env[n])
            on_node(node, values, env)
            if until is not None and node.name == until:
                break
            for j in self.free_after.get(i, ()):
                for it, nodes in zip(interps, self.nodes):
                    it.env.pop(nodes[j], None)


def sample_positions(n_positions: int, keep: int, gen: torch.Generator, device):
    """Indices of at most ``keep`` of ``n_positions`` positions (all of them,
    ``None``, when there are no more than ``keep``)."""
    if not keep or n_positions <= keep:
        return None
    return torch.randperm(n_positions, generator=gen)[:keep].to(device)
