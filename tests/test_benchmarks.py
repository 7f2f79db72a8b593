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
