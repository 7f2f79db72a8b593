"""The reference applier of exported permutation groups.

Given the JSON that ``fxmerge groups --json`` or ``PermutationGroups.to_json()``
writes, and a plain state dict, ``apply_permutations`` permutes every member
of every group, so the model computes the same function with its features
reordered. It needs ``json`` and ``torch`` only: copy this file into any
project that wants to use fxmerge's groups (for pruning, for its own merging
code) without depending on fxmerge.

Semantics (schema ``fxmerge-groups/2``, documented in docs/cli.md): a group
holds ``permutations`` permutations of ``size`` entries (``new[i] =
old[perm[i]]``). A member re-indexes the slice ``[start, stop)`` (the whole
axis when absent) of axis ``axis`` of tensor ``param``:

* plainly, by the group's permutation;
* ``structure.blocks_of = n``: the slice is blocks of ``n`` entries that
  move whole (block ``p`` of the new slice is block ``perm[p]`` of the old);
* ``structure.permutation = b``: by the group's ``b``-th permutation;
* ``structure.rows = {axis, start, stop}``: only where the index along that
  other axis lies in ``[start, stop)``.

A member with ``"persistent": false`` is a non-persistent buffer (rotary
frequency bands, cached tables): a saved state dict does not hold it.
``apply_to_model`` permutes a module in place, buffers included.

All re-indexings are stated in the unpermuted tensor's coordinates; applying
members with ``rows`` first, then the others from the deepest
``structure.depth`` to the shallowest, composes them correctly.
"""
from __future__ import annotations

import json
from typing import Optional, Union

import torch


def load_groups(source: Union[str, dict]) -> dict:
    """The exported groups from a JSON string, a file path, or a parsed dict."""
    if isinstance(source, dict):
        return source
    text = source
    if not source.lstrip().startswith("{"):
        with open(source) as f:
            text = f.read()
    groups = json.loads(text)
    schema = groups.get("schema", "")
    if not schema.startswith("fxmerge-groups/2"):
        raise ValueError(f"unsupported groups schema {schema!r}: export with fxmerge 0.3 or later")
    return groups


def random_permutations(groups: Union[str, dict], seed: int = 0) -> dict:
    """One random permutation per permutation slot of every group:
    ``{group id: [perm, ...]}``."""
    groups = load_groups(groups)
    gen = torch.Generator().manual_seed(seed)
    return {g["id"]: [torch.randperm(g["size"], generator=gen) for _ in range(g["permutations"])]
            for g in groups["groups"]}


def apply_permutations(state: dict, groups: Union[str, dict], permutations: Optional[dict] = None,
                       seed: int = 0) -> dict:
    """A new state dict with every group's permutation applied to its
    members. ``permutations``: ``{group id: perm or [perm per slot]}``
    (a group left out keeps its order); default: random ones from ``seed``.
    Tensors that no group touches are passed through."""
    groups = load_groups(groups)
    if permutations is None:
        permutations = random_permutations(groups, seed)
    by_param: dict = {}
    for g in groups["groups"]:
        perms = permutations.get(g["id"], permutations.get(str(g["id"])))
        if perms is None:
            continue
        if torch.is_tensor(perms) or (isinstance(perms, (list, tuple)) and perms and isinstance(perms[0], int)):
            perms = [perms]
        perms = [torch.as_tensor(p, dtype=torch.long) for p in perms]
        for m in g["members"]:
            if m["param"] in state:
                by_param.setdefault(m["param"], []).append((m, perms))
    out = dict(state)
    for name, items in by_param.items():
        items.sort(key=lambda mp: (0 if "rows" in mp[0].get("structure", {}) else 1,
                                   -mp[0].get("structure", {}).get("depth", 0)))
        t = state[name]
        for m, perms in items:
            t = _reindex(t, m, perms)
        out[name] = t
    return out


def _reindex(t: torch.Tensor, m: dict, perms: list) -> torch.Tensor:
    st = m.get("structure", {})
    axis = m["axis"]
    start = m.get("start", 0)
    stop = m.get("stop", t.shape[axis])
    perm = perms[st.get("permutation", 0)].to(t.device)
    n = st.get("blocks_of")
    if n is not None:
        perm = (perm[:, None] * n + torch.arange(n, device=t.device)[None, :]).reshape(-1)
    if len(perm) != stop - start:
        raise ValueError(f"'{m['param']}' axis {axis}: a permutation of {len(perm)} for a slice of {stop - start}")
    t = t.clone()
    view = t
    rows = st.get("rows")
    if rows is not None:
        view = view.narrow(rows["axis"], rows["start"], rows["stop"] - rows["start"])
    part = view.narrow(axis, start, stop - start)
    part.copy_(part.index_select(axis, perm))
    return t


def apply_to_model(model: torch.nn.Module, groups: Union[str, dict], permutations: Optional[dict] = None,
                   seed: int = 0) -> torch.nn.Module:
    """Permute ``model`` in place (its state dict and its non-persistent
    buffers, which a saved state dict does not carry) and return it."""
    state = {**model.state_dict(), **dict(model.named_buffers())}
    with torch.no_grad():
        for name, t in apply_permutations(state, groups, permutations, seed).items():
            if t is state[name]:
                continue  # untouched
            owner = model
            *path, leaf = name.split(".")
            for part in path:
                owner = getattr(owner, part)
            getattr(owner, leaf).copy_(t)
    return model

