"""The ``sureserve`` command line: it parses and calls. Every setting's flag is generated
from ``Settings`` (``with_settings``), so a flag, its env var and its help are one field."""

from __future__ import annotations

import functools
import inspect
import json
import logging
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from sureserve.errors import GateError, ModelSourceError, SettingsError, SureserveError
from sureserve.settings import GROUPS, Settings

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Run transformer models fast, and never silently wrong.")
zoo_app = typer.Typer(no_args_is_help=True, help="Build or inspect the packaged model zoo.")
app.add_typer(zoo_app, name="zoo")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (print a table, write JSON).")
app.add_typer(bench_app, name="bench")
err = Console(stderr=True)
out = Console()
F = TypeVar("F", bound=Callable[..., Any])
ALIASES = {"attn_implementation": ("--attn",), "max_new_tokens": ("-n",),
           "drift_reference": ("--reference",)}


def _flag(name: str) -> inspect.Parameter:
    """A CLI option for one Settings field: None when not given, so env and default apply."""
    kind: Any = Settings.model_fields[name].annotation
    if isinstance(kind, types.UnionType):  # X | None: the flag is X
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    flag_type: Any = str if typing.get_origin(kind) is typing.Literal else kind
    dashed = "--" + name.replace("_", "-")
    decls = (f"{dashed}/--no-{dashed[2:]}",) if flag_type is bool else (dashed,)
    opt = typer.Option(*decls, *ALIASES.get(name, ()), help=Settings.help(name),
                       show_default=False)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[flag_type | None, opt])


def with_settings(*groups: str) -> Callable[[F], F]:
    """Give a command a flag for every setting in ``groups``; it receives them validated,
    together with the environment, as ``settings``."""
    names = [n for g in groups for n in GROUPS[g]]

    def wrap(fn: F) -> F:
        sig = inspect.signature(fn, eval_str=True)
        params = [p for p in sig.parameters.values() if p.name != "settings"]

        @functools.wraps(fn)
        def command(*args: Any, **kwargs: Any) -> Any:
            given = {n: kwargs.pop(n) for n in names}
            return fn(*args, settings=Settings.build(**given), **kwargs)

        full = sig.replace(parameters=params + [_flag(n) for n in names])
        command.__signature__ = full  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in full.parameters.values()}
        return command  # type: ignore[return-value]

    return wrap


ModelArg = Annotated[str, typer.Argument(help="Zoo alias, folder or hub id.")]
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Zoo alias, folder or hub id.")]
TaskOpt = Annotated[str | None, typer.Option("--task", help="embed, classify, rerank or generate "
                                              "(default: inferred from the config).")]
RevisionOpt = Annotated[str | None, typer.Option("--revision", help="Pinned hub revision.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
InputOpt = Annotated[Path | None, typer.Option("--input", "-i", help=".txt, .jsonl or .csv "
                                               "file.")]
FieldOpt = Annotated[str, typer.Option(help="JSONL field or CSV column.")]
TextsArg = Annotated[list[str] | None, typer.Argument(help="Texts (or use --input / stdin).")]
RayOpt = Annotated[bool, typer.Option("--ray", help="Run on Ray Data: one actor per replica, "
                                      "each with the model (and its gate); --input also "
                                      "takes .parquet, -o also writes .parquet.")]
ReplicasOpt = Annotated[int, typer.Option("--replicas", min=1, help="Ray actors (each gets "
                                          "an equal share of the cluster's CPUs).")]
RayAddressOpt = Annotated[str | None, typer.Option(
    "--ray-address", help="A running Ray cluster (ray start --head ...); default: a local "
    "one started for the job, bound to 127.0.0.1.")]


LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT)
    try:
        app()
    except SureserveError as exc:
        err.print(f"[bold red]error:[/] {exc.message}", highlight=False)
        if exc.fix:
            err.print(f"[bold]fix:[/] {exc.fix}", highlight=False)
        sys.exit(exit_code(exc))


def exit_code(exc: SureserveError) -> int:
    """2: usage (a setting, an unknown model, a task the model cannot do), like click's own;
    3: a failed gate, like ``sureserve check``; 1: anything else (bad input, the model)."""
    from sureserve.errors import TaskMismatchError

    if isinstance(exc, SettingsError | ModelSourceError | TaskMismatchError):
        return 2
    return 3 if isinstance(exc, GateError) else 1


@app.command()
@with_settings("source")
def models(settings: Settings, as_json: JsonOpt = False) -> None:
    """List the packaged model zoo."""
    from rich.table import Table

    from sureserve.zoo import DEFAULT_MODEL, ZOO

    rows: list[dict[str, Any]] = [
        {"name": e.name, "task": e.task_name, "default": e.name == DEFAULT_MODEL,
         "ready": e.is_ready(settings), "package": e.package, "description": e.description}
        for e in ZOO.values()]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    t = Table("alias", "task", "ready", "from package", "description")
    for r in rows:
        t.add_row(r["name"] + (" (default)" if r["default"] else ""), r["task"],
                  "yes" if r["ready"] else "built on first use", r["package"], r["description"])
    out.print(t)


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
          = None, ray: Annotated[bool, typer.Option(
              "--ray", help="Serve as Ray Serve replicas of the same app (Ray's proxy on "
              "--host/--port).")] = False, replicas: ReplicasOpt = 2,
          ray_address: RayAddressOpt = None) -> None:
    """Serve models over HTTP (TEI- and OpenAI-style routes). SIGTERM drains, then exits 0."""
    from sureserve.server.run import serve as run_server
    from sureserve.zoo import DEFAULT_MODEL

    names = list(dict.fromkeys(models or [DEFAULT_MODEL]))
    err.print(f"serving {', '.join(names)} on http://{settings.host}:{settings.port} "
              "(GET /health answers 200 once the models passed their gate)", highlight=False)
    if ray:
        from sureserve.ray.serving import serve_on_ray

        serve_on_ray(names, settings, replicas, ray_address)
        return
    run_server(names, settings)


GenModel = Annotated[str, typer.Option("--model", "-m", help="Zoo alias, folder or hub id of "
                                       "a causal language model.")]
TempOpt = Annotated[float, typer.Option("--temperature", "-t", help="0 is greedy.")]
TopPOpt = Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass (1 = off).")]
TopKOpt = Annotated[int, typer.Option("--top-k", help="Keep the k likeliest tokens (0 = off).")]
RepOpt = Annotated[float, typer.Option("--repetition-penalty", help="> 1 discourages repeats.")]
StopOpt = Annotated[list[str] | None, typer.Option("--stop", help="Stop string (repeatable, "
                                                   "not included in the output).")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Makes sampling reproducible.")]


@app.command()
@with_settings("source", "plan", "generation")
def generate(prompts: Annotated[list[str], typer.Argument(help="Prompt(s). One prompt is "
                                                          "streamed as it is generated.")],
             settings: Settings, model: GenModel = "smollm2",
             chat: Annotated[bool, typer.Option("--chat", help="Send each prompt as a user "
                             "message through the model's chat template.")] = False,
             temperature: TempOpt = 0.0, top_p: TopPOpt = 1.0, top_k: TopKOpt = 0,
             repetition_penalty: RepOpt = 1.0, stop: StopOpt = None, seed: SeedOpt = None,
             as_json: Annotated[bool, typer.Option(
                 "--json", help="Print one JSON line per prompt (text, finish_reason, "
                 "token counts) instead of streaming.")] = False) -> None:
    """Generate text (greedy by default). Several prompts run together, batched."""
    import sureserve

    engine = sureserve.load(model, task="generate", settings=settings)
    params = {"temperature": temperature, "top_p": top_p, "top_k": top_k,
              "repetition_penalty": repetition_penalty, "stop": stop or (), "seed": seed}
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
@with_settings("source", "generation")
def fit(model: ModelArg, settings: Settings, task: TaskOpt = None, revision: RevisionOpt = None,
        gpus: Annotated[int | None, typer.Option(help="Simulate this many GPUs.")] = None,
        gpu_memory: Annotated[float | None, typer.Option(
            help="Simulate GiB free on each GPU (default 80 when --gpus is given).")] = None,
        cpu_memory: Annotated[float | None, typer.Option(help="Simulate GiB of free host "
                                                         "memory.")] = None,
        allow_offload: Annotated[bool, typer.Option(help="Allow CPU/disk offload when "
                                                    "nothing else fits (slow).")] = False,
        as_json: JsonOpt = False) -> None:
    """Plan where a model fits, from its config alone (no weights read): one device, a
    split across GPUs, 8/4-bit, or offload. Exit 0 with a plan, 3 when it does not fit.
    Without flags it plans for this machine's devices and free memory."""
    from sureserve.loading.fit import fit_model, print_fit

    rep = fit_model(model, settings, task=task, revision=revision, gpus=gpus,
                    gpu_memory=gpu_memory, cpu_memory=cpu_memory, allow_offload=allow_offload)
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
    as_json: JsonOpt = False,
) -> None:
    """Measure precision/quantization candidates on your texts; keep the fastest that holds.
    Exit 0: one was accepted; 3: none was; 2: usage error."""
    from sureserve.loading.precision import get as get_method
    from sureserve.quantize import measure, run

    wanted = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    for name in wanted or ():
        get_method(name)  # an unknown name is a usage error before anything loads
    texts, labels = run.read_eval(eval_file, field_name, label_field)
    thresholds = measure.Thresholds(min_cosine, min_agreement, max_accuracy_drop,
                                    max_perplexity_increase, min_speedup)
    rep = run.quantize(model, texts, labels, methods=wanted, thresholds=thresholds,
                       output=output, settings=settings,
                       say=(lambda m: None) if as_json else _report)
    if as_json:
        print(run.as_json(rep))
    else:
        run.print_report(rep, Console(width=160))
    raise typer.Exit(0 if rep["chosen"] else 3)


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
@with_settings("source", "plan", "batching", "generation")
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
           api_key: Annotated[str | None, typer.Option(
               "--api-key", help="The server's API key, for /info (default: "
               "SURESERVE_API_KEY).")] = None,
           task: TaskOpt = None, as_json: JsonOpt = False) -> None:
    """The debug guide as checks: same output for different inputs, OOM, 10x slow,
    truncated text, multi-GPU load, wrong outputs after an upgrade, empty input_ids; with
    --url, a running server's capacity, 429s, padding, truncation, drift and gate. Exit 0:
    nothing failed; 3: something did; 2: usage error."""
    from sureserve.doctor import run_doctor
    from sureserve.doctor.page import render

    rep = run_doctor(model, url=url, lock=lock, sample=sample, settings=settings,
                     api_key=api_key, task=task)
    if html is not None:
        html.write_text(render(rep), encoding="utf-8")
        err.print(f"wrote {html}", highlight=False)
    if as_json:
        print(json.dumps(rep.to_dict(), indent=2))
    else:
        rep.render(Console(width=200))
    raise typer.Exit(rep.exit_code)


@zoo_app.command("build")
@with_settings("source")
def zoo_build(settings: Settings, names: Annotated[list[str] | None, typer.Argument(
        help="Aliases (default: all).")] = None,
              corpora: Annotated[bool, typer.Option(help="Also fetch the corpora.")] = True
              ) -> None:
    """Build zoo entries and fetch corpora now, instead of on first use."""
    from sureserve.zoo import ZOO
    from sureserve.zoo.corpora import bbc_dir, vader_dir

    if corpora:
        err.print(f"corpora: vader at {vader_dir(settings)}, bbc at {bbc_dir()}")
    for name in names or list(ZOO):
        if name not in ZOO:
            raise ModelSourceError(f"unknown zoo alias {name!r}", f"use one of {', '.join(ZOO)}")
        err.print(f"{name}: {ZOO[name].path(settings)}")


def _report(message: str) -> None:
    err.print(message, highlight=False)


def _one_source(texts: list[str] | None, input_file: Path | None) -> None:
    if texts and input_file:  # a usage error: exit 2, like click's own
        raise typer.BadParameter("give texts as arguments or --input, not both")


@app.command()
@with_settings("source", "plan", "batching", "drift")
def embed(settings: Settings, texts: TextsArg = None, model: ModelOpt = "minilm",
          input_file: InputOpt = None,
          output: Annotated[Path | None, typer.Option("--output", "-o", help=".jsonl or .npy "
                                                      "(default: JSONL on stdout).")] = None,
          field: FieldOpt = "text",
          normalize: Annotated[bool | None, typer.Option("--normalize/--no-normalize",
                               help="Unit-length vectors (default: as the model says).")] = None,
          ray: RayOpt = False, replicas: ReplicasOpt = 2, ray_address: RayAddressOpt = None
          ) -> None:
    """Embed texts; writes one JSON line per text (or a .npy matrix) in input order."""
    from sureserve.jobs import run_file_job

    _one_source(texts, input_file)
    if ray:
        from sureserve.ray.data import run_ray_job

        run_ray_job("embed", model, input_file, output, field, settings, _report, replicas,
                    ray_address, normalize=normalize)
        return
    run_file_job("embed", model, texts, input_file, output, field, settings, _report,
                 normalize=normalize)


@app.command()
@with_settings("source", "plan", "batching", "drift")
def classify(settings: Settings, texts: TextsArg = None, model: ModelOpt = "sentiment-demo",
             input_file: InputOpt = None,
             output: Annotated[Path | None, typer.Option("--output", "-o", help=".jsonl file "
                                                         "(default: stdout).")] = None,
             field: FieldOpt = "text",
             top_k: Annotated[int, typer.Option(help="Labels per text (0: all).")] = 1,
             ray: RayOpt = False, replicas: ReplicasOpt = 2,
             ray_address: RayAddressOpt = None) -> None:
    """Classify texts; writes one JSON line per text in input order."""
    from sureserve.jobs import run_file_job

    _one_source(texts, input_file)
    if ray:
        from sureserve.ray.data import run_ray_job

        run_ray_job("classify", model, input_file, output, field, settings, _report,
                    replicas, ray_address, top_k=top_k or None)
        return
    run_file_job("classify", model, texts, input_file, output, field, settings, _report,
                 top_k=top_k or None)


@app.command()
@with_settings("source", "plan", "batching", "drift")
def rerank(settings: Settings,
           query: Annotated[str, typer.Argument(help="What the texts are ranked against.")],
           texts: TextsArg = None, model: ModelOpt = "rerank-demo", input_file: InputOpt = None,
           field: FieldOpt = "text",
           top_n: Annotated[int | None, typer.Option(help="Only the n best.")] = None,
           raw_scores: Annotated[bool, typer.Option(help="Logits instead of sigmoids.")] = False,
           ) -> None:
    """Rank texts by relevance to QUERY with a cross-encoder; one JSON line per text, best
    first: index (0-based among the texts read), score, text (and, when cutting is allowed,
    truncated / chunks)."""
    import sureserve
    from sureserve.jobs import _records, drift_report

    _one_source(texts, input_file)
    skipped: list[Any] = []
    docs = [r.text for r in _records(texts, input_file, field, settings.skip_bad_lines,
                                     skipped)]
    for bad in skipped:
        _report(f"[yellow]skipped[/] {bad.message}")
    engine = sureserve.load(model, task="rerank", settings=settings)
    for item in engine.rerank(query, docs, top_n=top_n, raw_scores=raw_scores,
                              return_text=True):
        sys.stdout.write(json.dumps(item, ensure_ascii=False) + "\n")
    assert engine.last_summary is not None
    _report(f"rerank: {engine.last_summary.line()}")
    drift_report(engine, engine.last_summary, _report)


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
                                                      "headlines).")] = 16,
                 candidates: Annotated[int, typer.Option(help="Passages per query.")] = 40,
                 model: Annotated[str, typer.Option(help="Cross-encoder.")] = "rerank-demo",
                 output: BenchOut = None) -> None:
    """Rerank throughput (pairs/s) against sentence-transformers' CrossEncoder.predict
    (batch 32) on the same pairs, with the largest score difference."""
    from sureserve.bench.rerank import print_report, run_rerank_bench

    print_report(run_rerank_bench(queries, candidates, model, _bench_out(output, "rerank"),
                                  _report), _report)


@bench_app.command("soak")
def bench_soak(minutes: Annotated[float, typer.Option(help="Minutes of load.")] = 30.0,
               clients: Annotated[int, typer.Option(help="Closed-loop clients.")] = 64,
               warmup: Annotated[float, typer.Option(help="Minutes before the RSS baseline "
                                                     "is taken.")] = 2.0,
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
                           seconds), _report)


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

if __name__ == "__main__":
    main()
