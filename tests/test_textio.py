import io
from pathlib import Path

import numpy as np
import pytest

from sureserve.errors import BadLineError, InputError
from sureserve.textio import NpyWriter, read_records, windows


def recs(data: bytes, fmt: str, **kw: object) -> list[tuple[int, str]]:
    return [(r.line, r.text) for r in read_records(io.BytesIO(data), fmt, **kw)]  # type: ignore[arg-type]


def test_txt_lines_with_crlf() -> None:
    assert recs(b"a\r\nb\n\nc", ".txt") == [(1, "a"), (2, "b"), (3, ""), (4, "c")]


def test_bad_utf8_names_the_line() -> None:
    with pytest.raises(BadLineError) as exc:
        recs(b"ok\n\xff\xfe bad\nfine\n", ".txt")
    assert exc.value.line == 2 and "line 2" in exc.value.message
    assert "--skip-bad-lines" in exc.value.fix


def test_skip_bad_lines_reports_them() -> None:
    skipped: list[BadLineError] = []
    got = recs(b"ok\n\xff\nfine\n", ".txt", skip=True, skipped=skipped)
    assert got == [(1, "ok"), (3, "fine")]
    assert [e.line for e in skipped] == [2]


def test_jsonl_field_and_bad_lines() -> None:
    data = b'{"text": "a"}\n{"other": 1}\nnot json\n{"text": 5}\n{"text": "b"}\n'
    with pytest.raises(BadLineError) as exc:
        recs(data, ".jsonl")
    assert exc.value.line == 2 and "'text'" in exc.value.message
    skipped: list[BadLineError] = []
    assert recs(data, ".jsonl", skip=True, skipped=skipped) == [(1, "a"), (5, "b")]
    assert [e.line for e in skipped] == [2, 3, 4]


def test_csv_column_with_quoted_newline() -> None:
    data = b'id,body\n1,"hello, world"\n2,"two\nlines"\n3,plain\n'
    assert recs(data, ".csv", field="body") == [(2, "hello, world"), (4, "two\nlines"),
                                                (5, "plain")]


def test_csv_missing_column_is_an_error() -> None:
    with pytest.raises(InputError) as exc:
        recs(b"a,b\n1,2\n", ".csv", field="text")
    assert "--field" in exc.value.fix


def test_windows_bound_memory() -> None:
    sizes = [len(w) for w in windows(iter(range(10)), 4)]  # type: ignore[arg-type]
    assert sizes == [4, 4, 2]


def test_npy_writer_streams_then_finalizes(tmp_path: Path) -> None:
    out = tmp_path / "x.npy"
    w = NpyWriter(out)
    a, b = np.ones((2, 3), np.float32), np.zeros((1, 3), np.float32)
    w.write(a)
    w.write(b)
    w.close()
    np.testing.assert_array_equal(np.load(out), np.vstack([a, b]))
    assert not (tmp_path / "x.npy.partial").exists()
