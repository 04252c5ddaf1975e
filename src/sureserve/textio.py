"""Reading texts from files and writing results, in bounded windows.

Inputs: ``.txt`` (one text per line), ``.jsonl`` (a field of each object), ``.csv`` (a
column), ``.parquet`` (a column; ``line`` is the row's number). Lines are decoded one at a
time so that a bad line is named by its number; with ``skip_bad_lines`` it is reported and
skipped instead of stopping the run. Results are written as they are produced, so an error
late in a file loses nothing already written.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from sureserve.errors import BadLineError, InputError

#: the input formats of file jobs (local and Ray), by suffix
FORMATS = (".txt", ".jsonl", ".csv", ".parquet")
LINE_FORMATS = FORMATS[:3]  # read line by line by ``read_records``


@dataclass(frozen=True)
class Record:
    line: int  # 1-based line number in the input (for csv: the record's first line)
    text: str
    query: str | None = None  # files of (query, text) pairs: this text's query


def bad_line(message: str, line: int, fix: str = "fix that line", what: str = "lines"
             ) -> BadLineError:
    """A line (or row) a job cannot read, with the fix the bad-line policy offers: local
    and Ray jobs, whichever reader found it."""
    return BadLineError(message, f"{fix}, or pass --skip-bad-lines "
                        f"(SURESERVE_SKIP_BAD_LINES=1) to skip such {what}", line=line)


def _decoded_lines(raw: Iterable[bytes], skipped: list[BadLineError],
                   skip: bool) -> Iterator[tuple[int, str]]:
    for n, b in enumerate(raw, start=1):
        try:
            yield n, b.decode("utf-8")
        except UnicodeDecodeError as exc:
            err = bad_line(f"line {n} is not valid UTF-8 ({exc.reason} at byte {exc.start})",
                           n, "fix the file's encoding")
            if not skip:
                raise err from exc
            skipped.append(err)


def read_records(stream: IO[bytes], fmt: str, *, field: str = "text", skip: bool = False,
                 skipped: list[BadLineError] | None = None,
                 query_field: str | None = None) -> Iterator[Record]:
    """Yield records lazily; bad ones raise ``BadLineError`` or go to ``skipped``.
    ``query_field``: (query, text) pairs, each record's query from that field too."""
    skipped = skipped if skipped is not None else []
    lines = _decoded_lines(stream, skipped, skip)
    if query_field is not None and fmt == ".txt":
        raise InputError("a .txt file holds one text per line, no (query, text) pairs",
                         f"give pairs as .jsonl, .csv or .parquet with a {query_field!r} "
                         "field")
    if fmt == ".txt":
        for n, s in lines:
            yield Record(n, s.rstrip("\r\n"))
    elif fmt == ".jsonl":
        yield from _jsonl(lines, field, skip, skipped, query_field)
    elif fmt == ".csv":
        yield from _csv(lines, field, skip, skipped, query_field)
    else:
        raise InputError(f"unknown input format {fmt!r}",
                         f"use one of {', '.join(LINE_FORMATS)}")


def read_items(source: Path | None, field: str = "text", query_field: str | None = None
               ) -> Iterator[Record | BadLineError]:
    """Every record of a file in order, each bad line in its place as a ``BadLineError``
    (the caller decides whether it stops the job); ``source`` None reads stdin, one text
    per line. Lazy: memory stays bounded on files larger than RAM. ``query_field``: a file
    of (query, text) pairs."""
    if source is None:
        if query_field is not None:
            raise InputError("(query, text) pairs are read from a file",
                             "give --input pairs.jsonl (or .csv, .parquet)")
        yield from _interleaved(sys.stdin.buffer, ".txt", field)
        return
    fmt = source.suffix.lower()
    if fmt not in FORMATS:
        raise InputError(f"unknown input format {fmt!r}", f"use one of {', '.join(FORMATS)}")
    if not source.is_file():
        raise InputError(f"no input file at {source}", "check the --input path")
    if fmt == ".parquet":
        yield from _parquet(source, field, query_field=query_field)
        return
    with open(source, "rb") as fh:
        yield from _interleaved(fh, fmt, field, query_field)


def _interleaved(stream: IO[bytes], fmt: str, field: str, query_field: str | None = None
                 ) -> Iterator[Record | BadLineError]:
    skipped: list[BadLineError] = []
    seen = 0
    for rec in read_records(stream, fmt, field=field, skip=True, skipped=skipped,
                            query_field=query_field):
        yield from skipped[seen:]  # bad lines met before this record
        seen = len(skipped)
        yield rec
    yield from skipped[seen:]


def _parquet(path: Path, field: str, rows: int = 1024, query_field: str | None = None
             ) -> Iterator[Record | BadLineError]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise InputError("reading Parquet needs pyarrow, which is not installed",
                         "pip install pyarrow (it comes with sureserve[ray])") from exc
    f = pq.ParquetFile(path)
    columns = [field] + ([query_field] if query_field is not None else [])
    for col in columns:
        if col not in f.schema_arrow.names:
            raise InputError(f"the Parquet file has no column {col!r} (columns: "
                             f"{f.schema_arrow.names})", "name the column with --field "
                             "(--query-field for the queries of pairs)")
    n = 0
    for batch in f.iter_batches(batch_size=rows, columns=columns):
        queries = batch.column(1).to_pylist() if query_field is not None \
            else [None] * batch.num_rows
        for text, query in zip(batch.column(0).to_pylist(), queries, strict=True):
            n += 1
            if not isinstance(text, str):
                yield bad_line(f"row {n}: no text in {field!r}", n, "fix that row", "rows")
            elif query_field is not None and not (isinstance(query, str) and query.strip()):
                yield bad_line(f"row {n}: no query in {query_field!r}", n, "fix that row",
                               "rows")
            else:
                yield Record(n, text, query)


def _bad(n: int, what: str, skip: bool, skipped: list[BadLineError]) -> None:
    err = bad_line(f"line {n}: {what}", n)
    if not skip:
        raise err
    skipped.append(err)


def _jsonl(lines: Iterator[tuple[int, str]], field: str, skip: bool,
           skipped: list[BadLineError], query_field: str | None = None) -> Iterator[Record]:
    for n, s in lines:
        if not s.strip():
            continue
        try:
            obj = json.loads(s)
        except json.JSONDecodeError as exc:
            _bad(n, f"not valid JSON ({exc.msg})", skip, skipped)
            continue
        value = obj.get(field) if isinstance(obj, dict) else None
        if not isinstance(value, str):
            _bad(n, f"no string field {field!r}" + ("" if value is None else
                 f" (found {type(value).__name__})"), skip, skipped)
            continue
        query = None
        if query_field is not None:
            query = obj.get(query_field)
            if not (isinstance(query, str) and query.strip()):
                _bad(n, f"no non-empty string field {query_field!r}", skip, skipped)
                continue
        yield Record(n, value, query)


def _csv(lines: Iterator[tuple[int, str]], column: str, skip: bool,
         skipped: list[BadLineError], query_column: str | None = None) -> Iterator[Record]:
    current = [0]

    def tracked() -> Iterator[str]:
        for n, s in lines:
            current[0] = n
            yield s

    reader = csv.reader(tracked())
    header = next(reader, None)
    if header is None:
        return
    for name in [column] + ([query_column] if query_column is not None else []):
        if name not in header:
            raise InputError(f"the CSV header has no column {name!r} (columns: {header})",
                             "name the column with --field (--query-field for the queries "
                             "of pairs)")
    col = header.index(column)
    qcol = header.index(query_column) if query_column is not None else None
    for row in reader:
        if not row:
            continue
        if max(col, qcol or 0) >= len(row):
            _bad(current[0], f"only {len(row)} columns", skip, skipped)
            continue
        if qcol is not None and not row[qcol].strip():
            _bad(current[0], f"empty query in {query_column!r}", skip, skipped)
            continue
        yield Record(current[0], row[col], row[qcol] if qcol is not None else None)


def windows(records: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of at most ``size`` records: memory stays bounded on huge files."""
    buf: list[Any] = []
    for r in records:
        buf.append(r)
        if len(buf) >= size:
            yield buf
            buf = []
    if buf:
        yield buf


class JsonlWriter:
    def __init__(self, path: Path | None) -> None:
        self.fh: IO[str] = open(path, "w", encoding="utf-8") if path else sys.stdout  # noqa: SIM115

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        for r in rows:
            self.fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        self.fh.flush()

    def close(self) -> None:
        if self.fh is not sys.stdout:
            self.fh.close()


class NpyWriter:
    """Writes rows to ``PATH.partial`` as they come; ``close`` turns that into ``PATH``.

    The .npy header needs the final row count, which a streamed run only knows at the end.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.partial = path.with_name(path.name + ".partial")
        self.fh: IO[bytes] = open(self.partial, "wb")  # noqa: SIM115
        self.rows = 0
        self.dim: int | None = None
        self.dtype: np.dtype[Any] | None = None  # float32, or a quantized vector's integers

    def write(self, arr: np.ndarray) -> None:
        if arr.dtype.kind == "f":
            arr = arr.astype(np.float32)
        arr = np.ascontiguousarray(arr)
        self.dim = arr.shape[1] if self.dim is None else self.dim
        self.dtype = arr.dtype if self.dtype is None else self.dtype
        self.fh.write(arr.astype(self.dtype).tobytes())
        self.rows += arr.shape[0]

    def close(self) -> None:
        self.fh.close()
        shape = (self.rows, self.dim or 0)
        with open(self.path, "wb") as out, open(self.partial, "rb") as raw:
            descr = np.lib.format.dtype_to_descr(self.dtype or np.dtype(np.float32))
            np.lib.format.write_array_header_1_0(
                out, {"descr": descr, "fortran_order": False, "shape": shape})
            while chunk := raw.read(1 << 20):
                out.write(chunk)
        self.partial.unlink()
