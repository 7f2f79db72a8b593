"""Folding statistics of the weights into constants, right after tracing.

Weight standardisation (timm's ``StdConv2d`` / ``ScaledStdConv2d``, NFNets,
or written by hand: each filter normalised over its inputs in ``forward``)
and weight normalisation compute a layer's weight from its parameters alone.
Traced, that is a reduction over the weight's input axis, which couples the
channels: widened, the zero columns of the other model would enter every
filter's mean and variance. The computation reads no input, so its value is
fixed once the model is: ``fold_weight_statistics`` evaluates it at trace
time and the layer reads the result as a constant (a parameter named
``fxm_folded_<node>``) that permutes, widens and merges like any weight;
each model's filters are standardised over their own inputs, so the 2x
merge is the ensemble.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

# ops whose presence makes a parameter-only computation a statistic of the
# weights (what couples channels); reshapes and indexing alone stay in the graph
FOLDED_PREFIX = "fxm_folded_"
_STATISTICS = {"mean", "var", "std", "var_mean", "std_mean", "norm", "sum", "batch_norm", "layer_norm",
               "group_norm", "instance_norm", "normalize", "vector_norm", "rsqrt", "amax"}


def _op_name(n: fx.Node) -> str:
    if n.op == "call_method":
        return n.target
    return getattr(n.target, "__name__", str(n.target))


def parameter_only(gm: fx.GraphModule) -> set:
    """Nodes computed from parameters, buffers and constants alone."""
    out: set = set()
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            out.add(n)
        elif n.op in ("call_function", "call_method") and n.all_input_nodes and all(
                i in out for i in n.all_input_nodes) and n.target is not operator.setitem:
            out.add(n)
    return out


def fold_weight_statistics(gm: fx.GraphModule) -> list:
    """Replace every parameter-only computation that takes statistics of a
    weight, where the rest of the graph reads it, by its value. Returns the
    folded nodes' names."""
    fixed = parameter_only(gm)
    statistic: set = set()
    for n in gm.graph.nodes:
        if n in fixed and n.op != "get_attr" and (
                _op_name(n) in _STATISTICS or any(i in statistic for i in n.all_input_nodes)):
            statistic.add(n)
    frontier = [n for n in gm.graph.nodes if n in statistic and any(u not in fixed for u in n.users)]
    if not frontier:
        return []
    interpreter = fx.Interpreter(gm)
    with torch.no_grad():
        for n in gm.graph.nodes:
            if n in fixed:
                interpreter.env[n] = interpreter.run_node(n)
    for n in frontier:
        name = f"{FOLDED_PREFIX}{n.name}"
        gm.register_parameter(name, torch.nn.Parameter(interpreter.env[n].detach().clone(), requires_grad=False))
        with gm.graph.inserting_before(n):
            constant = gm.graph.get_attr(name)
        n.replace_all_uses_with(constant, delete_user_cb=lambda u: u not in fixed)
    _drop_unused(gm, fixed)
    gm.recompile()
    return [n.name for n in frontier]


def _drop_unused(gm: fx.GraphModule, candidates: set) -> None:
    """Erase the parameter-only nodes nothing reads any more, and the
    parameters only they read (the folded value replaces them)."""
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    targets = set()
    for n in reversed(list(gm.graph.nodes)):
        if n in candidates and not n.users:
            if n.op == "get_attr":
                targets.add(n.target)
            gm.graph.erase_node(n)
    still_read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for target in targets - still_read:
        owner_path, _, leaf = target.rpartition(".")
        if any(owner_path == c or owner_path.startswith(c + ".") for c in called):
            continue  # a module the graph calls keeps its own parameters
        owner = gm.get_submodule(owner_path) if owner_path else gm
        delattr(owner, leaf)
