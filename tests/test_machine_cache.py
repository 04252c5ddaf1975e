"""The per-machine measurement cache under concurrency: processes started together (two
pytest lanes, Ray replicas, a server beside a CLI job) measure one at a time, and no entry
one of them stored is dropped by another's write."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from sureserve.loading import machine


def _together(*calls: Any) -> list[Any]:
    """Run the calls on threads released at the same moment; their results in order."""
    go, results = threading.Barrier(len(calls)), [None] * len(calls)

    def run(i: int) -> None:
        go.wait()
        results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def test_entries_measured_at_once_are_all_kept_and_never_overlap(tmp_path: Path) -> None:
    spans: list[tuple[float, float]] = []

    def slow(value: float) -> Any:
        def measure() -> list[float]:
            start = time.perf_counter()
            time.sleep(0.3)  # both callers have read the (empty) file by now
            spans.append((start, time.perf_counter()))
            return [value]
        return measure

    got = _together(
        lambda: machine.measured_once(tmp_path, "t", "a", slow(1.0), lambda v: float(v[0])),
        lambda: machine.measured_once(tmp_path, "t", "b", slow(2.0), lambda v: float(v[0])))
    assert got == [1.0, 2.0]
    [path] = (tmp_path / "machine").glob("t-*.json")
    assert json.loads(path.read_text()) == {"a": [1.0], "b": [2.0]}  # neither write lost
    first, second = sorted(spans)
    assert first[1] <= second[0], spans  # one measurement at a time: none ran on a shared CPU


def test_one_entry_wanted_twice_at_once_is_measured_once(tmp_path: Path) -> None:
    calls: list[int] = []

    def measure() -> list[float]:
        calls.append(1)
        time.sleep(0.2)
        return [len(calls) * 1.0]

    def one() -> float:
        return machine.measured_once(tmp_path, "t", "k", measure, lambda v: float(v[0]))

    assert _together(one, one) == [1.0, 1.0]
    assert len(calls) == 1  # the second caller read what the first stored


def test_cpu_speeds_wanted_twice_at_once_are_measured_once(tmp_path: Path,
                                                          monkeypatch: Any) -> None:
    calls: list[str] = []

    def fake(dtype: str, n: int, seconds: float) -> float:
        calls.append(dtype)
        time.sleep(0.05)
        return 100.0

    monkeypatch.setattr(machine, "gemm_gflops", fake)
    a, b = _together(lambda: machine.cpu_speeds(tmp_path), lambda: machine.cpu_speeds(tmp_path))
    assert a == b == {d: 100.0 for d in machine.DTYPES}
    assert sorted(calls) == sorted(machine.DTYPES)  # one measurement of each dtype


def test_a_home_where_nothing_can_be_written_still_answers(tmp_path: Path) -> None:
    (tmp_path / "machine").write_text("")  # a file where the cache folder would go
    calls: list[int] = []

    def measure() -> list[float]:
        calls.append(1)
        return [3.0]

    for _ in range(2):  # no lock file, nothing stored, no error: measured each time
        assert machine.measured_once(tmp_path, "t", "k", measure, lambda v: float(v[0])) == 3.0
    assert len(calls) == 2
