"""Presenting permutation groups: a table, JSON, networkx and Graphviz.

The JSON form (``groups_to_dict``, schema ``SCHEMA``) is lossless: every
member names the slice of its tensor axis that the group permutes and, where
the permutation is not a plain re-indexing of that slice, how it applies
(``structure``), so ``fxmerge.analysis.apply`` (json and torch only) can apply the
permutations to a state dict. docs/cli.md documents the schema.
"""
from __future__ import annotations

import json
from collections import defaultdict

SCHEMA = "fxmerge-groups/2"


def member_to_dict(m, shape: tuple) -> dict:
    """One ``Member`` as JSON: ``param``, ``axis``, ``start``/``stop`` when
    the slice is not the whole axis, ``structure`` when the re-indexing is
    not plain."""
    d = {"param": m.param, "axis": m.axis}
    if not (m.start == 0 and m.stop == shape[m.axis]):
        d["start"], d["stop"] = m.start, m.stop
    structure = {}
    if m.block_size is not None:
        structure["blocks_of"] = m.block_size
    if m.block is not None:
        structure["permutation"] = m.block
    if m.rows is not None:
        axis, start, stop = m.rows
        structure["rows"] = {"axis": axis, "start": start, "stop": stop}
    if m.depth:
        structure["depth"] = m.depth
    if structure:
        d["structure"] = structure
    return d


def _with_aliases(d: dict, aliases: dict, members) -> list:
    """The member, and the same member under every other state-dict name of
    its tensor (a module shared by two places of the model) that is not a
    member itself."""
    return [d] + [{**d, "param": a} for a in aliases.get(d["param"], ()) if a not in members]


def _marked(d: dict, non_persistent) -> dict:
    """A member that is a non-persistent buffer (outside the state dict,
    rebuilt by the module, such as rotary frequency bands) says so: a state
    dict alone cannot carry its permutation."""
    if d["param"] in non_persistent:
        d["persistent"] = False
    return d


def group_to_dict(g, member_shapes: dict, aliases: dict = None, members=(), non_persistent=()) -> dict:
    aliases = aliases or {}
    d = {
        "id": g.id,
        "kind": g.kind,
        "size": g.size,
        "permutations": g.permutations,
        "members": [d for m in g.slices
                    for d in _with_aliases(_marked(member_to_dict(m, member_shapes[m.param]), non_persistent),
                                           aliases, members)],
        "nodes": list(g.nodes),
        "numel": g.numel,
    }
    if g.parent is not None or g.blocks > 1:
        d["parent"] = g.parent
        d["blocks"] = g.blocks
    return d


def groups_to_dict(pg) -> dict:
    aliases = pg.aliases
    return {
        "schema": SCHEMA,
        "model": pg.model_name,
        "shapes": {alias: list(pg.member_shapes[name]) for name in
                   dict.fromkeys(m.param for g in pg.groups for m in g.slices)
                   for alias in [name] + [a for a in aliases.get(name, ()) if a not in pg.members]},
        "groups": [group_to_dict(g, pg.member_shapes, aliases, pg.members, pg.non_persistent) for g in pg.groups],
        "pinned": [{"op": p.kind, "count": p.count, "reason": p.reason} for p in pg.pinned],
    }


def groups_to_json(pg, **kw) -> str:
    return json.dumps(groups_to_dict(pg), **kw)


def groups_to_networkx(pg):
    """A bipartite graph: group nodes ``("group", id)`` linked to parameter
    nodes ``("param", name)`` (one edge per member slice, keyed by the
    member's JSON fields) and to graph nodes ``("node", name)``; inner groups
    link to their parent."""
    import networkx as nx

    g = nx.MultiGraph(model=pg.model_name, schema=SCHEMA)
    for grp in pg.groups:
        g.add_node(("group", grp.id), kind=grp.kind, size=grp.size, permutations=grp.permutations)
        for m in grp.slices:
            shape = pg.member_shapes[m.param]
            g.add_node(("param", m.param), shape=shape)
            fields = member_to_dict(m, shape)
            g.add_edge(("group", grp.id), ("param", m.param), **{k: v for k, v in fields.items() if k != "param"})
        for n in grp.nodes:
            g.add_edge(("group", grp.id), ("node", n))
        if grp.parent is not None:
            g.add_edge(("group", grp.id), ("group", grp.parent), relation="parent")
    return g


def _member_label(fields: dict) -> str:
    label = f"axis {fields['axis']}"
    if "start" in fields:
        label += f" [{fields['start']}:{fields['stop']}]"
    st = fields.get("structure")
    if st:
        parts = []
        if "blocks_of" in st:
            parts.append(f"blocks of {st['blocks_of']}")
        if "permutation" in st:
            parts.append(f"perm {st['permutation']}")
        if "rows" in st:
            r = st["rows"]
            parts.append(f"rows {r['axis']}[{r['start']}:{r['stop']}]")
        label += " " + ", ".join(parts)
    return label


def groups_to_dot(pg) -> str:
    """Graphviz text: groups and the parameter slices they permute."""
    lines = ["graph permutation_groups {", "  rankdir=LR;", "  node [fontsize=10];"]
    for g in pg.groups:
        lines.append(f'  g{g.id} [shape=box,label="#{g.id} {g.kind}\\n{g.size_label}"];')
        if g.parent is not None:
            lines.append(f"  g{g.id} -- g{g.parent} [style=dashed];")
        for p in dict.fromkeys(m.param for m in g.slices):
            lines.append(f'  "{p}" [shape=ellipse];')
        for m in g.slices:
            fields = member_to_dict(m, pg.member_shapes[m.param])
            lines.append(f'  g{g.id} -- "{m.param}" [label="{_member_label(fields)}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def _fmt_count(n: int) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}k"
    return str(n)


def _summarize_members(members, k) -> str:
    by_module = defaultdict(list)
    for name, axis in members:
        mod, _, leaf = name.rpartition(".")
        by_module[mod].append(f"{leaf}[{axis}]")
    items = []
    for m, v in by_module.items():
        if not m:  # top-level tensors (cls_token, pos_embed)
            items.extend(v)
        else:
            items.append(f"{m}.{{{','.join(v)}}}" if len(v) > 1 else f"{m}.{v[0]}")
    more = f" (+{len(items) - k} modules)" if len(items) > k else ""
    return ", ".join(items[:k]) + more


def groups_table(pg, max_members: int = 3) -> str:
    """A text table: id, kind, size, parameters, members; then the pinned
    op kinds with their reasons."""
    rows = [("id", "kind", "size", "params", "members")]
    for g in pg.groups:
        rows.append((str(g.id), g.kind, g.size_label, _fmt_count(g.numel), _summarize_members(g.members, max_members)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
        if len(lines) == 1:
            lines.append("-" * (sum(widths) + 8 + 20))
    kinds = defaultdict(int)
    for g in pg.groups:
        kinds[g.kind] += 1
    lines.append("")
    lines.append(f"{len(pg.groups)} groups (" + ", ".join(f"{k}: {v}" for k, v in sorted(kinds.items())) + ")")
    if pg.pinned:
        lines.append("pinned op kinds (their axes are never permuted):")
        for p in pg.pinned:
            lines.append(f"  {p.kind} x{p.count}: {p.reason}")
    else:
        lines.append("pinned op kinds: none")
    return "\n".join(lines)
