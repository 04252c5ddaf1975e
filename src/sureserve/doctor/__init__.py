"""``sureserve doctor``: the classic symptom -> fix debug guide for transformers in
production, turned into checks with numbers.

With a MODEL it loads it here (gate failures accepted, so that they can be shown) and runs
the seven checks of ``local.py`` in the guide's order; with ``--url`` it reads a running
server (``remote.py``); ``--html`` writes the same findings as one self-contained page
(``page.py``). Exit 0 when nothing failed, 3 when something did.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sureserve.doctor.report import DoctorReport, Finding
from sureserve.errors import SettingsError, SureserveError
from sureserve.settings import Settings

__all__ = ["DoctorReport", "Finding", "run_doctor"]
log = logging.getLogger("sureserve.doctor")


def run_doctor(model: str | None, *, url: str | None = None, lock: Path | None = None,
               sample: Path | None = None, settings: Settings | None = None,
               api_key: str | None = None, task: str | None = None) -> DoctorReport:
    if model is None and url is None:
        raise SettingsError("nothing to examine", "give a MODEL, --url of a running server, "
                            "or both")
    settings = settings or Settings()
    if sample is not None and not sample.is_file():
        raise SettingsError(f"no sample file at {sample}", "give --sample a .txt, .jsonl or "
                            ".csv file of typical inputs")
    report = DoctorReport(model, url)
    if model is not None:
        report.findings += _model_findings(model, task, lock, sample, settings)
    if url is not None:
        from sureserve.doctor.remote import server_findings

        found, charts = server_findings(url, api_key or settings.api_key)
        report.findings += found
        report.charts = charts
    return report


def _model_findings(model: str, task: str | None, lock: Path | None, sample: Path | None,
                    settings: Settings) -> list[Finding]:
    import sureserve
    from sureserve.doctor import local

    try:
        engine = sureserve.load(model, task=task, settings=settings,
                                accept_gate_failure=True, drift_watch=False)
    except SureserveError as exc:  # a model that does not load at all is the finding
        return [Finding("Model does not load", "sureserve.load", exc.message, "fail",
                        exc.fix)]
    checks = [("Same output for different inputs", lambda: local.same_output(engine)),
              ("Out of memory even with small batches", lambda: local.memory(engine, settings)),
              ("10x slower than expected", lambda: local.speed(engine, settings)),
              ("Truncated or garbled text",
               lambda: local.truncation(engine, settings, sample)),
              ("Model fails to load on multi-GPU", lambda: local.multi_gpu(engine, settings)),
              ("Wrong outputs after an upgrade", lambda: local.upgrade(lock, settings)),
              ("Tokenizer returns empty input_ids", lambda: local.empty_ids(engine))]
    found = []
    for symptom, check in checks:
        try:
            found.append(check())
        except Exception as exc:  # one check that cannot run must not hide the others
            log.exception("doctor: %s", symptom)
            found.append(Finding(symptom, "(the check could not run)",
                                 f"{type(exc).__name__}: {exc}", "warn",
                                 "report this as a sureserve bug"))
    return found
