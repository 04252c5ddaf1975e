"""``scripts/test_lanes.py``, the runner ``make test`` calls: its exit status, and one real
run of both lanes on a tiny selection (a preset machine kind written once and removed)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "test_lanes.py"


def _runner():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("test_lanes", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("rest", "ray", "code"), [
    (0, 0, 0), (1, 0, 1), (0, 1, 1), (2, 1, 2), (1, 2, 1),
    (0, 5, 0), (5, 0, 0),  # one lane had nothing to run: not a failure
    (5, 1, 1), (1, 5, 1),  # ... but the other lane's failure still is
    (5, 5, 5),  # nothing ran at all: pytest's own "no tests collected"
])
def test_the_exit_status_is_the_first_failure(rest: int, ray: int, code: int) -> None:
    assert _runner().combined(rest, ray) == code


def test_a_selection_without_ray_tests_passes_and_the_preset_is_removed(
        tmp_path: Path) -> None:
    home = tmp_path / "home"
    # the outer run's own preset and lanes stay out of it: this home, this kind only
    env = {k: v for k, v in os.environ.items()
           if k not in ("SURESERVE_TEST_PRESET_HELD", "SURESERVE_TEST_LANES")}
    env.update(SURESERVE_HOME=str(home), SURESERVE_TEST_MACHINE_KIND="bf16-slower")
    r = subprocess.run([sys.executable, str(SCRIPT), "-q", "-p", "no:cacheprovider",
                        "tests/test_planner.py", "-k", "test_sorting_cuts_padding"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "1 passed" in out and "the Ray lane exited 5" in out, out
    # written once for both lanes, gone after both
    assert not list((home / "machine").glob("*.json")), list((home / "machine").iterdir())
