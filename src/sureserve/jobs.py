"""Offline file jobs (``sureserve embed|classify|rerank``), local or on Ray: one driver.

    source (``textio.read_items``: records, each bad line in its place)
      ─► windows of items in input order, rows computed by ``Engine.run``
         (``local_windows``: in this process; ``ray.data``: in one actor per replica)
      ─► ``drive``: the bad-line policy, the writer (``writers.open_writer``), the totals

``drive`` is the one owner of what a job does with its results, wherever the forward ran:
it writes rows as windows come (JSONL, ``.npy`` or Parquet, by the output's suffix), stops
at the first bad line after writing every row before it (with ``skip_bad_lines``, reports
and skips it instead), and adds up the windows' summaries (``RunSummary.add``). Every JSONL
row carries ``index`` (0-based among the texts read), ``line`` (1-based in the file),
``truncated`` and ``chunks``. Windows are ``planner_window`` texts, so memory stays bounded
on files larger than RAM.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sureserve.engine import RunSummary
from sureserve.errors import BadLineError
from sureserve.settings import Settings
from sureserve.textio import Record, read_items, windows
from sureserve.writers import Row, open_writer

Item = Row | BadLineError


@dataclass
class Window:
    """Finished rows (and bad lines, in their places) of consecutive inputs, and the
    summary of the run that computed them (text indices global)."""

    items: list[Item]
    summary: RunSummary


def drive(task_name: str, source: Iterable[Window], output: Path | None, settings: Settings,
          report: Callable[[str], None], options: dict[str, Any], total: RunSummary,
          on_window: Callable[[], object] | None = None) -> int:
    """Write every window's rows, apply the bad-line policy, add the summaries into
    ``total`` (given by the caller, so that it can report it even when the job stops).
    Returns the bad lines skipped. No output file is created until a row exists."""
    writer = None
    skipped = 0

    def write(rows: list[Row]) -> None:
        nonlocal writer
        if rows:
            writer = writer or open_writer(output, task_name)
            writer.write(rows, options)

    try:
        for win in source:
            rows: list[Row] = []
            for item in win.items:
                if not isinstance(item, BadLineError):
                    rows.append(item)
                elif settings.skip_bad_lines:
                    report(f"[yellow]skipped[/] {item.message}")
                    skipped += 1
                else:
                    write(rows)  # the rows before it are kept
                    raise item
            write(rows)
            total.add(win.summary)
            if on_window is not None:
                on_window()
    finally:
        if writer is not None:
            writer.close()
        # a source stopped early (a bad line, an error) is closed now, not when the
        # traceback that holds it is collected: a Ray Data iterator left open keeps its
        # executor running, and disconnecting from Ray then waits for it
        close = getattr(source, "close", None)
        if close is not None:
            close()
    return skipped


def local_windows(engine: Any, items: Iterable[Record | BadLineError], size: int,
                  options: dict[str, Any], progress: Callable[[int], None]
                  ) -> Iterator[Window]:
    """Windows of ``size`` inputs run through ``engine.run`` in this process."""
    done = 0
    for win in windows(items, size):
        recs = [r for r in win if isinstance(r, Record)]
        if not recs:
            yield Window(list(win), RunSummary())
            continue
        if recs[0].query is not None:  # (query, text) pairs: each with its own query
            options = {**options, "query": [r.query for r in recs]}
        res = engine.run([r.text for r in recs], first_index=done, on_texts_done=progress,
                         **options)
        outs = iter(enumerate(res.outputs, start=done))
        out: list[Item] = []
        for item in win:
            if isinstance(item, Record):
                i, o = next(outs)
                out.append((i, item.line, o, res.summary.flags(i)))
            else:
                out.append(item)
        yield Window(out, res.summary)
        done += len(recs)


def inputs(texts: list[str] | None, input_file: Path | None, field: str,
           query_field: str | None = None) -> Iterator[Record | BadLineError]:
    """A job's inputs: texts given as arguments, else the file, else stdin."""
    if texts:  # the CLI refuses texts given together with --input
        return iter([Record(i + 1, t) for i, t in enumerate(texts)])
    return read_items(input_file, field, query_field)


def run_file_job(task_name: str, model: str, texts: list[str] | None, input_file: Path | None,
                 output: Path | None, field: str, settings: Settings,
                 report: Callable[[str], None], query_field: str | None = None,
                 **options: Any) -> RunSummary:
    """Embed, classify (or, with ``query_field``, score (query, text) pairs: task
    ``pairs``) every text in this process; ``options`` go to the task's post-processing
    (``normalize``; ``top_k``). ``report`` prints the skipped lines and the summary."""
    from tqdm.auto import tqdm

    import sureserve

    items = inputs(texts, input_file, field, query_field)
    engine = sureserve.load(model, task="rerank" if task_name == "pairs" else task_name,
                            settings=settings)
    if task_name == "embed":  # refused before the first window runs, not after it
        engine.check_vectors(options.get("dimensions"), options.get("precision"))
    total = RunSummary(policy=settings.truncation)
    bar = tqdm(unit="text", desc=task_name, disable=None, file=sys.stderr)
    skipped = 0
    # alerts start (and clear) as the run goes
    evaluate = engine.watch.evaluate if engine.watch is not None else None
    try:
        skipped = drive(task_name, local_windows(engine, items, settings.planner_window,
                                                 options, bar.update),
                        output, settings, report, options, total, on_window=evaluate)
    finally:
        bar.close()
        report(f"{task_name}: {total.line()}" + (f", {skipped} bad lines skipped"
                                                  if skipped else ""))
        drift_report(engine, total, report)
    return total


def drift_report(engine: Any, total: RunSummary, report: Callable[[str], None]) -> None:
    """Put the drift watch's verdict on the run into its summary, and warn about each
    alerting signal (the baseline: a reference file, or the run's first window)."""
    watch = engine.watch
    if watch is None:
        return
    signals, _ = watch.evaluate()
    total.drift = [s.to_dict() for s in signals]
    for s in signals:
        if s.alert:
            report(f"[yellow]drift warning[/] {s.name} = {s.score:.3g} (threshold "
                   f"{s.threshold:g}): {s.detail}")
    if not watch.baseline_ready():
        report(f"drift: {len(watch.names)} signals watched; the baseline is the first "
               f"{watch.size} inputs, so this run was too short to compare (give "
               "--reference FILE)")


def run_rerank_job(query: str, model: str, texts: list[str] | None, input_file: Path | None,
                   field: str, settings: Settings, report: Callable[[str], None],
                   **options: Any) -> RunSummary:
    """Rank every text (arguments, a file or stdin) against ``query``; one JSON line per
    text on stdout, best first, through the same driver as embed/classify (bad-line policy,
    writer). A ranking needs every text before it can answer, so the texts are read whole
    (unlike embed/classify, written window by window)."""
    import sureserve

    items = list(inputs(texts, input_file, field))
    recs = [r for r in items if isinstance(r, Record)]
    bad = [b for b in items if isinstance(b, BadLineError)]
    if bad and not settings.skip_bad_lines:
        raise bad[0]  # nothing is ranked until every text is read
    engine = sureserve.load(model, task="rerank", settings=settings)
    ranked = engine.rerank(query, [r.text for r in recs], return_text=True, **options)
    assert engine.last_summary is not None
    total = RunSummary(policy=settings.truncation)
    rows: list[Item] = [*bad, *((item["index"], recs[item["index"]].line, item, {})
                                for item in ranked)]
    drive("rerank", [Window(rows, engine.last_summary)], None, settings, report, options,
          total)
    report(f"rerank: {total.line()}")
    drift_report(engine, total, report)
    return total
