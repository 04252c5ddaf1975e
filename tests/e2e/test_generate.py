"""Generation on the packaged smollm2: continuous batching must not change greedy outputs,
stop strings, streaming, cancellation, chat template, and the KV/context refusals."""

from __future__ import annotations

import threading

import pytest

import sureserve
from sureserve.errors import InputError, InputTooLongError, TaskMismatchError
from sureserve.generation.continuous import GenerationEngine
from sureserve.generation.sampling import SamplingParams
from tests.cli import cli

pytestmark = pytest.mark.e2e

PROMPTS = ["The capital of France is", "1, 2, 3,", "def fib(n):", "Hi",
           "Once upon a time there was a very small dragon who",
           "The chemical symbol for gold is", "Tell me a joke"]


@pytest.fixture(scope="module")
def smollm2() -> sureserve.Engine:
    return sureserve.load("smollm2")


_REFERENCES: dict[tuple[int, str], list[int]] = {}
REFERENCE_TOKENS = 12  # the most any test here compares


_PLAIN: dict[int, object] = {}


def _reference(engine: sureserve.Engine, prompt: str, n: int) -> list[int]:
    """Plain ``transformers`` greedy generation's first ``n`` new tokens. Computed once per
    model and prompt (12 tokens; greedy decoding's first n tokens do not depend on how many
    follow), so the tests that compare against it do not generate it again. It runs on a
    copy of the engine's model: a copy carries none of the packed linears
    (``loading/packed.py``) the engine's model may run through, so the reference is
    ``F.linear``'s sums, as ``transformers`` alone computes them."""
    import copy

    assert n <= REFERENCE_TOKENS
    key = (id(engine), prompt)
    if key not in _REFERENCES:
        if id(engine) not in _PLAIN:
            _PLAIN[id(engine)] = copy.deepcopy(engine.model)
        plain = _PLAIN[id(engine)]
        assert not any("forward" in m.__dict__ and m.__dict__["forward"].packed is not None
                       for m in plain.modules())  # type: ignore[attr-defined]
        ids = engine.tokenizer(prompt, return_tensors="pt")
        ref = plain.generate(**ids, max_new_tokens=REFERENCE_TOKENS,  # type: ignore[attr-defined]
                             do_sample=False)
        _REFERENCES[key] = list(ref[0, ids["input_ids"].shape[1]:].tolist())
    return _REFERENCES[key][:n]


def test_greedy_equals_one_at_a_time(smollm2: sureserve.Engine) -> None:
    tok = smollm2.tokenizer
    # max_running 3 < 7 prompts and different max_new_tokens: later prompts join a running
    # batch at different steps, rows finish (eos or length) and leave while others continue
    gen = GenerationEngine(smollm2.loaded, max_running=3)
    lengths = [12, 5, 9, 12, 3, 7, 10]
    done = gen.run([list(tok(p)["input_ids"]) for p in PROMPTS],
                   [SamplingParams(max_new_tokens=n) for n in lengths])
    for prompt, n, got in zip(PROMPTS, lengths, done, strict=True):
        assert got.token_ids == _reference(smollm2, prompt, n), prompt
        assert got.finish_reason == ("stop" if got.token_ids[-1] in gen.eos_ids else "length")
    assert gen.running == 0 and gen.waiting == 0 and gen.cache_bytes == 0


def test_generate_api_returns_texts_in_order(smollm2: sureserve.Engine) -> None:
    outs = smollm2.generate(PROMPTS[:3], max_new_tokens=6)
    tok = smollm2.tokenizer
    for prompt, text in zip(PROMPTS[:3], outs, strict=True):
        assert text == tok.decode(_reference(smollm2, prompt, 6), skip_special_tokens=True)
    assert "Paris" in outs[0]


def test_stream_pieces_join_to_the_generated_text(smollm2: sureserve.Engine) -> None:
    pieces = list(smollm2.stream("Once upon a time", max_new_tokens=16))
    assert len(pieces) > 3
    assert "".join(pieces) == smollm2.generate(["Once upon a time"], max_new_tokens=16)[0]


def test_stop_string_spanning_tokens(smollm2: sureserve.Engine) -> None:
    prompt = "The capital of France is"
    full = smollm2.complete([prompt], max_new_tokens=12)[0]
    tok = smollm2.tokenizer
    pieces = [tok.decode(full.token_ids[:k]) for k in range(1, len(full.token_ids) + 1)]
    # a stop string that starts inside one token's text and ends in a later token's
    boundary = len(pieces[1])
    stop = full.text[boundary - 2:boundary + 3]
    assert len(stop) == 5 and full.text.count(stop) == 1
    got = smollm2.complete([prompt], max_new_tokens=12, stop=[stop])[0]
    assert got.finish_reason == "stop"
    assert got.text == full.text[:boundary - 2]
    streamed = list(smollm2.stream(prompt, max_new_tokens=12, stop=[stop]))
    assert "".join(streamed) == got.text and all(stop not in s for s in streamed)


def test_seeded_sampling_is_reproducible_alone_and_in_company(smollm2: sureserve.Engine) -> None:
    kw = {"max_new_tokens": 12, "temperature": 0.9, "top_p": 0.95, "top_k": 50, "seed": 11}
    alone = smollm2.generate(["Once upon a time"], **kw)[0]
    crowd = smollm2.generate(["Tell me a joke", "Once upon a time", "1, 2, 3,"], **kw)[1]
    assert alone == crowd
    other = smollm2.generate(["Once upon a time"], **{**kw, "seed": 12})[0]
    assert other != alone  # not a proof of randomness, but a seed must matter


def test_chat_template_is_applied_exactly_once(smollm2: sureserve.Engine) -> None:
    gen = smollm2.generation
    assert gen is not None
    messages = [{"role": "user", "content": "What is 2+2?"}]
    ids = gen.encode(messages)
    tok = smollm2.tokenizer
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ids == list(tok(rendered, add_special_tokens=False)["input_ids"])
    # the template opens with BOS itself; nothing adds a second one in front of it
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
    assert ids.count(tok.bos_token_id) == rendered.count(tok.bos_token)
    reply = smollm2.generate([messages], max_new_tokens=12)[0]
    assert "4" in reply


def test_cancelling_a_stream_frees_its_slot(smollm2: sureserve.Engine) -> None:
    gen = smollm2.generation
    assert gen is not None
    it = smollm2.stream("Once upon a time", max_new_tokens=200)
    first = [next(it) for _ in range(3)]
    assert gen.running == 1
    it.close()  # the consumer leaves mid-stream
    assert gen.running == 0 and gen.waiting == 0 and gen.cache_bytes == 0
    assert first and smollm2.generate(["Hi"], max_new_tokens=3)


def test_every_per_request_structure_returns_to_idle(smollm2: sureserve.Engine) -> None:
    """After finished, cancelled, failed-to-fit and streamed requests the engine holds
    nothing of them: no sequences, rows, finished results or pending cancels, and the KV
    buffer is given back (the server's memory must not grow with the traffic it served)."""
    gen = GenerationEngine(smollm2.loaded, kv_budget_tokens=256, max_running=4)
    ids = [list(smollm2.tokenizer(p)["input_ids"]) for p in PROMPTS[:6]]
    gen.run(ids, SamplingParams(max_new_tokens=5))
    events: list[object] = []
    started = gen.submit(ids[:3], SamplingParams(max_new_tokens=50), events.append)
    gen.step()
    gen.step()
    assert gen.cache_bytes > 0
    for rid in started:  # clients gone mid-generation
        gen.cancel(rid)
    gen.cancel(10_000)  # an id that never existed (a late cancel) is forgotten too
    while gen.has_work:
        gen.step()
    with pytest.raises(InputTooLongError):
        gen.submit([ids[0]], SamplingParams(max_new_tokens=5000))
    assert gen.running == 0 and gen.waiting == 0 and gen.reserved_tokens == 0
    assert gen.cache_bytes == 0 and gen._kv is None
    assert not gen._seqs and not gen._rows and not gen._finished and not gen._inbox
    gen.step()
    assert not gen._cancels


def test_two_threads_share_the_engine(smollm2: sureserve.Engine) -> None:
    results: dict[int, list[str]] = {}

    def work(k: int) -> None:
        results[k] = smollm2.generate(PROMPTS[k * 2:k * 2 + 2], max_new_tokens=6)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    alone = smollm2.generate(PROMPTS[:6], max_new_tokens=6)
    assert [x for k in range(3) for x in results[k]] == alone


def test_context_and_budget_refusals_name_the_numbers(smollm2: sureserve.Engine) -> None:
    with pytest.raises(InputTooLongError) as exc:
        smollm2.generate(["Hi"], max_new_tokens=9000)
    assert "9001" in exc.value.message and "8192" in exc.value.message
    small = sureserve.load("smollm2", kv_cache_mb=1)  # 1 MiB = 22 tokens of smollm2's cache
    with pytest.raises(InputTooLongError) as exc:
        small.generate(["a prompt of a few tokens"], max_new_tokens=30)
    assert "budget of 22 tokens" in exc.value.message
    assert "SURESERVE_KV_CACHE_MB" in exc.value.fix


def test_small_budget_queues_requests_and_still_completes(smollm2: sureserve.Engine) -> None:
    # room for about one request at a time: the others wait, then run
    gen = GenerationEngine(smollm2.loaded, kv_budget_tokens=40, max_running=8)
    ids = [list(smollm2.tokenizer(p)["input_ids"]) for p in PROMPTS[:3]]
    done = gen.run(ids, SamplingParams(max_new_tokens=6))
    assert [c.token_ids for c in done] == [_reference(smollm2, p, 6) for p in PROMPTS[:3]]


def test_invalid_requests(smollm2: sureserve.Engine, tiny_bert: object) -> None:
    with pytest.raises(InputError, match="temperature"):
        smollm2.generate(["Hi"], temperature=-1)
    with pytest.raises(InputError, match="empty"):
        smollm2.generate([""])
    with pytest.raises(InputError, match="list"):
        smollm2.generate("Hi")  # type: ignore[arg-type]
    assert smollm2.generation is not None  # token ids outside the vocabulary, by any path
    with pytest.raises(InputError, match="vocabulary has 49152 tokens"):
        smollm2.generation.generate_ids([[1, 2], [3, 49152]], 2)
    embedder = sureserve.load(str(tiny_bert), accept_gate_failure=True)
    with pytest.raises(TaskMismatchError):
        embedder.generate(["Hi"])


def test_bench_generate_runs_and_compares_outputs(tmp_path: object) -> None:
    from pathlib import Path

    from sureserve.bench.generate import run_generate_bench

    out = Path(str(tmp_path)) / "gen.json"
    rep = run_generate_bench(n=4, sample=2, levels=(1, 2), min_new=2, max_new=6, out=out)
    names = [p["name"] for p in rep["phases"]]
    assert names == ["one-at-a-time", "sureserve-1", "sureserve-2", "static-2"]
    for p in rep["phases"][1:]:
        assert p["identical"] == 2 and p["output_tokens"] > 0
    assert rep["phases"][2]["same_as_first_full"] == 4
    assert out.exists() and "sureserve-2/static-2" in rep["ratios"]


def test_column_major_decode_weights_keep_greedy_outputs(smollm2: sureserve.Engine) -> None:
    """The decode layout's fast path forced on every linear layer of smollm2 (whatever this
    machine measured) gives the tokens plain ``transformers`` generation gives."""
    import torch

    from sureserve.generation.layout import _to_column_major

    plain = smollm2  # the default: decode_weight_layout off
    assert not plain.settings.decode_weight_layout
    forced = sureserve.load("smollm2", decode_weight_layout=False)
    embed = forced.model.get_input_embeddings()
    for m in forced.model.modules():
        if isinstance(m, torch.nn.Linear):
            _to_column_major(m, embed)
    assert not forced.model.get_output_embeddings().weight.is_contiguous()
    assert forced.generation is not None
    prompts = [list(plain.tokenizer(p)["input_ids"]) for p in PROMPTS]
    got = forced.generation.generate_ids(prompts, 12)
    for prompt, ids in zip(PROMPTS, got, strict=True):
        assert ids == _reference(plain, prompt, 12), prompt


@pytest.mark.parametrize("panels", [False, True])
def test_the_gemv_kernel_keeps_greedy_outputs(smollm2: sureserve.Engine, panels: bool) -> None:
    """sureserve's GEMV kernel forced on every linear layer of smollm2 for steps of up to
    32 rows (whatever this machine measured), its float32 weights row-major or in panels
    from one row (and then the prompts' prefill through the panels too): the 7 prompts
    decoded together, and one alone, give plain ``transformers`` generation's tokens (its
    sums run in another order: a difference would only be allowed at a near-tie, and none
    occurs on these prompts)."""
    import torch

    from sureserve.generation import native
    from sureserve.generation.direct import plan

    kernel, why = native.build(smollm2.settings.home_dir())
    if kernel is None:
        pytest.skip(f"the GEMV kernel is unavailable here: {why}")
    if panels and not kernel.panel_width:
        pytest.skip("this build has no vector unit: no panels")
    gen = GenerationEngine(smollm2.loaded, decode_kernel=False)
    shapes = {(int(m.weight.shape[0]), int(m.weight.shape[1])): 32
              for m in smollm2.model.modules() if isinstance(m, torch.nn.Linear)}
    # the shared engine's own panels (what this machine measured) set aside meanwhile
    saved = {m: m.__dict__.pop(native.PANELS) for m in smollm2.model.modules()
             if native.PANELS in m.__dict__}
    # and the prompt panels the shared engine gave (if this machine measured them faster)
    had = {m for m in smollm2.model.modules()
           if isinstance(m.__dict__.get("forward"), native.PromptPanels)}
    calls: list[int] = []
    try:
        kplan = native.KernelPlan(kernel, 32, "", {}, shapes)
        if panels:
            native._give_panels(smollm2.model, kernel, dict.fromkeys(shapes, 1))
            kplan.panel_rows = dict.fromkeys(shapes, 1)
            kplan.prompt_ms = {key: {r: (2.0, 1.0) for r in native.PROMPT_ROWS}
                               for key in shapes}
        gen.decode = plan(smollm2.model, kernel=kplan, calibrate=False)
        gen.prompt_panels = native.give_prompt_panels(smollm2.model, kplan) > 0
        assert gen.prompt_panels == panels
        direct = gen.decode.direct
        assert direct is not None and direct.kernel is not None
        if panels:  # count the prompts' products through the panels
            through = kernel.linear
            kernel.linear = lambda x, st, res=None: calls.append(1) or \
                through(x, st, res)  # type: ignore[method-assign]
        prompts = [list(smollm2.tokenizer(p)["input_ids"]) for p in PROMPTS]
        for prompt, ids in zip(PROMPTS, gen.generate_ids(prompts, 12), strict=True):
            assert ids == _reference(smollm2, prompt, 12), prompt
        assert gen.generate_ids(prompts[:1], 12)[0] == _reference(smollm2, PROMPTS[0], 12)
        assert direct._prep is not None and bool(direct._prep.layers[0].q.p) == panels
        assert len(calls) >= (2 * (30 * 7 + 1) if panels else 0)  # prefill forwards
    finally:
        kernel.__dict__.pop("linear", None)
        for m in smollm2.model.modules():
            m.__dict__.pop(native.PANELS, None)
            fwd = m.__dict__.get("forward")
            if isinstance(fwd, native.PromptPanels) and m not in had:
                fwd.undo()
        for m, p in saved.items():
            m.__dict__[native.PANELS] = p


def test_logprobs_are_the_models_log_softmax(smollm2: sureserve.Engine) -> None:
    """Each generated token's logprob and its step's top alternatives equal a plain
    ``transformers`` forward over prompt + output (log-softmax of the raw logits), within
    1e-4, whether the row decoded alone or in a batch; rows that did not ask carry none."""
    import torch

    prompts = PROMPTS[:3]
    asked = smollm2.complete(prompts, max_new_tokens=6, logprobs=4)
    plain = smollm2.complete(prompts[:1], max_new_tokens=6)
    assert plain[0].logprobs is None and plain[0].token_ids == asked[0].token_ids
    assert smollm2.generation is not None
    for prompt, c in zip(prompts, asked, strict=True):
        ids = smollm2.generation.encode(prompt)
        with torch.inference_mode():
            logits = smollm2.model(input_ids=torch.tensor([ids + c.token_ids])).logits[0]
        lp = torch.log_softmax(logits.float(), -1)
        assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids)
        for k, (tok, entry) in enumerate(zip(c.token_ids, c.logprobs, strict=True)):
            row = lp[len(ids) - 1 + k]
            assert entry.token == tok and abs(entry.logprob - float(row[tok])) < 1e-4
            top = row.topk(4)
            assert len(entry.top) == 4
            assert max(abs(v - float(w)) for (_, v), w in zip(entry.top, top.values,
                                                                strict=True)) < 1e-4
            assert entry.top[0][0] == tok  # greedy: the chosen token is the most likely
        # echo's prompt scoring, in chunks of 2 positions (the cache carries the rest)
        scored = smollm2.generation.prompt_logprobs(ids, 2, chunk=2)
        assert [e.token for e in scored] == ids and scored[0].logprob is None
        for k, e in enumerate(scored[1:], start=1):
            assert e.logprob is not None and abs(e.logprob - float(lp[k - 1, ids[k]])) < 1e-4
            assert [t for t, _ in e.top] == lp[k - 1].topk(2).indices.tolist()


def test_prompts_sharing_a_context_are_scored_once_for_the_context(
        smollm2: sureserve.Engine) -> None:
    """echo scoring of a harness's context + each choice: a prompt that starts like the one
    before reuses its keys/values (only its own tokens run), and every entry equals scoring
    the prompt alone within 1e-4; a repeated prompt, a shorter one and an unrelated one
    in between (chunked, so the cut falls inside the cache) stay equal too."""
    from sureserve.generation.continuous import PromptScorer

    gen = smollm2.generation
    assert gen is not None
    context = "Headline: Rates rose again on Tuesday as the bank met.\nTopic:"
    prompts = [gen.encode(context + c) for c in (" business", " politics", " sport")]
    prompts += [prompts[2], prompts[0][:6], gen.encode("Another text entirely."), prompts[1]]
    fed: list[int] = []
    hook = gen.model.register_forward_pre_hook(
        lambda _m, _a, kw: fed.append(kw["input_ids"].shape[1]), with_kwargs=True)
    try:
        scorer = PromptScorer(gen, 2, chunk=16)
        got = []
        for p in prompts:
            fed.clear()
            got.append((scorer.score(p), sum(fed)))
    finally:
        hook.remove()
    shared = len(prompts[0]) - 2  # the choices differ in their last two tokens at most
    assert got[0][1] >= len(prompts[0]) - 1  # the whole prompt (its last token predicts nothing)
    assert 0 < got[1][1] <= len(prompts[1]) - shared + 1
    assert got[3][1] == 0  # the same prompt again: nothing to compute
    for p, (entries, _) in zip(prompts, got, strict=True):
        alone = gen.prompt_logprobs(p, 2)
        assert [e.token for e in entries] == [e.token for e in alone] == p
        assert entries[0].logprob is None
        for a, b in zip(entries[1:], alone[1:], strict=True):
            assert a.logprob is not None and b.logprob is not None
            assert abs(a.logprob - b.logprob) < 1e-4
            assert [t for t, _ in a.top] == [t for t, _ in b.top]


def test_cli_generate_takes_the_openai_penalties_and_prints_logprobs(
        smollm2: sureserve.Engine) -> None:
    """``sureserve generate --frequency-penalty --logprobs N`` prints JSON lines whose text
    is the Python API's with the same parameters, with one logprob entry per token."""
    import json

    prompt = "one, one, one, one,"
    r = cli("generate", prompt, "--max-new-tokens", "5", "--frequency-penalty", "2",
            "--logprobs", "2")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout.strip().splitlines()[-1])
    want = smollm2.complete([prompt], max_new_tokens=5, frequency_penalty=2.0, logprobs=2)[0]
    assert row["text"] == want.text and len(row["logprobs"]) == want.completion_tokens
    assert all(len(e["top"]) == 2 and e["logprob"] <= 0 for e in row["logprobs"])


SYSTEM = ("You answer questions about the article below, briefly. The city council met on "
          "Tuesday to discuss the new bridge, the budget for the coming year and the plan "
          "to plant a thousand trees along the river before the summer. The mayor said the "
          "bridge would open in the autumn, two months late, and that the trees would cost "
          "less than the council had feared.")
QUESTIONS = ["What did the council discuss?", "How many trees?", "When?", "Where is the bridge?"]


def _chat_ids(engine: sureserve.Engine, question: str) -> list[int]:
    assert engine.generation is not None
    return engine.generation.encode([{"role": "system", "content": SYSTEM},
                                     {"role": "user", "content": question}])


def test_prefix_reuse_gives_the_same_tokens_and_counts_hits(smollm2: sureserve.Engine) -> None:
    """Chats sharing a system prompt: with the prefix store on, later prompts prefill only
    their own ends, and every continuation equals plain ``generate`` on the whole prompt."""
    import torch

    gen = GenerationEngine(smollm2.loaded, prefix_cache_bytes=64 * 2**20, prefix_block=16)
    assert gen.prefix is not None
    prompts = [_chat_ids(smollm2, q) for q in QUESTIONS]
    first = gen.generate_ids(prompts[:1], 10)  # stores the system prompt's blocks
    rest = gen.generate_ids(prompts[1:], 10)  # three prompts, one shared stored prefix
    assert gen.prefix.hits >= 3 and gen.prefix.tokens_reused >= 3 * 48
    for ids, got in zip(prompts, first + rest, strict=True):
        ref = smollm2.model.generate(input_ids=torch.tensor([ids]), max_new_tokens=10,
                                     do_sample=False)[0, len(ids):].tolist()
        assert got == ref
    again = gen.generate_ids(prompts[:1], 10)  # a repeated prompt: all but its tail reused
    assert again == first
    assert gen.cache_bytes == 0 and gen.prefix.bytes > 0  # the batch cache is given back


def test_prompts_with_different_stored_prefixes_prefill_in_one_forward(
        smollm2: sureserve.Engine) -> None:
    """A burst of chats with different histories (two stored system prompts of different
    lengths, and a prompt with nothing stored) is one forward, not one per history, and
    every continuation equals plain ``generate`` on the whole prompt."""
    import torch

    gen = GenerationEngine(smollm2.loaded, prefix_cache_bytes=64 * 2**20, prefix_block=16,
                           prefill_tokens=1024, prefill_group_tokens=1024)
    assert gen.prefix is not None
    other = SYSTEM.split(". ")[0] + "."
    assert smollm2.generation is not None
    short_sys = smollm2.generation.encode([{"role": "system", "content": other},
                                           {"role": "user", "content": QUESTIONS[1]}])
    gen.generate_ids([_chat_ids(smollm2, QUESTIONS[0]), short_sys], 2)  # stores both
    burst = [_chat_ids(smollm2, QUESTIONS[2]),  # long stored prefix
             list(smollm2.tokenizer("Tell me about rivers.")["input_ids"]),  # nothing stored
             smollm2.generation.encode([{"role": "system", "content": other},
                                        {"role": "user", "content": QUESTIONS[3]}])]
    hits = gen.prefix.hits
    forwards = 0
    real = gen.model.forward

    def counting(*a: object, **kw: object) -> object:
        nonlocal forwards
        forwards += 1
        return real(*a, **kw)

    gen.model.forward = counting  # type: ignore[method-assign]
    try:
        ids = gen.submit(burst, SamplingParams(max_new_tokens=8))
        gen.step()
        # one prefill forward for the three, then one decode step (the direct step runs
        # the model's layers without its forward: smollm2 is a llama)
        assert gen.decode.direct is not None
        assert forwards == 1 and all(gen._seqs[i].tokens for i in ids)
        assert gen.prefix.hits == hits + 2
        reused = sorted(gen._seqs[i].reused for i in ids)
        assert reused[0] == 0 and 0 < reused[1] < reused[2]
        while gen.has_work:
            gen.step()
    finally:
        del gen.model.forward
    for i, prompt in zip(ids, burst, strict=True):
        ref = smollm2.model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=8,
                                     do_sample=False)[0, len(prompt):].tolist()
        assert gen.result(i).token_ids == ref  # type: ignore[union-attr]


def test_batched_prefill_matches_one_at_a_time_prefill(smollm2: sureserve.Engine) -> None:
    """Prompts of different lengths prefilled in one left-padded forward leave the same
    keys/values (within float tolerance) and first tokens as a lone forward of each."""
    import torch

    ids = [list(smollm2.tokenizer(p)["input_ids"]) for p in PROMPTS]
    together = GenerationEngine(smollm2.loaded, prefill_tokens=1024, prefill_group_tokens=1024)
    together.submit(ids, SamplingParams(max_new_tokens=4))
    together.step()  # every prompt in one forward (then one decode step for all)
    kv = together._kv
    assert kv is not None and len(together._rows) == len(ids) and together.prefilling == 0
    with torch.inference_mode():
        for r, seq in enumerate(together._rows):
            alone = smollm2.model(input_ids=torch.tensor([seq.prompt]), use_cache=True)
            assert seq.tokens[0] == int(alone.logits[0, -1].argmax())
            n, end = len(seq.prompt), kv.end - 1  # the last column is the decode step's
            for i, layer in enumerate(alone.cache.layers):
                torch.testing.assert_close(kv.k[i, r, :, end - n:end], layer.keys[0],
                                           atol=2e-4, rtol=1e-4)
                torch.testing.assert_close(kv.v[i, r, :, end - n:end], layer.values[0],
                                           atol=2e-4, rtol=1e-4)
    while together.has_work:
        together.step()


def test_long_prompts_prefill_in_chunks_between_decode_steps(smollm2: sureserve.Engine) -> None:
    """With an 8-token prefill budget a 60-token prompt takes several steps, a running
    request keeps decoding one token per step meanwhile, and the result equals plain
    ``generate``; cancelling mid-prefill frees its partial cache at once."""
    import torch

    long_ids = _chat_ids(smollm2, QUESTIONS[0])
    assert len(long_ids) > 40
    gen = GenerationEngine(smollm2.loaded, prefill_tokens=8)
    (short,) = gen.submit([list(smollm2.tokenizer("Hi")["input_ids"])],
                          SamplingParams(max_new_tokens=40))
    gen.step()
    runner = gen._seqs[short]
    (rid,) = gen.submit([long_ids], SamplingParams(max_new_tokens=6))
    steps = 0
    while steps < 50 and not (rid in gen._seqs and gen._seqs[rid].tokens):
        before = len(runner.tokens)
        gen.step()
        steps += 1
        assert len(runner.tokens) == before + 1  # the running row decoded meanwhile
    assert steps >= len(long_ids) // 8
    while gen.has_work:
        gen.step()
    ref = smollm2.model.generate(input_ids=torch.tensor([long_ids]), max_new_tokens=6,
                                 do_sample=False)[0, len(long_ids):].tolist()
    assert gen.result(rid).token_ids == ref  # type: ignore[union-attr]
    # cancelled half-way through its prefill
    (gone,) = gen.submit([long_ids], SamplingParams(max_new_tokens=6))
    gen.step()
    gen.step()
    assert gen.prefilling == 1 and gen._seqs[gone].past is not None
    assert 0 < gen._seqs[gone].computed < len(long_ids)
    gen.cancel(gone)
    gen.step()
    assert gen.prefilling == 0 and not gen.has_work and gen.cache_bytes == 0
    assert gen.result(gone).finish_reason == "cancelled"  # type: ignore[union-attr]


def test_prefix_store_under_pressure_evicts_and_stays_correct(smollm2: sureserve.Engine) -> None:
    """A store that holds only a few blocks keeps evicting as different prompts pass, stays
    within its bytes, and outputs never change."""
    gen = GenerationEngine(smollm2.loaded, prefix_cache_bytes=3 * 16 * gen_kv_bytes(smollm2),
                           prefix_block=16)
    assert gen.prefix is not None
    prompts = [_chat_ids(smollm2, q) for q in QUESTIONS]
    plain = GenerationEngine(smollm2.loaded).generate_ids(prompts, 6)
    for _ in range(2):
        assert gen.generate_ids(prompts, 6) == plain
    assert len(prompts[0]) >= 4 * 16  # more blocks than the store holds
    assert gen.prefix.evictions > 0 and gen.prefix.bytes <= gen.prefix.budget_bytes


def gen_kv_bytes(engine: sureserve.Engine) -> int:
    assert engine.generation is not None
    return engine.generation.bytes_per_token


def test_packed_linears_keep_greedy_outputs(smollm2: sureserve.Engine) -> None:
    """smollm2 with oneDNN's packed linears on (``packed_linear``, asked for explicitly) wherever
    this machine measured them faster: the 7 prompts decoded together and one alone give
    plain ``transformers`` generation's tokens (the reference runs on an unpacked copy)."""
    packed = sureserve.load("smollm2", packed_linear=True)
    assert packed.packing.path.startswith(("measured", "off: this torch"))
    assert packed.generation is not None
    prompts = [list(packed.tokenizer(p)["input_ids"]) for p in PROMPTS]
    for prompt, ids in zip(PROMPTS, packed.generation.generate_ids(prompts, 12), strict=True):
        assert ids == _reference(smollm2, prompt, 12), prompt
    assert packed.generation.generate_ids(prompts[:1], 12)[0] == \
        _reference(smollm2, PROMPTS[0], 12)
