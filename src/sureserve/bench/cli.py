"""``sureserve bench ...``: the benchmark commands (each prints a table and writes JSON).
They parse and call ``sureserve.bench.*``; the main command line adds this group."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sureserve.clikit import GenModel
from sureserve.clikit import report as _report
from sureserve.errors import SettingsError

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (print a table, write JSON).")

BenchN = Annotated[int, typer.Option("--n", help="Texts in the corpus.")]
BenchLong = Annotated[float, typer.Option(help="Share of long BBC articles in the mix.")]
BenchSkip = Annotated[list[str] | None, typer.Option("--skip", help="Contender to leave out "
                                                     "(repeatable).")]
BenchBf16 = Annotated[bool | None, typer.Option("--bf16/--no-bf16", help="Also run sureserve "
                                                "in bfloat16 (default: if the CPU has it).")]
BenchOut = Annotated[Path | None, typer.Option("--output", "-o", help="JSON report (default: "
                                               "bench-results/<bench>.json).")]


def _bench_out(output: Path | None, name: str) -> Path:
    path = output or Path(f"bench-results/{name}.json")
    _report(f"the report goes to {path}")
    return path


@bench_app.command("embed")
def bench_embed(n: BenchN = 2000, long_share: BenchLong = 0.05, skip: BenchSkip = None,
                bf16: BenchBf16 = None, output: BenchOut = None) -> None:
    """Embeddings: pipeline, sentence-transformers, arrival-order batches, sureserve."""
    from sureserve.bench.offline import print_report, run_bench

    print_report(run_bench("embed", n=n, long_share=long_share, skip=skip or [], bf16=bf16,
                           out=_bench_out(output, "embed"), log=_report), _report)


@bench_app.command("classify")
def bench_classify(n: BenchN = 2000, long_share: BenchLong = 0.05, skip: BenchSkip = None,
                   bf16: BenchBf16 = None, output: BenchOut = None) -> None:
    """Classification: pipeline, arrival-order batches, sureserve (sentiment-demo)."""
    from sureserve.bench.offline import print_report, run_bench

    print_report(run_bench("classify", n=n, long_share=long_share, skip=skip or [], bf16=bf16,
                           out=_bench_out(output, "classify"), log=_report), _report)


@bench_app.command("serve")
def bench_serve(levels: Annotated[list[int] | None, typer.Option("--clients", help="Concurrency "
                                                                   "levels (repeatable).")] = None,
                seconds: Annotated[float, typer.Option(help="Seconds per level.")] = 10.0,
                max_requests: Annotated[int, typer.Option(help="Cap per level.")] = 3000,
                skip: BenchSkip = None,
                infinity: Annotated[str | None, typer.Option(
                    help="Path of an infinity_emb executable (its own venv) to add "
                    "Infinity as a contender.")] = None, output: BenchOut = None) -> None:
    """HTTP load on loopback: sureserve's server vs a plain FastAPI + pipeline endpoint
    (and Infinity, with --infinity)."""
    from sureserve.bench.serve import print_report, run_serve_bench

    print_report(run_serve_bench(levels or [1, 8, 32, 64], seconds, max_requests,
                                 skip=skip or [], out=_bench_out(output, "serve"), log=_report,
                                 infinity=infinity), _report)


@bench_app.command("loop")
def bench_loop(seconds: Annotated[float, typer.Option(help="Seconds per phase.")] = 15.0,
               big: Annotated[int, typer.Option(help="Inputs per big request.")] = 256,
               output: BenchOut = None) -> None:
    """A small request's latency (and /health's) alone and while another client sends
    requests of --big news articles: what a big request costs everyone else."""
    from sureserve.bench.serve import run_lag_probe

    run_lag_probe(seconds, big, _bench_out(output, "loop"), _report)


@bench_app.command("rerank")
def bench_rerank(queries: Annotated[int, typer.Option(help="Queries (BBC sport/tech "
                                                      "headlines).")] = 32,
                 candidates: Annotated[int, typer.Option(help="Passages per query.")] = 20,
                 model: Annotated[str, typer.Option(help="Cross-encoder.")] = "rerank-demo",
                 output: BenchOut = None) -> None:
    """Rerank throughput (pairs/s), per query and all queries at once (rerank_many),
    against sentence-transformers' CrossEncoder.predict (batch 32) on the same pairs, with
    the largest score difference."""
    from sureserve.bench.rerank import print_report, run_rerank_bench

    print_report(run_rerank_bench(queries, candidates, model, _bench_out(output, "rerank"),
                                  _report), _report)


@bench_app.command("sparse")
def bench_sparse(texts: Annotated[int, typer.Option(help="Texts of the realistic mix.")] = 1000,
                 model: Annotated[str, typer.Option(help="Sparse (SPLADE) model.")
                                  ] = "splade-tiny",
                 output: BenchOut = None) -> None:
    """Sparse-embedding throughput (texts/s) against sentence-transformers' SparseEncoder
    (batch 32) on the same texts, with the largest weight difference."""
    from sureserve.bench.sparse import print_report, run_sparse_bench

    print_report(run_sparse_bench(texts, model, _bench_out(output, "sparse"), _report),
                 _report)


@bench_app.command("soak")
def bench_soak(minutes: Annotated[float, typer.Option(help="Minutes of load.")] = 30.0,
               clients: Annotated[int, typer.Option(help="Closed-loop clients.")] = 64,
               warmup: Annotated[float, typer.Option(help="Minutes before the RSS baseline "
                                                     "is taken (on the slowest CPU measured, "
                                                     "RSS reached its plateau by ~4).")] = 5.0,
               sample: Annotated[float, typer.Option(help="Seconds between samples.")] = 10.0,
               server_env: Annotated[list[str] | None, typer.Option(
                   "--server-env", help="NAME=VALUE for the server process (repeatable), "
                   "e.g. to compare settings.")] = None,
               output: BenchOut = None) -> None:
    """Hours of mixed traffic against one server (embed, predict, streaming and plain
    completions, abandoned streams, bad requests): RSS, Python heap, tasks, fds, threads
    and latency sampled; exits 3 when RSS grew more than 10% after the warm-up, or any
    request got a 5xx, an unexpected answer or none at all."""
    from sureserve.bench.soak import print_report, run_soak

    env = dict(kv.split("=", 1) for kv in server_env or [] if "=" in kv)
    rep = run_soak(minutes, clients, warmup, sample, env=env,
                   out=_bench_out(output, "soak"), log=_report)
    print_report(rep, _report)
    if rep["summary"]["verdict"] != "pass":
        raise typer.Exit(3)


@bench_app.command("drift")
def bench_drift(window: Annotated[int, typer.Option(help="The drift window.")] = 1000,
                normal: Annotated[int, typer.Option(help="Ordinary inputs after the "
                                                    "baseline.")] = 5000,
                part: Annotated[list[str] | None, typer.Option(
                    "--part", help="minilm, sentiment-demo, rerank-demo, encoders, smollm2, "
                    "overhead (repeatable; default encoders and overhead).")] = None,
                output: BenchOut = None) -> None:
    """The drift watch: false alerts on the realistic mix, inputs until each kind of drift
    alerts and until it clears, and the watch's cost on offline throughput."""
    from sureserve.bench.drift import print_report, run_bench

    print_report(run_bench(window, normal, part or ["encoders", "overhead"],
                           _bench_out(output, "drift"), _report), _report)


@bench_app.command("ray")
def bench_ray(n: BenchN = 4000,
              replicas: Annotated[int, typer.Option(help="Ray actors / Serve replicas.")] = 2,
              part: Annotated[list[str] | None, typer.Option(
                  help="data and/or serve (default: both).")] = None,
              clients: Annotated[int, typer.Option(help="Closed-loop clients (serve).")] = 32,
              seconds: Annotated[float, typer.Option(help="Load time per server.")] = 20.0,
              ray_address: Annotated[str | None, typer.Option(
                  help="A running Ray cluster for the Ray side (default: each run starts "
                  "a local one, and its start-up counts in the data part's wall time).")] = None,
              output: BenchOut = None) -> None:
    """Ray vs local, in one run. data: offline embeddings on Ray Data (one actor per
    replica) vs the local engine, as two `sureserve embed` runs of the realistic mix (wall
    time, order, largest difference). serve: `sureserve serve --ray --replicas N` vs
    `sureserve serve` under the same closed-loop clients."""
    from sureserve.bench.ray import print_report, run_bench

    parts = part or ["data", "serve"]
    if unknown := set(parts) - {"data", "serve"}:
        raise SettingsError(f"unknown part(s) {sorted(unknown)}", "use --part data or serve")
    print_report(run_bench(n, replicas, _bench_out(output, "ray"), _report, parts, clients,
                           seconds, ray_address), _report)


@bench_app.command("generate")
def bench_generate(model: GenModel = "smollm2",
                   n: Annotated[int, typer.Option("--requests", help="Requests per "
                                                  "concurrency level.")] = 96,
                   sample: Annotated[int, typer.Option(help="Requests run one at a time (and "
                                                       "at concurrency 1).")] = 8,
                   levels: Annotated[list[int] | None, typer.Option(
                       "--clients", help="Concurrency levels (repeatable).")] = None,
                   min_new: Annotated[int, typer.Option(help="Smallest max_new_tokens.")] = 16,
                   max_new: Annotated[int, typer.Option(help="Largest max_new_tokens.")] = 128,
                   seed: Annotated[int, typer.Option(help="Workload seed.")] = 0,
                   peer: Annotated[str | None, typer.Option(
                       help="llama.cpp: instead, compare `sureserve serve` with llama.cpp's "
                       "llama-server over HTTP on the same weights (F32 and the shipped "
                       "Q4_1 GGUF), OpenAI streaming chat at each --clients level plus a "
                       "shared 400-token system prompt; llama-server is built once into "
                       "SURESERVE_HOME (~5 min).")] = None,
                   contender: Annotated[list[str] | None, typer.Option(
                       help="With --peer: run only the contenders whose name contains this "
                       "(repeatable), e.g. 'sureserve'.")] = None,
                   shared_requests: Annotated[int | None, typer.Option(
                       help="With --peer: requests of the shared-prefix workload (default "
                       "--requests).")] = None,
                   quantized: Annotated[Path | None, typer.Option(
                       help="With --peer: also serve this folder written by `sureserve "
                       "quantize smollm2 --eval FILE -o DIR` (short workload).")] = None,
                   alternate: Annotated[int, typer.Option(
                       help="With --peer: rounds of --sample one-client requests run "
                       "again with every contender up at once, each request sent to one "
                       "after the other (the machine's drift hits all alike); 0: off.")] = 3,
                   output: BenchOut = None) -> None:
    """Continuous batching vs generate one at a time vs static left-padded batches (or,
    with --peer llama.cpp, the server against llama.cpp's)."""
    from sureserve.bench.generate import print_report, run_generate_bench

    if peer is not None:
        from sureserve.bench import chat

        chat.print_report(chat.run_chat_bench(peer, levels=levels or [1, 8, 32],
                                              requests=n, single=sample, seed=seed,
                                              max_tokens=max_new, only=contender or (),
                                              shared_requests=shared_requests,
                                              quantized=quantized, alternate=alternate,
                                              out=_bench_out(output, "generate-peer")),
                          _report)
        return
    print_report(run_generate_bench(model, n=n, sample=sample, levels=levels or [1, 8, 32],
                                    seed=seed, min_new=min_new, max_new=max_new,
                                    out=_bench_out(output, "generate")), _report)


@bench_app.command("quantize")
def bench_quantize(n: BenchN = 1200, long_share: BenchLong = 0.1,
                   seed: Annotated[int, typer.Option(help="Mix seed.")] = 11,
                   onnx: Annotated[str | None, typer.Option(
                       help="Python of a venv with sentence-transformers[onnx]: its ONNX "
                       "dynamic int8 export runs as a peer.")] = None,
                   openvino: Annotated[str | None, typer.Option(
                       help="Python of a venv with sentence-transformers[openvino]: its "
                       "OpenVINO static int8 export runs as a peer.")] = None,
                   part: Annotated[list[str] | None, typer.Option(
                       "--part", help="embed, classify, generate (repeatable; default "
                       "all).")] = None,
                   output: BenchOut = None) -> None:
    """quantize on minilm (with peers), sentiment-demo (labelled) and smollm2 (decode)."""
    from sureserve.bench.quantize import print_report, run_bench

    peers = {k: v for k, v in (("onnx", onnx), ("openvino", openvino)) if v}
    print_report(run_bench(n, long_share, seed, peers, part or ("embed", "classify", "generate"),
                           out=_bench_out(output, "quantize"), log=_report), _report)
