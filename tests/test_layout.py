"""The package reads as a compiler: its import graph (every import, those
inside functions included) has no cycle, imports only go down the stages
(runtime < analysis < merging < fit < the public face), no module imports
another's private name, and modules and functions stay short."""
from __future__ import annotations

import ast
import pathlib

import networkx as nx

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "fxmerge"
# the leaves every stage may read, then the stages from the bottom up; the rest is the public face
STAGES = {"constants": 0, "errors": 0, "methods": 0, "runtime": 1, "analysis": 2, "merging": 3, "fit": 4}
FACE = 5
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 100
MAX_MERGE_LINES = 40


def module_name(path: pathlib.Path) -> str:
    parts = ("fxmerge",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def resolve(importer: str, node) -> list:
    """The fxmerge modules an import statement reads, with the names it takes."""
    if isinstance(node, ast.Import):
        return [(a.name, None) for a in node.names if a.name.startswith("fxmerge")]
    if node.module == "__future__":
        return []
    if node.level:
        base = importer.split(".")
        if not MODULES[importer].name == "__init__.py":
            base = base[:-1]
        base = base[:len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not target.startswith("fxmerge"):
        return []
    out = []
    for a in node.names:
        sub = f"{target}.{a.name}"
        out.append((sub, None) if sub in MODULES else (target, a.name))
    return out


def import_graph():
    graph, private = nx.DiGraph(), []
    for name, path in MODULES.items():
        graph.add_node(name)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target, taken in resolve(name, node):
                    if target != name and target != "fxmerge":  # the package's face hands names on
                        graph.add_edge(name, target)
                    if taken and taken.startswith("_") and not taken.startswith("__"):
                        private.append(f"{name} imports {target}.{taken}")
    return graph, private


def stage_of(module: str) -> int:
    parts = module.split(".")
    return STAGES.get(parts[1], FACE) if len(parts) > 1 else FACE


def test_the_import_graph_has_no_cycle():
    graph, _ = import_graph()
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, f"import cycles: {cycles[:3]}"


def test_no_module_imports_a_private_name_of_another():
    _, private = import_graph()
    assert not private, private


def test_imports_only_go_down_the_stages():
    graph, _ = import_graph()
    up = [f"{a} -> {b}" for a, b in graph.edges if stage_of(b) > stage_of(a)]
    assert not up, up


def test_every_stage_is_a_package_that_says_what_it_reads_and_produces():
    for stage in ("runtime", "analysis", "merging", "fit"):
        doc = ast.get_docstring(ast.parse((PACKAGE / stage / "__init__.py").read_text()))
        assert doc and len(doc.split()) > 30, stage


def test_modules_and_functions_stay_short():
    long_modules = [n for n, p in MODULES.items() if len(p.read_text().splitlines()) > MAX_MODULE_LINES]
    long_functions = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}.{node.name}")
    assert not long_modules, long_modules
    assert not long_functions, long_functions


def test_merge_is_the_pipeline_only():
    tree = ast.parse((PACKAGE / "api.py").read_text())
    merge = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "merge")
    body = merge.body[1:] if ast.get_docstring(merge) else merge.body
    lines = body[-1].end_lineno - body[0].lineno + 1
    assert lines < MAX_MERGE_LINES, lines


def test_no_code_outside_the_registry_compares_a_method_name():
    names = {'"pleas"', '"perm"', '"zipit"', '"rebasin"', '"regmean"', '"avg"', '"ensemble"'}
    found = []
    for name, path in MODULES.items():
        if name == "fxmerge.methods":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                text = ast.unparse(node)
                if "method" in text and any(n in text.replace("'", '"') for n in names):
                    found.append(f"{name}: {text}")
    assert not found, found


def test_the_docs_method_table_is_the_registry():
    from fxmerge.methods import methods_table

    assert methods_table() in (PACKAGE.parent / "docs" / "architecture.md").read_text()
