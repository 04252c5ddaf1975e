"""Embeddings and classification on the real models: pooling, order, truncation, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import sureserve
from sureserve.errors import InputTooLongError
from sureserve.zoo.corpora import load_bbc, load_vader
from tests.cli import cli as _cli

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def minilm() -> sureserve.Engine:
    return sureserve.load("minilm")


@pytest.fixture(scope="module")
def sentiment() -> sureserve.Engine:
    return sureserve.load("sentiment-demo")


@pytest.fixture(scope="module")
def short_texts() -> list[str]:
    return [r.text for r in load_vader("tweets")[:40]]


@pytest.fixture(scope="module")
def articles() -> list[str]:
    return [text for _, text in load_bbc()[:400:40]]  # 10 long articles, many > 256 tokens


def test_matches_sentence_transformers(minilm: sureserve.Engine, short_texts: list[str]) -> None:
    from sentence_transformers import SentenceTransformer

    ref = SentenceTransformer(str(minilm.loaded.source.path), device="cpu").encode(short_texts)
    ours = minilm.embed(short_texts)
    cos = (ours * ref).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)  # Normalize module


def test_alone_equals_inside_padded_batch(minilm: sureserve.Engine,
                                          short_texts: list[str], articles: list[str]) -> None:
    batch = [*short_texts[:5], articles[0][:800], "a"]
    together = minilm.embed(batch)
    for i, t in enumerate(batch):
        alone = minilm.embed([t])[0]
        np.testing.assert_allclose(alone, together[i], atol=1e-5)


def test_results_in_input_order(minilm: sureserve.Engine, short_texts: list[str]) -> None:
    texts = short_texts[:20]
    fwd = minilm.embed(texts)
    rev = minilm.embed(texts[::-1])
    np.testing.assert_allclose(fwd, rev[::-1], atol=1e-5)


def test_empty_input_and_empty_string(minilm: sureserve.Engine) -> None:
    assert minilm.embed([]).shape == (0, 384)
    assert minilm.embed([""]).shape == (1, 384)


def test_error_policy_names_the_bbc_article(minilm: sureserve.Engine,
                                            articles: list[str]) -> None:
    texts = ["short one", articles[0], articles[1]]
    lengths = [len(x) for x in minilm.task.preprocess(texts)]  # type: ignore[union-attr]
    first_long = next(i for i, n in enumerate(lengths) if n > 256)
    with pytest.raises(InputTooLongError) as exc:
        minilm.embed(texts)
    e = exc.value
    assert (e.index, e.length, e.limit) == (first_long, lengths[first_long], 256)
    assert "sentence-transformers max_seq_length" in e.message
    assert "--truncation" in e.fix


def test_truncate_policy_reports_every_cut(minilm: sureserve.Engine, articles: list[str]) -> None:
    from sentence_transformers import SentenceTransformer

    vecs = minilm.embed(articles, truncation="truncate")
    s = minilm.last_summary
    assert s is not None
    lengths = [len(x) for x in minilm.task.preprocess(articles)]  # type: ignore[union-attr]
    assert s.truncated == [i for i, n in enumerate(lengths) if n > 256]
    assert s.truncated  # the BBC sample does contain long articles
    # truncation keeps the first 256 tokens, as sentence-transformers does silently
    ref = SentenceTransformer(str(minilm.loaded.source.path), device="cpu").encode(articles)
    cos = (vecs * ref).sum(1)
    assert cos.min() >= 0.9999


def test_chunk_policy_combines_chunks(minilm: sureserve.Engine, articles: list[str]) -> None:
    vecs = minilm.embed(articles, truncation="chunk")
    s = minilm.last_summary
    assert s is not None and s.chunked and all(n >= 2 for n in s.chunked.values())
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    truncated = minilm.embed(articles, truncation="truncate")
    for i in s.chunked:  # the whole article moves the vector away from its first chunk
        assert float(vecs[i] @ truncated[i]) < 0.9999
    # a chunked article stays close to its own first chunk and far from other topics
    assert float(vecs[0] @ truncated[0]) > float(vecs[0] @ truncated[-1])


def test_classify_labels_and_scores(sentiment: sureserve.Engine) -> None:
    out = sentiment.classify(["A wonderful, moving film with superb acting.",
                              "Dull, tedious and badly written."])
    assert [o["label"] for o in out] == ["POSITIVE", "NEGATIVE"]
    assert all(0.5 < o["score"] <= 1.0 for o in out)
    everything = sentiment.classify(["fine"], top_k=None)[0]
    assert {d["label"] for d in everything} == {"NEGATIVE", "POSITIVE"}
    assert abs(sum(d["score"] for d in everything) - 1.0) < 1e-6


def test_classify_alone_equals_batched(sentiment: sureserve.Engine,
                                       short_texts: list[str]) -> None:
    batch = sentiment.classify(short_texts[:12], top_k=None)
    for i, t in enumerate(short_texts[:12]):
        alone = sentiment.classify([t], top_k=None)[0]
        for a, b in zip(alone, batch[i], strict=True):
            assert a["label"] == b["label"] and abs(a["score"] - b["score"]) < 1e-5


def test_classify_chunk_and_truncate_flags(sentiment: sureserve.Engine,
                                           articles: list[str]) -> None:
    out = sentiment.classify(articles[:3], truncation="chunk")
    assert all("chunks" in o and "truncated" in o for o in out)
    assert any(o["chunks"] > 1 for o in out)
    out = sentiment.classify(articles[:3], truncation="truncate")
    assert any(o["truncated"] for o in out)


def test_cli_embed_files(tmp_path: Path, short_texts: list[str]) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"body": t}) + "\n" for t in short_texts[:5]))
    out = tmp_path / "out.npy"
    r = _cli("embed", "-i", str(src), "--field", "body", "-o", str(out))
    assert r.returncode == 0, r.stderr
    arr = np.load(out)
    ref = sureserve.load("minilm").embed(short_texts[:5])
    np.testing.assert_allclose(arr, ref, atol=1e-5)
    assert "5 texts" in r.stderr and "padding" in r.stderr


def test_cli_classify_stdin_and_csv(tmp_path: Path) -> None:
    r = _cli("classify", stdin="I loved it\nI hated it\n")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["label"] for x in rows] == ["POSITIVE", "NEGATIVE"]
    assert [x["index"] for x in rows] == [0, 1]
    csv = tmp_path / "in.csv"
    csv.write_text('id,review\n1,"Great, great film"\n2,awful\n')
    r = _cli("classify", "-i", str(csv), "--field", "review", "--top-k", "0")
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(rows) == 2 and len(rows[0]["labels"]) == 2


def test_cli_bad_line_stops_and_keeps_earlier_output(tmp_path: Path) -> None:
    src = tmp_path / "in.txt"
    src.write_bytes(b"good line\nanother\n\xff\xfe broken\nlast\n")
    out = tmp_path / "out.jsonl"
    # a window of 2 means the first two lines are written before the bad one is read
    r = _cli("embed", "-i", str(src), "-o", str(out), env={"SURESERVE_PLANNER_WINDOW": "2"})
    assert r.returncode == 1
    assert "line 3" in r.stderr and "--skip-bad-lines" in r.stderr
    assert len(out.read_text().splitlines()) == 2
    r = _cli("embed", "-i", str(src), "-o", str(out), "--skip-bad-lines")
    assert r.returncode == 0
    assert [json.loads(x)["line"] for x in out.read_text().splitlines()] == [1, 2, 4]
    assert "skipped" in r.stderr


def test_cli_too_long_is_an_error_with_fix(articles: list[str]) -> None:
    r = _cli("embed", stdin=articles[0].replace("\n", " ") + "\n")
    assert r.returncode == 1
    assert "text 0" in r.stderr and "--truncation" in r.stderr
