"""The one file-job driver (``jobs.drive``) and reader (``textio.read_items``), without a
model: bad-line policy, writers by suffix, totals. Local and Ray jobs both go through them
(the end-to-end tests run each)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sureserve.engine import RunSummary
from sureserve.errors import BadLineError
from sureserve.jobs import Window, drive
from sureserve.settings import Settings
from sureserve.textio import Record, read_items


def _bad(line: int) -> BadLineError:
    return BadLineError(f"line {line}: not valid JSON", "fix it", line=line)


def _window(rows: list[tuple[int, int]], bad: dict[int, BadLineError], texts: int
            ) -> Window:
    """Rows (index, line) of 2-d embeddings, with bad lines inserted before the row at
    the given position."""
    items: list[object] = []
    for k, (i, line) in enumerate(rows):
        if k in bad:
            items.append(bad[k])
        items.append((i, line, np.array([float(i), 1.0], np.float32),
                      {"truncated": False, "chunks": 1}))
    summary = RunSummary(texts=texts, real_tokens=10 * texts, computed_tokens=12 * texts,
                         limit=128, bound_by="the model", policy="truncate",
                         truncated=[rows[0][0]] if rows else [])
    return Window(items, summary)  # type: ignore[arg-type]


def test_a_bad_line_stops_after_the_rows_before_it(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    windows = [_window([(0, 1), (1, 2)], {}, 2),
               _window([(2, 3), (3, 5)], {1: _bad(4)}, 2)]
    total = RunSummary()
    with pytest.raises(BadLineError) as err:
        drive("embed", windows, out, Settings(), print, {}, total)
    assert err.value.line == 4
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["index"], r["line"]) for r in rows] == [(0, 1), (1, 2), (2, 3)]
    assert total.texts == 2  # the summary of what finished, for the caller's report


@pytest.mark.parametrize("suffix", [".jsonl", ".npy", ".parquet"])
def test_skipped_lines_are_reported_and_the_totals_add_up(tmp_path: Path, suffix: str) -> None:
    out = tmp_path / f"out{suffix}"
    said: list[str] = []
    windows = [_window([(0, 1), (1, 3)], {1: _bad(2)}, 2),
               Window([_bad(4)], RunSummary()),  # a window of bad lines only
               _window([(2, 5)], {}, 1)]
    total = RunSummary()
    skipped = drive("embed", windows, out, Settings(skip_bad_lines=True), said.append, {},
                    total)
    assert skipped == 2 and sum("skipped" in s for s in said) == 2
    assert (total.texts, total.real_tokens, total.computed_tokens) == (3, 30, 36)
    assert total.truncated == [0, 2] and total.limit == 128 and total.policy == "truncate"
    if suffix == ".npy":
        assert np.load(out)[:, 0].tolist() == [0.0, 1.0, 2.0]
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(out).to_pydict()
        assert table["index"] == [0, 1, 2] and table["line"] == [1, 3, 5]
    else:
        assert [json.loads(x)["line"] for x in out.read_text().splitlines()] == [1, 3, 5]


def test_no_output_file_until_a_row_exists(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    with pytest.raises(BadLineError):
        drive("embed", [Window([_bad(1)], RunSummary())], out, Settings(), print, {},
              RunSummary())
    assert not out.exists() and not (tmp_path / "out.parquet.partial").exists()


def test_read_items_keeps_bad_lines_in_place_for_every_format(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"text": "a"}\nnot json\n{"text": "b"}\n{"other": 1}\n')
    got = [(type(x).__name__, x.line) for x in read_items(src)]
    assert got == [("Record", 1), ("BadLineError", 2), ("Record", 3), ("BadLineError", 4)]
    pq.write_table(pa.table({"body": ["x", None, "z"]}), tmp_path / "in.parquet")
    got = list(read_items(tmp_path / "in.parquet", "body"))
    assert isinstance(got[1], BadLineError) and got[1].line == 2
    assert [r for r in got if isinstance(r, Record)] == [Record(1, "x"), Record(3, "z")]
