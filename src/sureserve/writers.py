"""Where a file job's rows go, in input order, chosen by the output's suffix: JSONL (a file
or stdout), ``.npy`` (embeddings) or Parquet, each row with ``index``, ``line`` and the
text's flags. The one set of writers for local and Ray jobs (``jobs.drive``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sureserve.textio import JsonlWriter, NpyWriter

Row = tuple[int, int, Any, dict[str, Any]]  # index, line, output, flags


def output_row(task_name: str, index: int, line: int, out: Any, flags: dict[str, Any],
               options: dict[str, Any]) -> dict[str, Any]:
    """One JSONL output row: the output, ``index``, ``line`` and the text's flags."""
    if task_name == "embed":
        item: dict[str, Any] = {"embedding": np.asarray(out).tolist()}
    elif task_name == "sparse":  # token id -> weight, strongest first (and id -> token)
        item = {"sparse": {str(t["index"]): t["value"] for t in out}}
        if options.get("tokens"):
            item["tokens"] = {str(t["index"]): t["token"] for t in out}
    elif task_name == "pairs":  # a (query, text) pair's relevance, in input order
        item = {"score": float(out)}
    elif task_name == "rerank":  # a ranked document: index, score (and text), best first
        return {**out, "line": line}
    else:
        # each label dict: label and score (the row itself carries the flags)
        item = dict(out) if options.get("top_k") == 1 else {
            "labels": [{"label": d["label"], "score": d["score"]} for d in out]}
    return {**item, "index": index, "line": line, **flags}


class _Jsonl:
    def __init__(self, path: Path | None, task: str) -> None:
        self.out, self.task = JsonlWriter(path), task

    def write(self, rows: list[Row], options: dict[str, Any]) -> None:
        self.out.write(output_row(self.task, i, line, out, flags, options)
                       for i, line, out, flags in rows)

    def close(self) -> None:
        self.out.close()


class _Npy:
    def __init__(self, path: Path) -> None:
        self.out = NpyWriter(path)

    def write(self, rows: list[Row], options: dict[str, Any]) -> None:
        # quantized vectors keep their integer type (int8, uint8, packed bits)
        self.out.write(np.stack([np.asarray(out) for _, _, out, _ in rows]))

    def close(self) -> None:
        self.out.close()


class _Parquet:
    """Row groups written as they come, to ``PATH.partial`` renamed at the end."""

    def __init__(self, path: Path, task: str) -> None:
        self.path, self.task = path, task
        self.partial = path.with_name(path.name + ".partial")
        self.writer: Any = None

    def write(self, rows: list[Row], options: dict[str, Any]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        cols: dict[str, Any] = {"index": [r[0] for r in rows], "line": [r[1] for r in rows]}
        if self.task == "embed":
            cols["embedding"] = [np.asarray(r[2], np.float32).tolist() for r in rows]
        elif self.task == "pairs":
            cols["score"] = [float(r[2]) for r in rows]
        elif self.task == "sparse":  # parallel lists, strongest term first
            cols["sparse_indices"] = [[t["index"] for t in r[2]] for r in rows]
            cols["sparse_values"] = [[t["value"] for t in r[2]] for r in rows]
            if options.get("tokens"):
                cols["sparse_tokens"] = [[t["token"] for t in r[2]] for r in rows]
        elif isinstance(rows[0][2], list):
            cols["labels"] = [[{"label": d["label"], "score": d["score"]} for d in r[2]]
                              for r in rows]
        else:
            cols["label"] = [r[2]["label"] for r in rows]
            cols["score"] = [r[2]["score"] for r in rows]
        cols["truncated"] = [r[3]["truncated"] for r in rows]
        cols["chunks"] = [r[3]["chunks"] for r in rows]
        table = pa.table(cols)
        if self.writer is None:
            self.writer = pq.ParquetWriter(str(self.partial), table.schema)
        self.writer.write_table(table)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.partial.replace(self.path)


def open_writer(output: Path | None, task: str) -> Any:
    """The writer for ``output`` (None: JSONL on stdout)."""
    if output is not None and output.suffix == ".npy":
        if task != "embed":
            from sureserve.errors import InputError

            raise InputError(".npy holds dense embeddings only",
                             f"write {task} results to .jsonl or .parquet")
        return _Npy(output)
    if output is not None and output.suffix == ".parquet":
        return _Parquet(output, task)
    return _Jsonl(output, task)

