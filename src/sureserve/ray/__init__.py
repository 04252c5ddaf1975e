"""sureserve on Ray (optional: ``pip install 'sureserve[ray]'``; ``make setup`` installs it).

``embed`` / ``classify`` run an offline job on Ray Data with one actor per replica, each
loading the model through ``sureserve.load`` (so the gate runs in every actor) and
batching with the same planner, truncation policy and per-row flags as the local engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sureserve.settings import Settings

__all__ = ["classify", "embed"]


def embed(source: Any, model: str = "minilm", *, output: Path | str | None = None,
          replicas: int = 2, address: str | None = None, field: str = "text",
          settings: Settings | None = None, normalize: bool | None = None) -> Any:
    """Embeddings of every text of ``source`` (a txt/jsonl/csv/parquet path, or a Ray
    Dataset with a ``text`` column). With ``output``: written there in input order (JSONL,
    .npy or Parquet), returning the run summary; without: a Ray Dataset of the outputs
    (columns ``embedding``, ``truncated``, ``chunks``, ...), in input order."""
    return _job("embed", source, model, output, replicas, address, field, settings,
                normalize=normalize)


def classify(source: Any, model: str = "sentiment-demo", *, output: Path | str | None = None,
             replicas: int = 2, address: str | None = None, field: str = "text",
             settings: Settings | None = None, top_k: int | None = 1) -> Any:
    """Labels of every text of ``source``; see ``embed`` (the Dataset's ``result`` column
    holds each text's label and score as JSON)."""
    return _job("classify", source, model, output, replicas, address, field, settings,
                top_k=top_k)


def _job(task: str, source: Any, model: str, output: Path | str | None, replicas: int,
         address: str | None, field: str, settings: Settings | None, **options: Any) -> Any:
    from sureserve.ray.data import batch_rows, records_dataset, run_ray_job, transform

    settings = settings or Settings()
    if isinstance(source, str | Path):
        if output is not None:
            return run_ray_job(task, model, Path(source), Path(output), field, settings,
                               lambda _: None, replicas, address, **options)
        from sureserve.ray.cluster import ensure

        ensure(address)  # the Dataset is lazy: the connection stays (ray.shutdown() ends it)
        return transform(records_dataset(Path(source), field, batch_rows(settings, replicas)),
                         task, model, settings, replicas, options)
    # a Dataset of the caller's: the actors take its ``text`` column as it is (no extra
    # map stage: a CPU-less one would let Ray start a worker process per block)
    return transform(source, task, model, settings, replicas, options)
