"""The rerank task on rerank-demo: pair tokenization, the truncation policy (the text is
cut, never the query), batching invariance, agreement with sentence-transformers'
CrossEncoder, the gate on a broken pair, the CLI and the benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import sureserve
from sureserve.errors import InputError, InputTooLongError, TaskMismatchError
from sureserve.zoo.rerank import UNSEEN_TOPICS, articles
from tests.cli import cli

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def rr() -> sureserve.Engine:
    return sureserve.load("rerank-demo")


@pytest.fixture(scope="module")
def news() -> list[tuple[str, str]]:
    """30 articles of the topics rerank-demo never saw (another seed than its report's)."""
    import random

    rows = [a for t in UNSEEN_TOPICS for a in articles(t)]
    return random.Random(1).sample(rows, 30)


def test_loads_as_a_reranker_and_its_gate_reads_pairs(rr: sureserve.Engine) -> None:
    assert rr.task_name == "rerank" and rr.loaded.limit.value == 128
    report = rr.gate_report
    assert report is not None and report.passed
    names = {c.name: c.status for c in report.checks}
    assert names["rerank-order"] == "pass" and names["batch-invariance"] == "pass"


def test_an_unseen_headline_finds_its_own_article(rr: sureserve.Engine,
                                                  news: list[tuple[str, str]]) -> None:
    """Whole articles, cut by the truncate policy: top-1 of 10 as in the build report."""
    import random

    rng = random.Random(2)
    hits = 0
    for k, (head, body) in enumerate(news):
        others = rng.sample([j for j in range(len(news)) if j != k], 9)
        docs = [body] + [news[j][1] for j in others]
        best = rr.rerank(head, docs, top_n=3, return_text=True, truncation="truncate")
        hits += best[0]["index"] == 0
        assert len(best) == 3 and best[0]["score"] >= best[1]["score"] >= best[2]["score"]
        assert 0 < best[0]["score"] < 1 and best[0]["text"] == docs[best[0]["index"]]
        assert best[0]["truncated"] is True  # whole articles are longer than 128 tokens
    assert hits / len(news) >= 0.9, hits


def test_scores_equal_sentence_transformers_cross_encoder(rr: sureserve.Engine,
                                                          news: list[tuple[str, str]]) -> None:
    from sentence_transformers import CrossEncoder

    # long bodies: both cut the pair to 128 tokens by cutting the body (ours: truncate
    # never cuts the query; theirs: longest-first cuts the longer side)
    q, bodies = news[2][0], [b[:1200] for _, b in news[:12]]
    ours = {r["index"]: r["score"] for r in rr.rerank(q, bodies, truncation="truncate")}
    st = CrossEncoder(str(rr.loaded.source.path), device="cpu")
    theirs = st.predict([(q, b) for b in bodies])
    np.testing.assert_allclose([ours[i] for i in range(len(bodies))], theirs, atol=1e-5)
    raw = {r["index"]: r["score"] for r in rr.rerank(q, bodies, raw_scores=True,
                                                     truncation="truncate")}
    np.testing.assert_allclose(1 / (1 + np.exp(-np.array([raw[i] for i in range(len(bodies))]))),
                               theirs, atol=1e-5)


def test_alone_equals_in_a_batch(rr: sureserve.Engine, news: list[tuple[str, str]]) -> None:
    q, bodies = news[0][0], [b[:40 * (k + 1)] for k, (_, b) in enumerate(news[:10])]
    together = {r["index"]: r["score"] for r in rr.rerank(q, bodies, raw_scores=True)}
    for i in (0, 7):
        alone = rr.rerank(q, [bodies[i]], raw_scores=True)[0]["score"]
        assert abs(alone - together[i]) < 1e-4


def test_too_long_pairs_follow_the_policy_and_the_query_is_never_cut(
        rr: sureserve.Engine, news: list[tuple[str, str]]) -> None:
    q = news[3][0]
    long_text = " ".join(b for _, b in news[:2])  # far over 128 tokens
    with pytest.raises(InputTooLongError) as exc:
        rr.rerank(q, ["short one", long_text])
    assert "text 1" in exc.value.message
    cut = rr.rerank(q, ["short one", long_text], truncation="truncate")
    flags = {r["index"]: r["truncated"] for r in cut}
    assert flags == {0: False, 1: True}
    task = rr.text_task("rerank")
    pieces = task.to_pieces([long_text], "truncate", query=q).pieces
    q_ids = rr.tokenizer(q, add_special_tokens=False)["input_ids"]
    assert pieces[0].ids[1:1 + len(q_ids)] == q_ids  # the whole query, first
    assert len(pieces[0].ids) == rr.loaded.limit.value
    assert pieces[0].segment_at == len(q_ids) + 2  # [CLS] q [SEP] | text
    chunked = rr.rerank(q, [long_text], truncation="chunk")[0]
    assert chunked["chunks"] > 1
    chunk_pieces = task.to_pieces([long_text], "chunk", query=q).pieces
    assert all(p.ids[1:1 + len(q_ids)] == q_ids for p in chunk_pieces)
    best = max(task.forward([p])[0, 0] for p in chunk_pieces)  # a text is its best chunk
    assert abs(rr.rerank(q, [long_text], truncation="chunk", raw_scores=True)[0]["score"]
               - best) < 1e-4
    with pytest.raises(InputTooLongError) as exc:
        rr.rerank("word " * 600, ["x"], truncation="truncate")
    assert "query" in exc.value.message and "never cut" in exc.value.fix


def test_bad_calls_are_clear_errors(rr: sureserve.Engine) -> None:
    assert rr.rerank("q", []) == []
    with pytest.raises(InputError):
        rr.rerank("q", [3])  # type: ignore[list-item]
    with pytest.raises(TaskMismatchError):
        rr.embed(["x"])
    minilm = sureserve.load("minilm")
    with pytest.raises(TaskMismatchError):
        minilm.rerank("q", ["x"])


def test_gate_fails_a_reranker_with_a_shuffled_tokenizer(tmp_path: Path) -> None:
    from tests.mutations import shuffled_tokenizer

    path = sureserve.ZOO["rerank-demo"].path(sureserve.Settings())
    broken = shuffled_tokenizer(path, tmp_path / "shuf")
    report = sureserve.check(str(path), tokenizer=str(broken))
    status = {c.name: c.status for c in report.checks}
    assert not report.passed and status["rerank-order"] == "fail", report.checks


def test_cli_rerank_ranks_a_file(tmp_path: Path, news: list[tuple[str, str]]) -> None:
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"body": b[:300]}) + "\n" for _, b in news[:6]))
    r = cli("rerank", news[4][0], "-i", str(src), "--field", "body", "--top-n", "2",
            timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 2 and rows[0]["index"] == 4 and rows[0]["text"] == news[4][1][:300]
    assert "rerank:" in r.stderr


def test_rerank_many_equals_per_query_rerank(rr: sureserve.Engine,
                                            news: list[tuple[str, str]]) -> None:
    groups = [(q, [b[:60 * (k + j + 1)] for j, (_, b) in enumerate(news[k:k + 5])])
              for k, (q, _) in enumerate(news[:4])]
    groups.append((news[9][0], [news[9][1]]))  # a whole article: cut under "truncate"
    many = rr.rerank_many(groups, truncation="truncate", return_text=True)
    for (q, docs), got in zip(groups, many, strict=True):
        want = rr.rerank(q, docs, truncation="truncate", return_text=True)
        assert [x["index"] for x in got] == [x["index"] for x in want]
        assert [x["score"] for x in got] == pytest.approx([x["score"] for x in want],
                                                          abs=1e-5)
        assert [(x["text"], x["truncated"]) for x in got] == \
            [(x["text"], x["truncated"]) for x in want]
    assert many[-1][0]["truncated"] is True
    assert rr.rerank_many([]) == []
    with pytest.raises(InputError, match="query 1 is empty"):
        rr.rerank_many([("q", ["a"]), (" ", ["b"])])
    with pytest.raises(InputError, match="query 0's texts are not a list"):
        rr.rerank_many([("q", "a text, not a list")])  # type: ignore[list-item]
    with pytest.raises(InputTooLongError, match="text 5"):  # global index, as in the call
        rr.rerank_many([("q", ["a"] * 5), ("r", ["word " * 400])])


def test_cli_rerank_pairs_scores_a_file_in_order(rr: sureserve.Engine, tmp_path: Path,
                                                news: list[tuple[str, str]]) -> None:
    rows = [{"query": news[k % 3][0], "text": news[k][1][:200]} for k in range(7)]
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows[:4]) + "{broken\n"
                   + "".join(json.dumps(r) + "\n" for r in rows[4:]))
    stopped = cli("rerank", "--pairs", "-i", str(src), process=False)
    assert stopped.returncode != 0 and "line 5" in stopped.stderr
    assert len(stopped.stdout.splitlines()) == 4  # every pair before the bad line written
    out = tmp_path / "scores.parquet"
    r = cli("rerank", "--pairs", "-i", str(src), "--skip-bad-lines", "-o", str(out),
            "--planner-window", "3", process=False)  # windows of 3: streamed, order kept
    assert r.returncode == 0, r.stderr
    import pyarrow.parquet as pq

    table = pq.read_table(out).to_pydict()
    assert table["line"] == [1, 2, 3, 4, 6, 7, 8]
    want = [rr.rerank(x["query"], [x["text"]])[0]["score"] for x in rows]
    assert table["score"] == pytest.approx(want, abs=1e-5)
    usage = cli("rerank", "--pairs", "some query", "-i", str(src), process=False)
    assert usage.returncode == 2


def test_bench_rerank_runs_and_agrees(tmp_path: Path) -> None:
    from sureserve.bench.rerank import run_rerank_bench

    rep = run_rerank_bench(queries=2, candidates=6, out=tmp_path / "r.json", log=lambda _: None)
    assert rep["pairs"] == 12 and rep["max_abs_score_diff"] <= 1e-5
    assert set(rep["pairs_per_s"]) == {"sureserve", "sureserve rerank_many",
                                       "sentence-transformers"}
    assert json.loads((tmp_path / "r.json").read_text()) == rep
