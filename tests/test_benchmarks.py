"""The benchmark scripts are not run by the tests (they take hours), but
each must at least compile and answer ``--help`` on this interpreter."""
import pathlib
import subprocess
import sys

import pytest

SCRIPTS = sorted((pathlib.Path(__file__).parent.parent / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s.name not in ("common.py", "__init__.py")], ids=lambda s: s.name)
def test_benchmark_script_answers_help(script):
    out = subprocess.run([sys.executable, "-m", f"benchmarks.{script.stem}", "--help"], capture_output=True, text=True, timeout=120,
                         cwd=script.parent.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout


def test_shared_benchmark_module_compiles():
    compile((SCRIPTS[0].parent / "common.py").read_text(), "common.py", "exec")


def test_a_page_is_stale_unless_it_states_a_commit_fxmerge_has_not_changed_since():
    sys.path.insert(0, str(SCRIPTS[0].parent.parent))
    from benchmarks.provenance import _git, staleness

    head = _git("rev-parse", "--short", "HEAD")
    assert staleness(f"Produced by `make x`; fxmerge 0.3.0 at commit {head}; 2 CPU threads.") == ""
    assert staleness("Produced by `make x`; fxmerge 0.3.0; 2 CPU threads.") == "states no commit"
    assert "uncommitted" in staleness(f"Produced by `make x` at commit {head}+changes.")
    assert "not in this repository" in staleness("Produced by `make x` at commit 0000000.")
