import threading
import time
from pathlib import Path

import pytest

from sureserve.zoo.cache import cached_build, is_complete


def test_builds_once_and_reuses(tmp_path: Path) -> None:
    calls = []

    def build(d: Path) -> None:
        calls.append(d)
        (d / "f").write_text("x")

    final = tmp_path / "entry"
    assert cached_build(final, build) == final
    assert cached_build(final, build) == final
    assert len(calls) == 1 and (final / "f").read_text() == "x" and is_complete(final)


def test_failed_build_leaves_nothing_usable(tmp_path: Path) -> None:
    def broken(d: Path) -> None:
        (d / "half").write_text("x")
        raise RuntimeError("boom")

    final = tmp_path / "entry"
    with pytest.raises(RuntimeError):
        cached_build(final, broken)
    assert not final.exists()
    assert not list(tmp_path.glob(".entry.tmp-*"))


def test_half_built_entry_without_marker_is_rebuilt(tmp_path: Path) -> None:
    final = tmp_path / "entry"
    final.mkdir()
    (final / "junk").write_text("partial")
    cached_build(final, lambda d: (d / "good").write_text("ok"))
    assert (final / "good").exists() and not (final / "junk").exists()


def test_concurrent_builders_build_once(tmp_path: Path) -> None:
    calls = []

    def slow(d: Path) -> None:
        calls.append(1)
        time.sleep(0.3)
        (d / "f").write_text("x")

    final = tmp_path / "entry"
    threads = [threading.Thread(target=cached_build, args=(final, slow)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and is_complete(final)
