"""The file-job commands of the command line: ``embed`` (dense or sparse vectors),
``classify`` and ``rerank`` (a ranking, or a file of pairs), each in this process or as a
Ray Data job. ``cli.py`` registers them; they parse and call ``jobs`` / ``ray.data``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from sureserve.clikit import FieldOpt, InputOpt, ModelOpt, TextsArg, with_settings
from sureserve.clikit import report as _report
from sureserve.settings import Settings


def _one_source(texts: list[str] | None, input_file: Path | None) -> None:
    if texts and input_file:  # a usage error: exit 2, like click's own
        raise typer.BadParameter("give texts as arguments or --input, not both")


def _file_job(task: str, settings: Settings, model: str, texts: list[str] | None,
              input_file: Path | None, output: Path | None, field: str,
              **options: Any) -> None:
    """embed/classify: in this process, or as a Ray Data job (``--ray``)."""
    _one_source(texts, input_file)
    if settings.ray:
        from sureserve.ray.data import run_ray_job

        run_ray_job(task, model, input_file, output, field, settings, _report,
                    settings.replicas, settings.ray_address, **options)
        return
    from sureserve.jobs import run_file_job

    run_file_job(task, model, texts, input_file, output, field, settings, _report, **options)


PromptOpt = Annotated[str | None, typer.Option(
    "--prompt-name", help="One of the model's sentence-transformers prompts, put before "
    "every text (default: the model's default_prompt_name, if it has one; \"\" for none).")]
DirectionOpt = Annotated[Literal["right", "left"], typer.Option(
    "--truncation-direction",
    help="Which end a cut (--truncation truncate) takes tokens from: right keeps a text's "
    "start, left its end.")]


@with_settings("source", "plan", "batching", "drift", "ray")
def embed(settings: Settings, texts: TextsArg = None, model: Annotated[str | None, typer.Option(
              "--model", "-m", help="Zoo alias, folder or hub id (default: minilm; with "
              "--sparse, splade-tiny).")] = None,
          input_file: InputOpt = None,
          output: Annotated[Path | None, typer.Option(
              "--output", "-o", help=".jsonl, .npy or .parquet (default: JSONL on stdout).")
          ] = None,
          field: FieldOpt = "text",
          normalize: Annotated[bool | None, typer.Option("--normalize/--no-normalize",
                               help="Unit-length vectors (default: as the model says).")] = None,
          sparse: Annotated[bool, typer.Option(
              "--sparse", help="Sparse (SPLADE) vectors from a masked-LM model: each row's "
              "\"sparse\" maps token id -> weight, strongest first (--model splade-tiny).")
          ] = False,
          top_k: Annotated[int | None, typer.Option(
              help="With --sparse: only each text's k strongest terms (default: the "
              "sparse_top_k setting; 0: all).", min=0)] = None,
          tokens: Annotated[bool, typer.Option(
              "--tokens", help="With --sparse: also \"tokens\", token id -> token text.")
          ] = False,
          prompt_name: PromptOpt = None,
          direction: DirectionOpt = "right",
          dimensions: Annotated[int | None, typer.Option(
              help="Shorter vectors (the first n components, renormalised): where the model "
              "declares Matryoshka sizes or `sureserve quantize --dimensions` accepted n.")
          ] = None,
          precision: Annotated[str | None, typer.Option(
              help="int8, uint8, binary or ubinary vectors: where `sureserve quantize "
              "--precisions` measured and accepted it.")] = None,
          ) -> None:
    """Embed texts; writes one JSON line per text (or a .npy matrix) in input order."""
    text = {"prompt_name": prompt_name, "direction": direction}
    if not sparse:
        if top_k is not None or tokens:
            raise typer.BadParameter("--top-k and --tokens go with --sparse")
        form = {k: v for k, v in (("dimensions", dimensions), ("precision", precision))
                if v is not None}
        _file_job("embed", settings, model or "minilm", texts, input_file, output, field,
                  normalize=normalize, **text, **form)
        return
    if dimensions is not None or precision is not None:
        raise typer.BadParameter("--dimensions and --precision are for dense vectors")
    if normalize is not None:
        raise typer.BadParameter("sparse vectors are not normalized: drop --normalize")
    _file_job("sparse", settings, model or "splade-tiny", texts, input_file, output, field,
              top_k=settings.sparse_top_k if top_k is None else top_k, tokens=tokens, **text)


@with_settings("source", "plan", "batching", "drift", "ray")
def classify(settings: Settings, texts: TextsArg = None, model: ModelOpt = "sentiment-demo",
             input_file: InputOpt = None,
             output: Annotated[Path | None, typer.Option(
                 "--output", "-o", help=".jsonl or .parquet (default: JSONL on stdout).")
             ] = None,
             field: FieldOpt = "text",
             top_k: Annotated[int, typer.Option(help="Labels per text (0: all).")] = 1,
             direction: DirectionOpt = "right",
             ) -> None:
    """Classify texts; writes one JSON line per text in input order."""
    _file_job("classify", settings, model, texts, input_file, output, field,
              top_k=top_k or None, direction=direction)


@with_settings("source", "plan", "batching", "drift")
def rerank(settings: Settings,
           query: Annotated[str | None, typer.Argument(
               help="What the texts are ranked against (leave out with --pairs).")] = None,
           texts: TextsArg = None, model: ModelOpt = "rerank-demo", input_file: InputOpt = None,
           field: FieldOpt = "text",
           top_n: Annotated[int | None, typer.Option(help="Only the n best.")] = None,
           raw_scores: Annotated[bool, typer.Option(help="Logits instead of sigmoids.")] = False,
           pairs: Annotated[bool, typer.Option(
               "--pairs", help="--input holds (query, text) pairs (.jsonl, .csv, .parquet): "
               "score each one, streamed in windows, in input order.")] = False,
           query_field: Annotated[str, typer.Option(
               help="With --pairs: the field or column holding each pair's query.")
           ] = "query",
           output: Annotated[Path | None, typer.Option(
               "--output", "-o", help="With --pairs: .jsonl or .parquet (default: JSONL on "
               "stdout).")] = None,
           ) -> None:
    """Rank texts by relevance to QUERY with a cross-encoder; one JSON line per text, best
    first: index (0-based among the texts read), score, text (and, when cutting is allowed,
    truncated / chunks). With --pairs, score a file of (query, text) pairs instead: one
    line per pair in input order (index, line, score, flags); the pairs of many queries
    share batches."""
    from sureserve.jobs import run_file_job, run_rerank_job

    _one_source(texts, input_file)
    if pairs:
        if query is not None or texts or input_file is None or top_n is not None:
            raise typer.BadParameter("--pairs scores the pairs of an --input file: no QUERY, "
                                     "texts or --top-n")
        run_file_job("pairs", model, None, input_file, output, field, settings, _report,
                     query_field=query_field, raw_scores=raw_scores)
        return
    if query is None:
        raise typer.BadParameter("give QUERY (or --pairs with a file of pairs)")
    if output is not None:
        raise typer.BadParameter("--output goes with --pairs (a ranking goes to stdout)")
    run_rerank_job(query, model, texts, input_file, field, settings, _report, top_n=top_n,
                   raw_scores=raw_scores)


COMMANDS = (embed, classify, rerank)
