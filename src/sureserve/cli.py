"""The ``sureserve`` command line. Flags' help text comes from ``Settings``."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from sureserve.errors import (
    BadLineError,
    GateError,
    ModelSourceError,
    SettingsError,
    SureserveError,
    TaskMismatchError,
)
from sureserve.settings import Settings

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Run transformer models fast, and never silently wrong.")
zoo_app = typer.Typer(no_args_is_help=True, help="Build or inspect the packaged model zoo.")
app.add_typer(zoo_app, name="zoo")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (print a table, write JSON).")
app.add_typer(bench_app, name="bench")
err = Console(stderr=True)
out = Console()
F = TypeVar("F", bound=Callable[..., Any])


def _opt(name: str, *flags: str) -> Any:
    return typer.Option(*flags, help=Settings.help(name), show_default=False)


ModelArg = Annotated[str, typer.Option("--model", "-m", help="Zoo alias, folder or hub id.")]
TaskOpt = Annotated[str | None, typer.Option("--task", help="embed, classify or generate "
                                              "(default: inferred from the config).")]
RevisionOpt = Annotated[str | None, typer.Option("--revision", help="Pinned hub revision.")]
DeviceOpt = Annotated[str | None, _opt("device", "--device")]
DtypeOpt = Annotated[str | None, _opt("dtype", "--dtype")]
AttnOpt = Annotated[str | None, _opt("attn_implementation", "--attn")]
PickleOpt = Annotated[bool | None, _opt("allow_pickle", "--allow-pickle/--no-allow-pickle")]
TruncOpt = Annotated[str | None, _opt("truncation", "--truncation")]
StrideOpt = Annotated[int | None, _opt("chunk_stride", "--chunk-stride")]
BudgetOpt = Annotated[int | None, _opt("max_batch_tokens", "--max-batch-tokens")]
SkipOpt = Annotated[bool | None, _opt("skip_bad_lines", "--skip-bad-lines/--no-skip-bad-lines")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except SureserveError as exc:
        err.print(f"[bold red]error:[/] {exc.message}", highlight=False)
        if exc.fix:
            err.print(f"[bold]fix:[/] {exc.fix}", highlight=False)
        # usage errors (bad settings, unknown models) exit 2 like click's own, a failed gate
        # 3 like `sureserve check`, anything else 1
        if isinstance(exc, SettingsError | ModelSourceError | TaskMismatchError):
            sys.exit(2)
        sys.exit(3 if isinstance(exc, GateError) else 1)


@app.command()
def models(as_json: JsonOpt = False) -> None:
    """List the packaged model zoo."""
    from sureserve.zoo import DEFAULT_MODEL, ZOO

    s = Settings()
    rows: list[dict[str, Any]] = [
        {"name": e.name, "task": e.task, "default": e.name == DEFAULT_MODEL,
         "ready": e.is_ready(s), "package": e.package, "description": e.description}
        for e in ZOO.values()]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    t = Table("alias", "task", "ready", "from package", "description")
    for r in rows:
        name = r["name"] + (" (default)" if r["default"] else "")
        ready = "yes" if r["ready"] else "built on first use"
        t.add_row(name, r["task"], ready, r["package"], r["description"])
    out.print(t)


@app.command()
def info(model: Annotated[str, typer.Argument(help="Zoo alias, folder or hub id.")],
         task: TaskOpt = None, revision: RevisionOpt = None, device: DeviceOpt = None,
         dtype: DtypeOpt = None, attn: AttnOpt = None, allow_pickle: PickleOpt = None,
         as_json: JsonOpt = False) -> None:
    """Show the load plan and why, and what the model folder holds."""
    from sureserve.loading.describe import describe

    s = Settings.build(device=device, dtype=dtype, attn_implementation=attn,
                       allow_pickle=allow_pickle)
    d = describe(model, task, revision, s)
    if as_json:
        print(json.dumps(d, indent=2))
        return
    _print_info(d)


def _print_info(d: dict[str, Any]) -> None:
    plan = d["plan"]
    out.print(f"[bold]{d['identifier']}[/] ({d['source']}) → {d['path']}")
    t = Table(show_header=False, box=None)
    params = d["parameters"]
    for k, v in [
        ("task", d["task"]), ("architecture", f"{d['architecture']} ({d['model_type']})"),
        ("parameters", f"{params:,}" if params else "unknown"),
        ("vocab (config / tokenizer)", f"{d['config_vocab_size']} / {d['tokenizer_vocab_size']} "
                                      f"({d['tokenizer_class']})"),
        ("max positions", d["max_position_embeddings"]),
        ("usable max tokens", f"{d['usable_max_tokens']} (set by {d['usable_max_bound_by']})"),
        ("special tokens", ", ".join(f"{k}={v}" for k, v in d["special_tokens"].items())),
        ("sentence-transformers", d["sentence_transformers"]),
        ("labels", d["labels"]),
        ("chat template", d["chat_template"]),
        ("KV cache bytes/token", d["kv_cache_bytes_per_token"]),
        ("KV cache budget", f"{d['kv_cache_budget']['mb']:g} MiB = "
                            f"{d['kv_cache_budget']['tokens']:,} tokens (--kv-cache-mb)"
         if d.get("kv_cache_budget") else None),
        ("plan", f"device={plan['device']} dtype={plan['dtype']} "
                 f"attention={plan['attn_implementation']}"),
    ]:
        if v is not None:
            t.add_row(f"[bold]{k}[/]", str(v))
    out.print(t)
    for r in plan["reasons"]:
        out.print(f"  why: {r}", highlight=False)
    for w in plan["warnings"]:
        out.print(f"  [yellow]warning:[/] {w}", highlight=False)
    ft = Table("file", "bytes")
    for f in d["files"]:
        ft.add_row(f["name"], f"{f['bytes']:,}")
    out.print(ft)


@app.command()
def check(model: Annotated[str, typer.Argument(help="Zoo alias, folder or hub id.")],
          tokenizer: Annotated[str | None, typer.Option("--tokenizer", help="Check this "
                               "tokenizer with the model instead of the model's own.")] = None,
          task: TaskOpt = None, revision: RevisionOpt = None, device: DeviceOpt = None,
          dtype: DtypeOpt = None, allow_pickle: PickleOpt = None,
          as_json: JsonOpt = False) -> None:
    """Run the preflight gate. Exit 0: nothing failed; 3: a check failed; 2: usage error."""
    import sureserve

    report = sureserve.check(model, tokenizer=tokenizer, task=task, revision=revision,
                             device=device, dtype=dtype, allow_pickle=allow_pickle)
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        colour = {"pass": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}
        t = Table("check", "status", "evidence / fix", title=f"gate: {report.model} with "
                  f"tokenizer {report.tokenizer}", show_lines=True)
        for c in report.checks:
            text = c.evidence + (f"\n[bold]fix:[/] {c.fix}" if c.fix and c.status != "pass"
                                 else "")
            t.add_row(c.name, f"[{colour[c.status]}]{c.status}[/]", text)
        Console(width=160).print(t)
        out.print(report.summary(), highlight=False)
    raise typer.Exit(0 if report.passed else 3)


@app.command()
def serve(models: Annotated[list[str] | None, typer.Argument(help="Models to serve; requests "
                            "choose with the 'model' field (default: minilm).")] = None,
          host: Annotated[str | None, _opt("host", "--host")] = None,
          port: Annotated[int | None, _opt("port", "--port")] = None,
          api_key: Annotated[str | None, _opt("api_key", "--api-key")] = None,
          max_batch_tokens: BudgetOpt = None,
          max_wait_ms: Annotated[float | None, _opt("max_wait_ms", "--max-wait-ms")] = None,
          max_queue_inputs: Annotated[int | None, _opt("max_queue_inputs",
                                                       "--max-queue-inputs")] = None,
          max_client_batch: Annotated[int | None, _opt("max_client_batch",
                                                       "--max-client-batch")] = None,
          max_payload_bytes: Annotated[int | None, _opt("max_payload_bytes",
                                                        "--max-payload-bytes")] = None,
          truncation: TruncOpt = None, device: DeviceOpt = None, dtype: DtypeOpt = None,
          accept_gate_failure: Annotated[bool | None, _opt(
              "accept_gate_failure", "--accept-gate-failure/--no-accept-gate-failure")] = None,
          kv_cache_mb: KvOpt = None,
          max_running_seqs: Annotated[int | None, _opt("max_running_seqs",
                                                       "--max-running-seqs")] = None,
          max_new_tokens: Annotated[int | None, _opt("max_new_tokens",
                                                     "--max-new-tokens")] = None,
          forward_workers: Annotated[int | None, _opt("forward_workers",
                                                      "--forward-workers")] = None,
          ) -> None:
    """Serve models over HTTP (TEI- and OpenAI-style routes). SIGTERM drains, then exits 0."""
    import os

    # OpenMP threads busy-wait after each parallel region by default; on a small machine
    # that spinning starves the event loop that parses and tokenizes the next requests
    # (measured: 0.13 -> 0.33 of offline throughput at 32 clients on 2 cores). Must be set
    # before torch loads its OpenMP runtime; an explicit user setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # start-up decisions (workers and threads, measured pass cost, packing on or off and
    # why, gate summary) are worth a line each; nothing is logged per request at INFO
    logging.getLogger("sureserve.server").setLevel(logging.INFO)
    from sureserve.server.app import create_app
    from sureserve.server.run import serve_forever
    from sureserve.zoo import DEFAULT_MODEL

    s = Settings.build(host=host, port=port, api_key=api_key, max_batch_tokens=max_batch_tokens,
                       max_wait_ms=max_wait_ms, max_queue_inputs=max_queue_inputs,
                       max_client_batch=max_client_batch, max_payload_bytes=max_payload_bytes,
                       truncation=truncation, device=device, dtype=dtype,
                       accept_gate_failure=accept_gate_failure, kv_cache_mb=kv_cache_mb,
                       max_running_seqs=max_running_seqs, max_new_tokens=max_new_tokens,
                       forward_workers=forward_workers)
    names = list(dict.fromkeys(models or [DEFAULT_MODEL]))
    app_ = create_app(s, names)
    err.print(f"serving {', '.join(names)} on http://{s.host}:{s.port} "
              "(GET /health answers 200 once the models passed their gate)", highlight=False)
    serve_forever(app_, s.host, s.port)


GenModel = Annotated[str, typer.Option("--model", "-m", help="Zoo alias, folder or hub id of "
                                       "a causal language model.")]
MaxNewOpt = Annotated[int | None, typer.Option("--max-new-tokens", "-n", help=Settings.help(
    "max_new_tokens"), show_default=False)]
TempOpt = Annotated[float, typer.Option("--temperature", "-t", help="0 is greedy.")]
TopPOpt = Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass (1 = off).")]
TopKOpt = Annotated[int, typer.Option("--top-k", help="Keep the k likeliest tokens (0 = off).")]
RepOpt = Annotated[float, typer.Option("--repetition-penalty", help="> 1 discourages repeats.")]
StopOpt = Annotated[list[str] | None, typer.Option("--stop", help="Stop string (repeatable, "
                                                   "not included in the output).")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Makes sampling reproducible.")]
KvOpt = Annotated[float | None, _opt("kv_cache_mb", "--kv-cache-mb")]


def _sampling(max_new_tokens: int | None, temperature: float, top_p: float, top_k: int,
              repetition_penalty: float, stop: list[str] | None, seed: int | None
              ) -> dict[str, Any]:
    return {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
            "top_k": top_k, "repetition_penalty": repetition_penalty,
            "stop": stop or (), "seed": seed}


@app.command()
def generate(prompts: Annotated[list[str], typer.Argument(help="Prompt(s). One prompt is "
                                                          "streamed as it is generated.")],
             model: GenModel = "smollm2", chat: Annotated[bool, typer.Option(
                 "--chat", help="Send each prompt as a user message through the model's "
                 "chat template.")] = False,
             max_new_tokens: MaxNewOpt = None, temperature: TempOpt = 0.0, top_p: TopPOpt = 1.0,
             top_k: TopKOpt = 0, repetition_penalty: RepOpt = 1.0, stop: StopOpt = None,
             seed: SeedOpt = None, kv_cache_mb: KvOpt = None, device: DeviceOpt = None,
             dtype: DtypeOpt = None, as_json: Annotated[bool, typer.Option(
                 "--json", help="Print one JSON line per prompt (text, finish_reason, "
                 "token counts) instead of streaming.")] = False) -> None:
    """Generate text (greedy by default). Several prompts run together, batched."""
    import sureserve

    engine = sureserve.load(model, task="generate", device=device, dtype=dtype,
                            kv_cache_mb=kv_cache_mb)
    params = _sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty, stop,
                       seed)
    inputs: list[Any] = [[{"role": "user", "content": p}] if chat else p for p in prompts]
    if len(inputs) == 1 and not as_json:
        for piece in engine.stream(inputs[0], **params):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return
    for prompt, c in zip(prompts, engine.complete(inputs, **params), strict=True):
        if as_json:
            print(json.dumps({"prompt": prompt, "text": c.text, "finish_reason": c.finish_reason,
                              "prompt_tokens": c.prompt_tokens,
                              "completion_tokens": c.completion_tokens, "error": c.error}))
        else:
            out.rule(prompt[:60])
            print(c.text)


@app.command("chat")
def chat_cmd(model: GenModel = "smollm2",
             system: Annotated[str | None, typer.Option("--system", help="System message.")]
             = None, max_new_tokens: MaxNewOpt = None, temperature: TempOpt = 0.0,
             top_p: TopPOpt = 1.0, top_k: TopKOpt = 0, repetition_penalty: RepOpt = 1.0,
             seed: SeedOpt = None, device: DeviceOpt = None) -> None:
    """Interactive chat with the model's chat template. /reset clears, /exit or EOF quits."""
    import sureserve

    engine = sureserve.load(model, task="generate", device=device)
    params = _sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty, None,
                       seed)
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    tty = sys.stdin.isatty()
    while True:
        if tty:
            err.print("[bold]>[/] ", end="")
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            history = history[:1] if system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line.rstrip("\n")})
        reply = []
        for piece in engine.stream(history, **params):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})


@app.command()
def lock(model: Annotated[str, typer.Argument(help="Zoo alias, folder or hub id.")],
         output: Annotated[Path, typer.Option("--output", "-o")] = Path("sureserve.lock"),
         tokenizer: Annotated[str | None, typer.Option("--tokenizer")] = None,
         task: TaskOpt = None, revision: RevisionOpt = None, device: DeviceOpt = None,
         dtype: DtypeOpt = None) -> None:
    """Write a lockfile: file hashes, versions, tokenizer fingerprint, golden outputs."""
    import sureserve
    from sureserve.gate.lock import write_lock

    engine = sureserve.load(model, task=task, revision=revision, tokenizer=tokenizer,
                            device=device, dtype=dtype)
    data = write_lock(engine, output)
    err.print(f"wrote {output}: {len(data['files'])} files hashed, "
              f"{len(data['tokenizer']['probe_ids'])} probe texts, "
              f"{data['outputs']['kind']} with tolerance {data['outputs']['tolerance']:g}",
              highlight=False)


@app.command()
def verify(lockfile: Annotated[Path, typer.Argument(help="Lockfile to check against.")] =
           Path("sureserve.lock"), as_json: JsonOpt = False) -> None:
    """Recompute a lockfile's facts. Exit 0 when token ids and outputs agree, 3 otherwise."""
    import sureserve
    from sureserve.gate.lock import verify as verify_lock

    if not lockfile.is_file():
        raise SettingsError(f"no lockfile at {lockfile}", "write one with `sureserve lock MODEL`")
    data = json.loads(lockfile.read_text(encoding="utf-8"))
    m = data["model"]
    engine = sureserve.load(m["identifier"],
                            task=m["task"], revision=m["snapshot"] or m["revision"],
                            tokenizer=data.get("tokenizer_source"),
                            device=data["plan"]["device"], dtype=data["plan"]["dtype"],
                            accept_gate_failure=True)
    rep = verify_lock(data, engine)
    if as_json:
        print(json.dumps(rep.to_dict(), indent=2))
    else:
        for title, items in (("a file changed", rep.files),
                             ("the tokenizer now produces different ids", rep.tokenizer),
                             ("library versions changed", rep.versions),
                             ("outputs drifted beyond tolerance", rep.outputs)):
            mark = "[green]ok[/]" if not items else f"[yellow]{len(items)}[/]"
            out.print(f"{mark} {title}")
            for item in items:
                out.print(f"    {item}", highlight=False)
        out.print(f"largest output difference: {rep.max_drift:.2e}")
        gate = engine.gate_report
        if gate is not None and not gate.passed:
            out.print(f"[yellow]note:[/] {gate.summary()} (run `sureserve check` for details)")
        out.print("[green]verified[/]" if rep.ok else "[bold red]NOT verified[/]")
    raise typer.Exit(0 if rep.ok else 3)


@zoo_app.command("build")
def zoo_build(names: Annotated[list[str] | None, typer.Argument(help="Aliases (default: all).")]
              = None, corpora: Annotated[bool, typer.Option(help="Also fetch the corpora.")]
              = True) -> None:
    """Build zoo entries and fetch corpora now, instead of on first use."""
    from sureserve.zoo import ZOO
    from sureserve.zoo.corpora import bbc_dir, vader_dir

    s = Settings()
    if corpora:
        err.print(f"corpora: vader at {vader_dir(s)}, bbc at {bbc_dir()}")
    for name in names or list(ZOO):
        if name not in ZOO:
            raise SureserveError(f"unknown zoo alias {name!r}", f"use one of {', '.join(ZOO)}")
        err.print(f"{name}: {ZOO[name].path(s)}")


def _texts_source(texts: list[str] | None, input_file: Path | None, field: str,
                  skip: bool, skipped: list[BadLineError]) -> tuple[Iterator[Any], str]:
    from sureserve.textio import Record, read_records

    if texts and input_file:
        raise typer.BadParameter("give texts as arguments or --input, not both")
    if texts:
        return iter([Record(i + 1, t) for i, t in enumerate(texts)]), "args"
    if input_file is None:
        return read_records(sys.stdin.buffer, ".txt", skip=skip, skipped=skipped), "stdin"
    fmt = input_file.suffix.lower()
    fh = open(input_file, "rb")  # noqa: SIM115 - closed when the process ends
    return read_records(fh, fmt, field=field, skip=skip, skipped=skipped), str(input_file)


def _run_texts(kind: str, model: str, texts: list[str] | None, input_file: Path | None,
               output: Path | None, field: str, settings: Settings, task: str | None,
               emit: Callable[[Any, list[Any], Any], None], finish: Callable[[], None]) -> None:
    import sureserve
    from sureserve.engine import RunSummary
    from sureserve.textio import windows

    skipped: list[BadLineError] = []
    records, _ = _texts_source(texts, input_file, field, settings.skip_bad_lines, skipped)
    engine = sureserve.load(model, task=task, settings=settings)
    total = RunSummary()
    from tqdm.auto import tqdm

    bar = tqdm(unit="text", desc=kind, disable=None, file=sys.stderr)
    done = 0
    try:
        for win in windows(records, settings.planner_window):
            rows, summary = engine.run([r.text for r in win], first_index=done,
                                       on_texts_done=bar.update)
            emit(engine, win, (rows, summary, done))
            total.add(summary)
            done += len(win)
    finally:
        finish()
        bar.close()
        for bad in skipped:
            err.print(f"[yellow]skipped[/] {bad.message}", highlight=False)
        err.print(f"{kind}: {total.line()}" + (f", {len(skipped)} bad lines skipped"
                                                if skipped else ""), highlight=False)


@app.command()
def embed(texts: Annotated[list[str] | None, typer.Argument(help="Texts (or use --input / "
                                                            "stdin).")] = None,
          model: ModelArg = "minilm",
          input_file: Annotated[Path | None, typer.Option("--input", "-i", help=".txt, .jsonl or "
                                                          ".csv file.")] = None,
          output: Annotated[Path | None, typer.Option("--output", "-o", help=".jsonl or .npy "
                                                      "(default: JSONL on stdout).")] = None,
          field: Annotated[str, typer.Option(help="JSONL field or CSV column.")] = "text",
          normalize: Annotated[bool | None, typer.Option("--normalize/--no-normalize",
                               help="Unit-length vectors (default: as the model says).")] = None,
          truncation: TruncOpt = None, chunk_stride: StrideOpt = None,
          max_batch_tokens: BudgetOpt = None, skip_bad_lines: SkipOpt = None,
          device: DeviceOpt = None, dtype: DtypeOpt = None) -> None:
    """Embed texts; writes one JSON line per text (or a .npy matrix) in input order."""
    from sureserve.textio import JsonlWriter, NpyWriter

    s = Settings.build(truncation=truncation, chunk_stride=chunk_stride, device=device,
                       dtype=dtype, max_batch_tokens=max_batch_tokens,
                       skip_bad_lines=skip_bad_lines)
    npy = output is not None and output.suffix == ".npy"
    writer: Any = NpyWriter(output) if npy and output else JsonlWriter(output)

    def emit(engine: Any, win: list[Any], res: Any) -> None:
        rows, summary, start = res
        vecs = engine.task.postprocess(rows, normalize=normalize)
        if npy:
            writer.write(vecs)
            return
        cut = set(summary.truncated)
        writer.write({"index": start + i, "line": r.line, "embedding": v.tolist(),
                      "truncated": start + i in cut, "windows": summary.chunked.get(start + i, 1)}
                     for i, (r, v) in enumerate(zip(win, vecs, strict=True)))

    _run_texts("embed", model, texts, input_file, output, field, s, "embed", emit, writer.close)


@app.command()
def classify(texts: Annotated[list[str] | None, typer.Argument(help="Texts (or use --input / "
                                                               "stdin).")] = None,
             model: ModelArg = "sentiment-demo",
             input_file: Annotated[Path | None, typer.Option("--input", "-i", help=".txt, .jsonl "
                                                             "or .csv file.")] = None,
             output: Annotated[Path | None, typer.Option("--output", "-o", help=".jsonl file "
                                                         "(default: stdout).")] = None,
             field: Annotated[str, typer.Option(help="JSONL field or CSV column.")] = "text",
             top_k: Annotated[int, typer.Option(help="Labels per text (0: all).")] = 1,
             truncation: TruncOpt = None, chunk_stride: StrideOpt = None,
             max_batch_tokens: BudgetOpt = None, skip_bad_lines: SkipOpt = None,
             device: DeviceOpt = None, dtype: DtypeOpt = None) -> None:
    """Classify texts; writes one JSON line per text in input order."""
    from sureserve.textio import JsonlWriter

    s = Settings.build(truncation=truncation, chunk_stride=chunk_stride, device=device,
                       dtype=dtype, max_batch_tokens=max_batch_tokens,
                       skip_bad_lines=skip_bad_lines)
    writer = JsonlWriter(output)

    def emit(engine: Any, win: list[Any], res: Any) -> None:
        rows, summary, start = res
        results = engine.task.postprocess(rows, top_k=top_k or None)
        cut = set(summary.truncated)
        lines = []
        for i, (r, res_i) in enumerate(zip(win, results, strict=True)):
            item = dict(res_i) if top_k == 1 else {"labels": res_i}
            item.update({"index": start + i, "line": r.line, "truncated": start + i in cut,
                         "windows": summary.chunked.get(start + i, 1)})
            lines.append(item)
        writer.write(lines)

    _run_texts("classify", model, texts, input_file, output, field, s, "classify", emit,
               writer.close)


def _bench(kind: str, n: int, long_share: float, skip: list[str] | None, bf16: bool | None,
           output: Path) -> None:
    from sureserve.bench.offline import run_bench

    rep = run_bench(kind, n=n, long_share=long_share, skip=skip or [], bf16=bf16, out=output,
                    log=lambda m: err.print(m, highlight=False))
    fid = "min_cosine_to_ref" if kind == "embed" else "max_prob_diff_to_ref"
    t = Table("contender", "s", "texts/s", "tokens/s", "padding", "peak RSS MB (growth)",
              "x sureserve",
              fid.replace("_", " "), "GEMM eff.",
              title=f"{kind}: {rep['texts']} texts, {rep['real_tokens']} real tokens, "
                    f"GEMM {rep['gemm_gflops']} GFLOP/s")
    for r in rep["results"]:
        eff = r["gemm_efficiency"]
        t.add_row(r["name"], f"{r['seconds']:.1f}", f"{r['texts_per_s']:.1f}",
                  f"{r['tokens_per_s']}", f"{r['padding_share']:.1%} of computed",
                  f"{r['peak_rss_mb']} (+{r['rss_growth_mb']})",
                  f"{r['speed_vs_sureserve']:.3f}", f"{r[fid]:.6f}",
                  f"{eff:.0%}" if eff is not None else "-")
    Console(width=200).print(t)
    err.print(f"wrote {output}")


BenchN = Annotated[int, typer.Option("--n", help="Texts in the corpus.")]
BenchLong = Annotated[float, typer.Option(help="Share of long BBC articles in the mix.")]
BenchSkip = Annotated[list[str] | None, typer.Option("--skip", help="Contender to leave out "
                                                     "(repeatable).")]
BenchBf16 = Annotated[bool | None, typer.Option("--bf16/--no-bf16", help="Also run sureserve "
                                                "in bfloat16 (default: if the CPU has it).")]


@bench_app.command("embed")
def bench_embed(n: BenchN = 2000, long_share: BenchLong = 0.05, skip: BenchSkip = None,
                bf16: BenchBf16 = None,
                output: Annotated[Path, typer.Option("--output", "-o")] =
                Path("bench-results/embed.json")) -> None:
    """Embeddings: pipeline, sentence-transformers, arrival-order batches, sureserve."""
    _bench("embed", n, long_share, skip, bf16, output)


@bench_app.command("classify")
def bench_classify(n: BenchN = 2000, long_share: BenchLong = 0.05, skip: BenchSkip = None,
                   bf16: BenchBf16 = None,
                   output: Annotated[Path, typer.Option("--output", "-o")] =
                   Path("bench-results/classify.json")) -> None:
    """Classification: pipeline, arrival-order batches, sureserve (sentiment-demo)."""
    _bench("classify", n, long_share, skip, bf16, output)


@bench_app.command("serve")
def bench_serve(levels: Annotated[list[int] | None, typer.Option("--clients", help="Concurrency "
                                                                   "levels (repeatable).")] = None,
                seconds: Annotated[float, typer.Option(help="Seconds per level.")] = 10.0,
                max_requests: Annotated[int, typer.Option(help="Cap per level.")] = 3000,
                skip: BenchSkip = None,
                infinity: Annotated[str | None, typer.Option(
                    help="Path of an infinity_emb executable (its own venv) to add "
                    "Infinity as a contender.")] = None,
                output: Annotated[Path, typer.Option("--output", "-o")] =
                Path("bench-results/serve.json")) -> None:
    """HTTP load on loopback: sureserve's server vs a plain FastAPI + pipeline endpoint
    (and Infinity, with --infinity)."""
    from sureserve.bench.serve import run_serve_bench

    rep = run_serve_bench(levels or [1, 8, 32, 64], seconds, max_requests, skip=skip or [],
                          out=output, log=lambda m: err.print(m, highlight=False),
                          infinity=infinity)
    t = Table("contender", "clients", "req/s", "x offline", "p50 ms", "p95 ms", "p99 ms",
              "p99/p50", "avg batch", "errors",
              title=f"serve: offline engine {rep['offline_texts_per_s']} texts/s")
    for name, rows in rep["contenders"].items():
        for r in rows:
            t.add_row(name, str(r["clients"]), str(r["req_per_s"]), str(r["vs_offline"]),
                      str(r["p50_ms"]), str(r["p95_ms"]), str(r["p99_ms"]),
                      str(r["p99_over_p50"]), str(r.get("avg_batch_size", "-")),
                      str(r["errors"]))
    Console(width=200).print(t)
    err.print(f"wrote {output}")


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
                   output: Annotated[Path, typer.Option("--output", "-o")] =
                   Path("bench-results/generate.json")) -> None:
    """Continuous batching vs generate one at a time vs static left-padded batches."""
    from sureserve.bench.generate import run_generate_bench

    rep = run_generate_bench(model, n=n, sample=sample, levels=levels or [1, 8, 32], seed=seed,
                             min_new=min_new, max_new=max_new, out=output)
    t = Table("contender", "clients", "requests", "out tok/s", "TTFT p50 s", "TTFT p99 s",
              "peak RSS MiB", "peak KV MiB", "= one-at-a-time", "= first full run",
              title="generate (greedy; outputs compared token for token)")
    for r in rep["phases"]:
        t.add_row(r["name"], str(r["concurrency"]), str(r["requests"]), str(r["tokens_per_s"]),
                  str(r["ttft_p50_s"]), str(r["ttft_p99_s"]), f"{r['peak_rss_mb']:.0f}",
                  "-" if r["peak_kv_mb"] is None else f"{r['peak_kv_mb']:.0f}",
                  "ref" if r["compared"] is None else f"{r['identical']}/{r['compared']}",
                  "-" if r["same_as_first_full"] is None
                  else f"{r['same_as_first_full']}/{r['requests']}")
    Console(width=200).print(t)
    for k, v in rep["ratios"].items():
        out.print(f"{k}: {v}x", highlight=False)
    err.print(f"wrote {output}")


if __name__ == "__main__":
    main()
