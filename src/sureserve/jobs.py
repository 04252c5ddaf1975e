"""Offline file jobs (``sureserve embed|classify``): read texts in windows, run each window
through the engine's one path (``Engine.run``), write results in input order as they come.

Each window is ``planner_window`` texts, so memory stays bounded on files larger than RAM;
every JSONL row carries ``index`` (0-based among the texts read), ``line`` (1-based in the
file), ``truncated`` and ``chunks``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sureserve.engine import RunSummary
from sureserve.errors import BadLineError
from sureserve.settings import Settings
from sureserve.textio import JsonlWriter, NpyWriter, Record, read_records, windows


def _records(texts: list[str] | None, input_file: Path | None, field: str, skip: bool,
             skipped: list[BadLineError]) -> Iterator[Record]:
    if texts:  # the CLI refuses texts given together with --input
        return iter([Record(i + 1, t) for i, t in enumerate(texts)])
    if input_file is None:
        return read_records(sys.stdin.buffer, ".txt", skip=skip, skipped=skipped)
    fh = open(input_file, "rb")  # noqa: SIM115 - closed when the process ends
    return read_records(fh, input_file.suffix.lower(), field=field, skip=skip, skipped=skipped)


def run_file_job(task_name: str, model: str, texts: list[str] | None, input_file: Path | None,
                 output: Path | None, field: str, settings: Settings, report: Any,
                 **options: Any) -> RunSummary:
    """Embed or classify every text; ``options`` go to the task's post-processing
    (``normalize``; ``top_k``). ``report`` prints the skipped lines and the summary."""
    from tqdm.auto import tqdm

    import sureserve

    skipped: list[BadLineError] = []
    records = _records(texts, input_file, field, settings.skip_bad_lines, skipped)
    engine = sureserve.load(model, task=task_name, settings=settings)
    npy = output is not None and output.suffix == ".npy"
    writer: JsonlWriter | NpyWriter = NpyWriter(output) if npy and output else \
        JsonlWriter(output)
    total = RunSummary()
    bar = tqdm(unit="text", desc=task_name, disable=None, file=sys.stderr)
    done = 0
    try:
        for win in windows(records, settings.planner_window):
            res = engine.run([r.text for r in win], first_index=done,
                             on_texts_done=bar.update, **options)
            if isinstance(writer, NpyWriter):
                writer.write(res.outputs)
            else:
                writer.write(output_row(task_name, done + i, r.line, out,
                                        res.summary.flags(done + i), options)
                             for i, (r, out) in enumerate(zip(win, res.outputs, strict=True)))
            total.add(res.summary)
            done += len(win)
            if engine.watch is not None:  # alerts start (and clear) as the run goes
                engine.watch.evaluate()
    finally:
        writer.close()
        bar.close()
        for bad in skipped:
            report(f"[yellow]skipped[/] {bad.message}")
        report(f"{task_name}: {total.line()}" + (f", {len(skipped)} bad lines skipped"
                                                  if skipped else ""))
        drift_report(engine, total, report)
    return total


def drift_report(engine: Any, total: RunSummary, report: Any) -> None:
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


def output_row(task_name: str, index: int, line: int, out: Any, flags: dict[str, Any],
               options: dict[str, Any]) -> dict[str, Any]:
    """One JSONL output row: the output, ``index``, ``line`` and the text's flags (the
    same for local and Ray jobs)."""
    if task_name == "embed":
        item: dict[str, Any] = {"embedding": out.tolist()}
    else:
        # each label dict: label and score (the row itself carries the flags)
        item = dict(out) if options.get("top_k") == 1 else {
            "labels": [{"label": d["label"], "score": d["score"]} for d in out]}
    return {**item, "index": index, "line": line, **flags}


def run_rerank_job(query: str, model: str, texts: list[str] | None, input_file: Path | None,
                   field: str, settings: Settings, report: Any, **options: Any) -> RunSummary:
    """Rank every text (arguments, a file or stdin) against ``query``; one JSON line per
    text on stdout, best first. A ranking needs every text before it can answer, so the
    texts are read whole (unlike embed/classify, written window by window)."""
    import sureserve

    skipped: list[BadLineError] = []
    docs = [r.text for r in _records(texts, input_file, field, settings.skip_bad_lines,
                                     skipped)]
    for bad in skipped:
        report(f"[yellow]skipped[/] {bad.message}")
    engine = sureserve.load(model, task="rerank", settings=settings)
    for item in engine.rerank(query, docs, return_text=True, **options):
        sys.stdout.write(json.dumps(item, ensure_ascii=False) + "\n")
    assert engine.last_summary is not None
    report(f"rerank: {engine.last_summary.line()}")
    drift_report(engine, engine.last_summary, report)
    return engine.last_summary
