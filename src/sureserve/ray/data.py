"""Offline jobs on Ray Data: the same engine, in one actor per replica.

    file (``textio.read_items``, the local job's reader, block by block) ─► blocks
      ─► map_batches(Worker, one actor per replica)   Worker = sureserve.load (the gate runs
         in every actor) + Engine.run: the same planner, truncation policy and flags
      ─► (this process) batches as ``jobs.Window``s ─► ``jobs.drive``, the local job's
         driver: bad-line policy, writer (JSONL / .npy / Parquet), totals

Input order is kept by Ray Data's ``preserve_order``; rows are numbered as they arrive, so
every written row carries its ``index`` and ``line`` as the local job writes them. Bad
lines travel as rows marked bad, and the driver treats them as it does locally. Actors that
die are restarted by Ray and their blocks redone (Ray Data's actor pools retry), so the
output has every row exactly once.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from sureserve.engine import RunSummary
from sureserve.errors import BadLineError, InferenceError, InputError, SettingsError, SureserveError
from sureserve.jobs import Window
from sureserve.settings import Settings
from sureserve.textio import FORMATS, Record, bad_line, read_items, windows


def batch_rows(settings: Settings, replicas: int) -> int:
    """Texts per actor batch: the planner window shared out over the replicas (each
    batch is planned together, so larger pads less; smaller spreads a short job wider)."""
    return max(1, settings.planner_window // replicas)


def records_dataset(path: Path, field: str, block_rows: int) -> Any:
    """A Ray Dataset of ``{line, text, bad}`` rows read by one streaming read task, block
    by block (no process holds the whole file), with the local job's reader
    (``textio.read_items``: txt/jsonl/csv line by line, Parquet by pyarrow batches)."""
    import ray.data

    fmt = path.suffix.lower()
    if fmt not in FORMATS:
        raise InputError(f"unknown input format {fmt!r}", f"use one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise InputError(f"no input file at {path}", "check the --input path")
    # reading takes no CPU slot: the actors hold them all, and a read waiting for a slot
    # would wait forever
    return ray.data.read_datasource(Records(path, field, block_rows), num_cpus=0)


class Records(Datasource):
    """An input file read by sureserve's own reader (``textio.read_items``), in blocks."""

    def __init__(self, path: Path, field: str, block_rows: int) -> None:
        super().__init__()
        self.path, self.field, self.block_rows = path, field, block_rows

    def estimate_inmemory_data_size(self) -> int:
        return self.path.stat().st_size

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[Any]:
        # one task: lines are numbered in order, and reading is cheap next to the model
        meta = BlockMetadata(num_rows=None, size_bytes=self.path.stat().st_size,
                             input_files=(str(self.path),), exec_stats=None)
        args = (self.path, self.field, self.block_rows)
        return [ReadTask(lambda: _read_blocks(*args), meta)]


def _read_blocks(path: Path, field: str, block_rows: int) -> Iterator[Any]:
    """Blocks of ``{line, text, bad}``: bad lines stay in the stream, in order."""
    import pyarrow as pa

    for block in windows(read_items(path, field), block_rows):
        yield pa.table({
            "line": [item.line for item in block],
            "text": [item.text if isinstance(item, Record) else "" for item in block],
            "bad": [item.message if isinstance(item, BadLineError) else "" for item in block]})


class Worker:
    """One replica: loads the model once (the gate runs here, in every actor) and runs
    each batch through ``Engine.run`` with its share of the CPU threads."""

    def __init__(self, model: str, task: str, settings: dict[str, Any], threads: int,
                 options: dict[str, Any]) -> None:
        import torch

        import sureserve

        torch.set_num_threads(threads)
        # one forward pass at a time here: the replicas are the parallelism
        self.engine = sureserve.load(model, task=task, settings=Settings(
            **{**settings, "forward_workers": 1, "drift_watch": False}))
        self.task, self.options = task, options

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = list(batch["text"])
        n = len(texts)
        bad = list(batch["bad"]) if "bad" in batch else [""] * n  # a caller's own Dataset
        good = [i for i in range(n) if not bad[i]]
        started = time.perf_counter()
        res = self.engine.run([str(texts[i]) for i in good], **self.options)
        seconds = time.perf_counter() - started
        s = res.summary
        out: dict[str, Any] = {"line": batch.get("line", np.full(n, -1, np.int64)),
                               "bad": np.asarray(bad, dtype=object),
                               "truncated": np.zeros(n, bool), "chunks": np.ones(n, np.int64)}
        for k, i in enumerate(good):
            flags = s.flags(k)
            out["truncated"][i], out["chunks"][i] = flags["truncated"], flags["chunks"]
        if self.task == "embed":
            vecs = np.zeros((n, self.engine.loaded.hidden_size), np.float32)
            if good:
                vecs[good] = np.asarray(res.outputs, dtype=np.float32)
            out["embedding"] = vecs
        else:
            labels = [""] * n
            for k, i in enumerate(good):
                item = res.outputs[k]
                labels[i] = json.dumps(item if isinstance(item, list) else
                                       {"label": item["label"], "score": item["score"]})
            out["result"] = np.asarray(labels, dtype=object)
        # this batch's totals ride on its first row (the driver adds them up)
        stats = np.zeros((n, 4))
        stats[0] = (s.real_tokens, s.computed_tokens, seconds, s.limit)
        out["stats"] = stats
        out["pid"] = np.full(n, os.getpid(), np.int64)
        return out


def run_ray_job(task_name: str, model: str, input_file: Path | None, output: Path | None,
                field: str, settings: Settings, report: Callable[[str], None],
                replicas: int = 2, address: str | None = None,
                **options: Any) -> RayRunSummary:
    """``sureserve embed|classify --ray``: the local job's output, from Ray replicas."""
    from sureserve.ray.cluster import connected

    if input_file is None:
        raise InputError("--ray reads a file", "give --input FILE (txt, jsonl, csv or "
                         "parquet)")
    if settings.drift_reference is not None:
        # each actor sees only its share of the rows, so no actor's watch could compare the
        # job with the reference: refused rather than silently not checked
        raise SettingsError("--reference (drift_reference) does not apply to a Ray job: its "
                            "rows are spread over the actors, none sees the whole job",
                            "run the job without --ray to compare it with a reference, or "
                            "drop --reference")
    with connected(address):
        ds = records_dataset(input_file, field, batch_rows(settings, replicas))
        return _drive(task_name, model, transform(ds, task_name, model, settings, replicas,
                                                  options), output, settings, report,
                      options)


def transform(ds: Any, task_name: str, model: str, settings: Settings, replicas: int,
              options: dict[str, Any]) -> Any:
    """``ds`` (rows with ``text``, ``line``, ``bad``) mapped by ``replicas`` actors."""
    import ray

    from sureserve.ray.cluster import cpu_share

    cpus = cpu_share(ray.cluster_resources(), replicas)
    given = settings.model_dump(exclude_unset=True, mode="json")
    # one batch at a time per actor: by default an actor queues up to 4, and the first one
    # up took a whole job alone
    pool = ray.data.ActorPoolStrategy(size=replicas, max_tasks_in_flight_per_actor=1)
    out = ds.map_batches(_bound(model, task_name, given, cpus, options),
                         batch_size=batch_rows(settings, replicas), compute=pool,
                         num_cpus=cpus, batch_format="numpy")
    # input order kept, Ray's progress bars off (ours counts texts): set on the context
    # the Dataset carries (it keeps the one in force when it was created, a caller's too)
    out.context.execution_options.preserve_order = True
    out.context.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    return out


def _bound(*args: Any) -> type:
    """``Worker`` with its arguments inside the class, so that a restarted actor rebuilds
    from the class alone (Ray keeps constructor arguments in its object store, which a
    restart cannot count on)."""

    class BoundWorker(Worker):
        def __init__(self) -> None:
            super().__init__(*args)

    return BoundWorker


@dataclass
class RayRunSummary:
    """The run summary over every actor, and what each actor did: texts, seconds."""

    summary: RunSummary
    per_actor: dict[int, tuple[int, float]]


def _drive(task_name: str, model: str, ds: Any, output: Path | None, settings: Settings,
           report: Callable[[str], None], options: dict[str, Any]) -> RayRunSummary:
    """The mapped dataset's batches through the file-job driver (``jobs.drive``: writer,
    bad lines, totals), with what each actor did on the side."""
    from tqdm.auto import tqdm

    from sureserve.jobs import drive

    total = RunSummary(policy=settings.truncation)
    per_actor: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])  # rows, seconds
    bar = tqdm(unit="text", desc=f"{task_name} (ray)", disable=None, file=sys.stderr)
    started = time.perf_counter()
    try:
        drive(task_name, _windows(task_name, ds, settings, per_actor, bar.update), output,
              settings, report, options, total)
    finally:
        bar.close()
    total.seconds = time.perf_counter() - started  # wall time, not the actors' sum
    total.bound_by = "the model, in each replica"
    report(f"{task_name}: {total.line()}, {len(per_actor)} actor(s)")
    for pid, (n, secs) in sorted(per_actor.items()):
        report(f"  actor pid {pid}: {n:.0f} texts, {n / secs if secs else 0:.1f} texts/s "
               "in its passes")
    return RayRunSummary(total, {pid: (int(n), secs) for pid, (n, secs) in
                                 per_actor.items()})


def _windows(task_name: str, ds: Any, settings: Settings, per_actor: dict[int, list[float]],
             progress: Callable[[int], None]) -> Iterator[Window]:
    """Each batch the actors return as a ``jobs.Window``: rows numbered in arrival order
    (Ray keeps input order), bad lines in their places, the batch's summary."""
    index = 0
    last_line = 0
    for batch in _batches(ds):
        items: list[Any] = []
        part = RunSummary(policy=settings.truncation)
        for k in range(len(batch["line"])):
            line = int(batch["line"][k])
            bad = str(batch["bad"][k])
            if bad:
                items.append(bad_line(bad, line))
                continue
            flags = {"truncated": bool(batch["truncated"][k]),
                     "chunks": int(batch["chunks"][k])}
            if flags["truncated"]:
                part.truncated.append(index)
            if flags["chunks"] > 1:
                part.chunked[index] = flags["chunks"]
            out: Any = batch["embedding"][k] if task_name == "embed" else \
                json.loads(str(batch["result"][k]))
            if line != -1:  # our readers number rows: a row out of order is a bug
                if line <= last_line:
                    raise InferenceError(f"Ray returned line {line} after line "
                                         f"{last_line}: input order was lost",
                                         "report this as a sureserve bug")
                last_line = line
            items.append((index, line, out, flags))
            index += 1
        real, computed, seconds, _ = batch["stats"].sum(axis=0)
        part.texts = sum(1 for item in items if not isinstance(item, BadLineError))
        part.limit = int(batch["stats"][:, 3].max())
        part.real_tokens, part.computed_tokens = int(real), int(computed)
        good = batch["bad"] == ""
        for pid in set(batch["pid"].tolist()):
            per_actor[pid][0] += float(((batch["pid"] == pid) & good).sum())
        per_actor[int(batch["pid"][0])][1] += float(seconds)
        progress(part.texts)
        yield Window(items, part)


def _batches(ds: Any) -> Iterator[dict[str, np.ndarray]]:
    """The mapped dataset's batches in order; a failure inside Ray comes out as the
    sureserve error that caused it (a failed gate stays a GateError, exit 3)."""
    import ray

    try:
        yield from ds.iter_batches(batch_size=None, batch_format="numpy")
    except ray.exceptions.RayError as exc:
        cause = _sureserve_cause(exc)
        if cause is not None:
            raise cause from exc
        raise


def _sureserve_cause(exc: BaseException) -> SureserveError | None:
    """The sureserve error behind a Ray error: the chained exception, or, when an actor's
    constructor raised (Ray keeps only the text of that error), rebuilt from its text."""
    import re

    from sureserve import errors

    seen = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, SureserveError):
            return cur
        cur = getattr(cur, "cause", None) or cur.__cause__ or cur.__context__
    found = re.search(r"sureserve\.errors\.(\w+): (.*?)\n\s*fix: (.*?)(?:\n\n|\n\S|$)",
                      str(exc), re.S)
    cls = getattr(errors, found.group(1), None) if found else None
    if found and isinstance(cls, type) and issubclass(cls, SureserveError):
        return cls(found.group(2).strip(), " ".join(found.group(3).split()))
    return None
