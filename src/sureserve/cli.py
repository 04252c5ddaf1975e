"""The ``sureserve`` command line: it parses and calls. Every setting's flag is generated
from ``Settings`` (``clikit.with_settings``), so a flag, its env var and its help are one
field; the ``bench`` group lives in ``bench/cli.py``."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from sureserve.bench.cli import bench_app
from sureserve.clikit import (
    FreqOpt,
    GenModel,
    JsonOpt,
    ModelArg,
    PresOpt,
    RepOpt,
    RevisionOpt,
    SeedOpt,
    StopOpt,
    TaskOpt,
    TempOpt,
    TopKOpt,
    TopPOpt,
    err,
    out,
    with_settings,
)
from sureserve.clikit import report as _report
from sureserve.errors import GateError, ModelSourceError, SettingsError, SureserveError
from sureserve.jobcli import COMMANDS
from sureserve.settings import GROUPS, Settings
from sureserve.zoo.cli import models, zoo_app

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Run transformer models fast, and never silently wrong.")
app.add_typer(zoo_app, name="zoo")
app.command()(models)
app.add_typer(bench_app, name="bench")
for _command in COMMANDS:  # embed, classify, rerank: jobcli.py
    app.command()(_command)
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT)
    try:
        app()
    except SureserveError as exc:
        # soft_wrap: the message stays one line whatever the width (rich would break it at
        # 80 columns when stderr is a file or a pipe, where people and scripts grep it)
        err.print(f"[bold red]error:[/] {exc.message}", highlight=False, soft_wrap=True)
        if exc.fix:
            err.print(f"[bold]fix:[/] {exc.fix}", highlight=False, soft_wrap=True)
        sys.exit(exit_code(exc))


def exit_code(exc: SureserveError) -> int:
    """2: usage (a setting, an unknown model, a task the model cannot do), like click's own;
    3: a failed gate, like ``sureserve check``; 1: anything else (bad input, the model)."""
    from sureserve.errors import TaskMismatchError

    if isinstance(exc, SettingsError | ModelSourceError | TaskMismatchError):
        return 2
    return 3 if isinstance(exc, GateError) else 1


@app.command("settings")
@with_settings(*GROUPS)
def settings_cmd(settings: Settings) -> None:
    """Every setting in force (flags, SURESERVE_* variables, defaults), as JSON. The README's
    table comes from the same fields: Settings.table() in sureserve.settings."""
    print(settings.model_dump_json(indent=2))


@app.command()
@with_settings("source", "plan", "generation")
def info(model: ModelArg, settings: Settings, task: TaskOpt = None, revision: RevisionOpt = None,
         as_json: JsonOpt = False) -> None:
    """Show the load plan and why, and what the model folder holds."""
    from sureserve.loading.describe import describe, print_info

    d = describe(model, task, revision, settings)
    if as_json:
        print(json.dumps(d, indent=2))
    else:
        print_info(d, out)


@app.command()
@with_settings("source", "plan")
def check(model: ModelArg, settings: Settings,
          tokenizer: Annotated[str | None, typer.Option("--tokenizer", help="Check this "
                               "tokenizer with the model instead of the model's own.")] = None,
          task: TaskOpt = None, revision: RevisionOpt = None, as_json: JsonOpt = False) -> None:
    """Run the preflight gate. Exit 0: nothing failed; 3: a check failed; 2: usage error."""
    import sureserve

    report = sureserve.check(model, tokenizer=tokenizer, task=task, revision=revision,
                             settings=settings)
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        report.render(Console(width=160))
    raise typer.Exit(0 if report.passed else 3)


@app.command()
@with_settings(*GROUPS)
def serve(settings: Settings, models: Annotated[list[str] | None, typer.Argument(
        help="Models to serve; requests choose with the 'model' field (default: minilm).")]
          = None) -> None:
    """Serve models over HTTP (TEI- and OpenAI-style routes). SIGTERM drains, then exits 0."""
    from sureserve.server.run import serve as run_server
    from sureserve.zoo import DEFAULT_MODEL

    names = list(dict.fromkeys(models or [DEFAULT_MODEL]))
    err.print(f"serving {', '.join(names)} on http://{settings.host}:{settings.port} "
              "(GET /health answers 200 once the models passed their gate)", highlight=False)
    if settings.ray:
        from sureserve.ray.serving import serve_on_ray

        serve_on_ray(names, settings)
        return
    run_server(names, settings)


@app.command()
@with_settings("source", "plan", "generation")
def generate(prompts: Annotated[list[str], typer.Argument(help="Prompt(s). One prompt is "
                                                          "streamed as it is generated.")],
             settings: Settings, model: GenModel = "smollm2",
             chat: Annotated[bool, typer.Option("--chat", help="Send each prompt as a user "
                             "message through the model's chat template.")] = False,
             temperature: TempOpt = 0.0, top_p: TopPOpt = 1.0, top_k: TopKOpt = 0,
             repetition_penalty: RepOpt = 1.0, stop: StopOpt = None, seed: SeedOpt = None,
             frequency_penalty: FreqOpt = 0.0, presence_penalty: PresOpt = 0.0,
             logprobs: Annotated[int | None, typer.Option(
                 "--logprobs", help="With --json: each generated token's log-probability "
                 "and this many alternatives (0..20).")] = None,
             as_json: Annotated[bool, typer.Option(
                 "--json", help="Print one JSON line per prompt (text, finish_reason, "
                 "token counts) instead of streaming.")] = False,
             json_schema: Annotated[Path | None, typer.Option(
                 "--json-schema", help="A JSON schema file: every output is JSON valid "
                 "against it (constrained decoding), unless max_new_tokens cuts it "
                 "(finish_reason length).")] = None) -> None:
    """Generate text (greedy by default). Several prompts run together, batched."""
    import sureserve

    response_format = None
    if json_schema is not None:
        try:
            schema = json.loads(json_schema.read_text())
        except (OSError, ValueError) as exc:
            raise SettingsError(f"--json-schema {json_schema}: {exc}",
                                "pass a readable file holding one JSON schema") from exc
        response_format = {"type": "json_schema",
                           "json_schema": {"name": json_schema.stem, "schema": schema}}
    engine = sureserve.load(model, task="generate", settings=settings)
    params: dict[str, Any] = {
        "temperature": temperature, "top_p": top_p, "top_k": top_k,
        "repetition_penalty": repetition_penalty, "stop": stop or (), "seed": seed,
        "frequency_penalty": frequency_penalty, "presence_penalty": presence_penalty,
        "logprobs": logprobs, "response_format": response_format}
    inputs: list[Any] = [[{"role": "user", "content": p}] if chat else p for p in prompts]
    as_json = as_json or logprobs is not None  # log-probabilities need the JSON lines
    if len(inputs) == 1 and not as_json:
        for piece in engine.stream(inputs[0], **params):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return
    for prompt, c in zip(prompts, engine.complete(inputs, **params), strict=True):
        if as_json:
            row: dict[str, Any] = {"prompt": prompt, "text": c.text,
                                   "finish_reason": c.finish_reason,
                                   "prompt_tokens": c.prompt_tokens,
                                   "completion_tokens": c.completion_tokens, "error": c.error}
            if c.logprobs is not None:
                tok = engine.tokenizer
                row["logprobs"] = [{"token": tok.decode([x.token]), "logprob": x.logprob,
                                    "top": [[tok.decode([t]), v] for t, v in x.top]}
                                   for x in c.logprobs]
            print(json.dumps(row))
        else:
            out.rule(prompt[:60])
            print(c.text)


@app.command("chat")
@with_settings("source", "plan", "generation")
def chat_cmd(settings: Settings, model: GenModel = "smollm2",
             system: Annotated[str | None, typer.Option("--system", help="System message.")]
             = None, temperature: TempOpt = 0.0, top_p: TopPOpt = 1.0, top_k: TopKOpt = 0,
             repetition_penalty: RepOpt = 1.0, seed: SeedOpt = None) -> None:
    """Interactive chat with the model's chat template. /reset clears, /exit or EOF quits."""
    import sureserve

    engine = sureserve.load(model, task="generate", settings=settings)
    params = {"temperature": temperature, "top_p": top_p, "top_k": top_k,
              "repetition_penalty": repetition_penalty, "seed": seed}
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
@with_settings("source", "generation", "allow_offload")
def fit(model: ModelArg, settings: Settings, task: TaskOpt = None, revision: RevisionOpt = None,
        gpus: Annotated[int | None, typer.Option(help="Simulate this many GPUs.")] = None,
        gpu_memory: Annotated[float | None, typer.Option(
            help="Simulate GiB free on each GPU (default 80 when --gpus is given).")] = None,
        cpu_memory: Annotated[float | None, typer.Option(help="Simulate GiB of free host "
                                                         "memory.")] = None,
        as_json: JsonOpt = False) -> None:
    """Plan where a model fits, from its config alone (no weights read): one device, a
    split across GPUs, 8/4-bit, or offload. Exit 0 with a plan, 3 when it does not fit.
    Without flags it plans for this machine's devices and free memory."""
    from sureserve.loading.fit import fit_model, print_fit

    rep = fit_model(model, settings, task=task, revision=revision, gpus=gpus,
                    gpu_memory=gpu_memory, cpu_memory=cpu_memory,
                    allow_offload=settings.allow_offload)
    if as_json:
        print(json.dumps(rep, indent=2))
    else:
        print_fit(rep, Console(width=160))
    raise typer.Exit(3 if rep["plan"]["placement"] == "refuse" else 0)


@app.command()
@with_settings("source")
def quantize(
    model: ModelArg, settings: Settings,
    eval_file: Annotated[Path, typer.Option("--eval", help="Texts typical of your traffic "
                                            "(.txt, .jsonl or .csv): a quarter (at most 64) "
                                            "calibrate the layer search, the rest measure.")],
    field_name: Annotated[str, typer.Option("--field", help="JSONL field or CSV column of "
                                            "the text.")] = "text",
    label_field: Annotated[str | None, typer.Option(
        "--label-field", help="Field of gold labels (classify): accuracy and its drop.")] = None,
    methods: Annotated[str | None, typer.Option(
        "--methods", help="Comma-separated candidates (default: every method for the "
        "task).")] = None,
    min_cosine: Annotated[float, typer.Option(help="embed: accept when the worst text's "
                                              "cosine with full precision is at least this.")]
    = 0.99,
    min_agreement: Annotated[float, typer.Option(help="classify: share of texts keeping "
                                                 "their label.")] = 0.99,
    max_accuracy_drop: Annotated[float, typer.Option(help="classify with labels: accuracy "
                                                     "points.")] = 1.0,
    max_perplexity_increase: Annotated[float, typer.Option(
        help="generate: relative perplexity increase (0.05 = 5%).")] = 0.05,
    min_speedup: Annotated[float, typer.Option(help="Speed over full precision required; "
                                               "below 1 accepts slower candidates that save "
                                               "memory.")] = 1.0,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the chosen "
                                                "candidate as a model folder here.")] = None,
    dimensions: Annotated[str | None, typer.Option(
        "--dimensions", help="embed: also measure these shorter vector sizes "
        "(comma-separated, e.g. 256,128): recall@10 against full size.")] = None,
    precisions: Annotated[str | None, typer.Option(
        "--precisions", help="embed: also measure these output precisions (int8, uint8, "
        "binary, ubinary).")] = None,
    min_recall: Annotated[float, typer.Option(
        help="Accept a vector size or precision whose recall@10 is at least this.")] = 0.9,
    as_json: JsonOpt = False,
) -> None:
    """Measure precision/quantization candidates on your texts; keep the fastest that holds.
    Exit 0: one was accepted; 3: none was; 2: usage error."""
    from sureserve.loading.precision import get as get_method
    from sureserve.quantize import measure, run

    wanted = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    if wanted == ["none"]:  # only the vectors: no weight candidates
        wanted = []
    for name in wanted or ():
        get_method(name)  # an unknown name is a usage error before anything loads
    try:
        dims = [int(d) for d in dimensions.split(",") if d.strip()] if dimensions else []
    except ValueError as exc:
        raise typer.BadParameter(f"--dimensions takes sizes like 256,128: {exc}") from exc
    precs = [p.strip() for p in precisions.split(",") if p.strip()] if precisions else []
    texts, labels = run.read_eval(eval_file, field_name, label_field)
    thresholds = measure.Thresholds(min_cosine, min_agreement, max_accuracy_drop,
                                    max_perplexity_increase, min_speedup)
    rep = run.quantize(model, texts, labels, methods=wanted, thresholds=thresholds,
                       output=output, settings=settings,
                       say=(lambda m: None) if as_json else _report, dimensions=dims,
                       precisions=precs, min_recall=min_recall)
    if as_json:
        print(run.as_json(rep))
    else:
        run.print_report(rep, Console(width=160))
    vec = rep.get("vectors") or {}
    vec_ok = any(m["status"] == "accepted"
                 for m in [*vec.get("dimensions", []), *vec.get("precisions", [])])
    raise typer.Exit(0 if rep["chosen"] or (wanted == [] and vec_ok) else 3)


@app.command()
@with_settings("source", "plan")
def lock(model: ModelArg, settings: Settings,
         output: Annotated[Path, typer.Option("--output", "-o")] = Path("sureserve.lock"),
         tokenizer: Annotated[str | None, typer.Option("--tokenizer")] = None,
         task: TaskOpt = None, revision: RevisionOpt = None) -> None:
    """Write a lockfile: file hashes, versions, tokenizer fingerprint, golden outputs."""
    import sureserve
    from sureserve.gate.lock import write_lock

    engine = sureserve.load(model, task=task, revision=revision, tokenizer=tokenizer,
                            settings=settings)
    data = write_lock(engine, output)
    err.print(f"wrote {output}: {len(data['files'])} files hashed, "
              f"{len(data['tokenizer']['probe_ids'])} probe texts, "
              f"{data['outputs']['kind']} with tolerance {data['outputs']['tolerance']:g}",
              highlight=False)


@app.command()
@with_settings("source")
def verify(settings: Settings, lockfile: Annotated[Path, typer.Argument(
        help="Lockfile to check against.")] = Path("sureserve.lock"),
           as_json: JsonOpt = False) -> None:
    """Recompute a lockfile's facts. Exit 0 when token ids and outputs agree, 3 otherwise."""
    from sureserve.api import load_locked
    from sureserve.gate.lock import verify as verify_lock

    if not lockfile.is_file():
        raise SettingsError(f"no lockfile at {lockfile}", "write one with `sureserve lock MODEL`")
    data = json.loads(lockfile.read_text(encoding="utf-8"))
    engine = load_locked(data, settings)
    rep = verify_lock(data, engine)
    if as_json:
        print(json.dumps(rep.to_dict(), indent=2))
    else:
        gate = engine.gate_report
        if gate is not None and not gate.passed:
            out.print(f"[yellow]note:[/] {gate.summary()} (run `sureserve check` for details)")
        rep.render(out)
    raise typer.Exit(0 if rep.ok else 3)


@app.command()
@with_settings("source", "plan", "batching", "generation", "api_key")
def doctor(settings: Settings, model: Annotated[str | None, typer.Argument(
        help="Zoo alias, folder or hub id to examine here.")] = None,
           url: Annotated[str | None, typer.Option("--url", help="A running sureserve "
                          "server to examine (its /health, /info and /metrics).")] = None,
           lock: Annotated[Path | None, typer.Option("--lock", help="Lockfile to verify "
                           "against (default: ./sureserve.lock when present).")] = None,
           sample: Annotated[Path | None, typer.Option("--sample", help="Typical inputs "
                             "(.txt, .jsonl, .csv): the share over the limit.")] = None,
           html: Annotated[Path | None, typer.Option("--html", help="Also write the findings "
                           "and charts as one self-contained HTML page.")] = None,
           task: TaskOpt = None, as_json: JsonOpt = False) -> None:
    """The debug guide as checks: same output for different inputs, OOM, 10x slow,
    truncated text, multi-GPU load, wrong outputs after an upgrade, empty input_ids; with
    --url, a running server's capacity, 429s, padding, truncation, drift and gate. Exit 0:
    nothing failed; 3: something did; 2: usage error."""
    from sureserve.doctor import run_doctor
    from sureserve.doctor.page import render

    rep = run_doctor(model, url=url, lock=lock, sample=sample, settings=settings, task=task)
    if html is not None:
        html.write_text(render(rep), encoding="utf-8")
        err.print(f"wrote {html}", highlight=False)
    if as_json:
        print(json.dumps(rep.to_dict(), indent=2))
    else:
        rep.render(Console(width=200))
    raise typer.Exit(rep.exit_code)


if __name__ == "__main__":
    main()
