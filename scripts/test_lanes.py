"""`make test`'s pytest: the Ray tests and the rest in two pytest processes side by side.

Why: the suite is one CPU-bound lane and one that waits. The Ray tests spend much of their
time on what Ray does between our steps (processes starting, the autoscaler's delays, a
killed replica's replacement); run alone at the end of the serial suite they left the two
cores ~25% idle, so running them beside everything else costs the rest less than their own
length (measured on a 2-core AMD EPYC: serial 501 s; side by side, the Ray lane 398 s and
the rest 386 s, 402 s for both: BENCHMARKS.md "Test suite time"). Two lanes, not
pytest-xdist's N workers: each extra torch lane beyond one CPU-bound and one waiting lane
only makes the two cores contend (measured in the sixth session).

The lanes are the ``ray`` marker (``tests/conftest.py``) and everything else, so every test
runs exactly once, in the same order within its lane as in a plain ``pytest``. Each lane has
its own ``--basetemp``. A machine-kind preset (``SURESERVE_TEST_MACHINE_KIND``) is written
once here, for both, and removed when both have ended. Extra arguments go to both lanes.
``SURESERVE_TEST_LANES=1`` runs the plain serial suite instead.

Output: the main lane streams; the Ray lane's is printed whole when it ends (two streams
interleaved line by line would be unreadable). The exit status is the first non-zero of the
two (pytest's own codes).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTEST = [sys.executable, "-m", "pytest"]
NO_TESTS = 5  # pytest.ExitCode.NO_TESTS_COLLECTED


def combined(rest: int, ray: int) -> int:
    """The runner's exit status from the two lanes': the first failure; a lane that had
    nothing to run counts as passed unless neither lane had anything."""
    if rest == ray == NO_TESTS:
        return NO_TESTS
    codes = [c for c in (rest, ray) if c not in (0, NO_TESTS)]
    return codes[0] if codes else 0


def _preset() -> list[Path]:
    """The machine-kind preset, once for both lanes (each lane would otherwise remove the
    files at its end while the other still reads them)."""
    kind = os.environ.get("SURESERVE_TEST_MACHINE_KIND")
    if not kind:
        return []
    from sureserve.loading import machine
    from sureserve.settings import Settings

    try:
        return machine.preset_kind(Settings().home_dir(), kind)
    except ValueError as exc:
        sys.exit(f"SURESERVE_TEST_MACHINE_KIND={kind}: {exc}")


def main(args: list[str]) -> int:
    if os.environ.get("SURESERVE_TEST_LANES") == "1":
        return subprocess.call([*PYTEST, *args], cwd=ROOT)
    preset = _preset()
    env = {**os.environ, "SURESERVE_TEST_PRESET_HELD": "1"} if preset else dict(os.environ)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="sureserve-lanes-") as tmp:
        ray_log = Path(tmp) / "ray.log"
        with ray_log.open("w") as out:
            ray = subprocess.Popen([*PYTEST, "-m", "ray", "--basetemp", f"{tmp}/ray", *args],
                                   cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
            try:
                print("pytest lanes: the Ray tests in the background (printed when they "
                      "end), the rest here", flush=True)
                rest = subprocess.call([*PYTEST, "-m", "not ray", "--basetemp",
                                        f"{tmp}/rest", *args], cwd=ROOT, env=env)
                rest_s = time.monotonic() - started
                ray_code = ray.wait()
            finally:
                if ray.poll() is None:  # interrupted: take the Ray lane down too
                    ray.terminate()
                    ray.wait(timeout=60)
                for path in preset:
                    path.unlink(missing_ok=True)
        print(f"\n===== the Ray lane (pytest -m ray) =====\n{ray_log.read_text()}", flush=True)
    total = time.monotonic() - started
    print(f"pytest lanes: the rest exited {rest} after {rest_s:.1f} s, the Ray lane exited "
          f"{ray_code}; both done in {total:.1f} s", flush=True)
    return combined(rest, ray_code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
