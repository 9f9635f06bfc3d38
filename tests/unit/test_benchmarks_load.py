"""Every benchmark loads: its imports resolve against today's tree. A benchmark is run by hand, so
a moved module breaks it silently until someone needs its numbers (benchmarks/federation_round.py
imported test_faults after the tests moved into folders, and issue 45's figures could not be
taken until it was fixed). Slow (SLOW_CI): one process importing every benchmark's dependencies,
about 15 s."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

LOAD_ALL = """
import importlib.util, sys
from pathlib import Path
sys.path.insert(0, "benchmarks")  # as for `python benchmarks/NAME.py`: its siblings import by name
failed = []
for path in sorted(Path("benchmarks").glob("*.py")):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(path.stem, module)
    try:
        spec.loader.exec_module(module)  # top level only: each runs its work under __main__
    except Exception as err:
        failed.append(f"{path}: {type(err).__name__}: {err}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


@pytest.mark.slow
def test_every_benchmark_loads_against_todays_tree() -> None:
    assert list((REPO / "benchmarks").glob("*.py")), "no benchmark found"
    done = subprocess.run([sys.executable, "-c", LOAD_ALL], cwd=REPO, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
