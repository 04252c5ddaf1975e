"""Sparse (SPLADE) embeddings: equal to sentence-transformers' SparseEncoder, pruned and
chunked as documented, gated against a wrong tokenizer, watched for drift, and on the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import sureserve
from sureserve import errors
from sureserve.gate.probes import check_sparse_terms
from sureserve.zoo.registry import minilm_dir
from sureserve.zoo.splade import write_sparse_encoder
from tests import mutations as M
from tests.cli import cli

TEXTS = ["The cat sat on the mat and purred.",
         "Stock markets fell sharply after the central bank raised interest rates.",
         "ok", "word " * 90]


def _tiny_mlm(path: Path, pooling: str, activation: str) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    torch.manual_seed(1)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    BertForMaskedLM(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(path)
    write_sparse_encoder(path, pooling, activation)
    return path


@pytest.fixture(scope="module")
def splade() -> Any:
    return sureserve.load("splade-tiny")


@pytest.mark.parametrize(("pooling", "activation"), [("max", "relu"), ("sum", "log1p_relu")])
def test_random_masked_lm_equals_sparse_encoder(tmp_path: Path, pooling: str,
                                                activation: str) -> None:
    from sentence_transformers import SparseEncoder

    folder = _tiny_mlm(tmp_path / "m", pooling, activation)
    # a random head has no sense of language: its gate verdict is not what is tested here
    engine = sureserve.load(str(folder), accept_gate_failure=True, drift_watch=False)
    assert engine.task_name == "sparse"
    ours = engine.run(TEXTS).rows  # one padded batch of very different lengths
    ref = SparseEncoder(str(folder), device="cpu").encode(TEXTS, convert_to_tensor=True)
    np.testing.assert_allclose(ours, ref.to_dense().numpy(), atol=1e-4)
    # the head run apart on real tokens (pooled before its elementwise work) equals the
    # whole model's padded logits pooled afterwards
    split, engine.task._split = engine.task._split, None
    assert split is not None
    np.testing.assert_allclose(engine.run(TEXTS).rows, ours, atol=1e-5)
    engine.task._split = split
    terms = engine.embed_sparse(TEXTS[:2], top_k=5)
    for row, got in zip(ours[:2], terms, strict=True):
        strongest = np.argsort(-row, kind="stable")[:5]
        assert [t["index"] for t in got] == strongest.tolist()
        assert [t["value"] for t in got] == pytest.approx(row[strongest].tolist())


def test_splade_tiny_passes_its_gate_and_prunes_and_chunks(splade: Any) -> None:
    report = splade.gate_report
    assert report.passed, report.summary()
    assert report.get("sparse-terms").status == "pass"
    every = splade.embed_sparse(TEXTS[:2], tokens=True)
    # strongest first, all positive, the text's own words at the top
    assert all(t["value"] > 0 for terms in every for t in terms)
    assert [t["value"] for t in every[0]] == sorted((t["value"] for t in every[0]),
                                                    reverse=True)
    assert {"cat", "mat"} <= {t["token"] for t in every[0][:5]}
    assert "the" not in {t["token"] for t in every[0]}
    pruned = splade.embed_sparse(TEXTS[:2], top_k=3)
    assert [[t["index"] for t in p] for p in pruned] == \
        [[t["index"] for t in e[:3]] for e in every]
    # a text past the limit: refused by default, cut or chunked when asked; chunks combine
    # as SPLADE pools tokens (max), so every chunk's terms are in the text's vector
    long = " ".join(["markets"] * 600 + ["volcano"] * 300)
    with pytest.raises(errors.InputTooLongError, match="truncation"):
        splade.embed_sparse([long])
    cut = {t["index"]: t["value"]
           for t in splade.embed_sparse([long], truncation="truncate")[0]}
    whole = {t["index"]: t["value"]
             for t in splade.embed_sparse([long], truncation="chunk")[0]}
    volcano = splade.tokenizer.convert_tokens_to_ids("volcano")
    assert volcano not in cut and volcano in whole
    # the first chunk is the truncated text: the max over chunks keeps at least its weights
    assert all(whole[i] >= v - 1e-6 for i, v in cut.items())


def test_gate_fails_a_sparse_model_with_a_shuffled_tokenizer(splade: Any, tmp_path: Path
                                                             ) -> None:
    from transformers import AutoTokenizer

    from sureserve.gate import probe_texts as P

    folder = splade.loaded.source.path
    shuffled = AutoTokenizer.from_pretrained(M.shuffled_tokenizer(folder, tmp_path / "t"))
    texts = [*P.DIVERSE, P.PARAGRAPH]
    task = splade.task
    good = task.forward(task.to_pieces(texts, "truncate").pieces)
    assert check_sparse_terms(splade.tokenizer, texts, good).status == "pass"
    bad_ids = [list(ids) for ids in shuffled(texts)["input_ids"]]
    from sureserve.batching.truncation import Piece

    bad = task.forward([Piece(i, ids) for i, ids in enumerate(bad_ids)])
    check = check_sparse_terms(shuffled, texts, bad)
    assert check.status == "fail", check
    # and the whole gate, as a user meets it: the model refused before serving
    broken = M.with_tokenizer(folder, tmp_path / "t", tmp_path / "m")
    with pytest.raises(errors.GateError, match=r"sparse-terms|alignment"):
        sureserve.load(str(broken))


def test_drift_watch_counts_active_terms_and_sees_a_collapse(splade: Any) -> None:
    from sureserve.settings import Settings
    from sureserve.watch.drift import DriftWatch

    watch = DriftWatch("splade-tiny", "sparse", Settings(drift_window=40))
    rows = splade.run([f"{w} prices rose in {c}" for w in ("oil", "grain", "gold", "steel")
                       for c in ("Paris", "Lagos", "Lima", "Oslo", "Perth", "Quito",
                                 "Seoul", "Tunis", "Kyiv", "Baku")]).rows
    watch.observe_sparse(rows)  # the baseline: the first window
    watch.observe_sparse(rows)
    signals = {s.name: s for s in watch.evaluate()[0]}
    assert {"collapse", "active_terms"} <= set(signals)
    assert not signals["collapse"].alert and not signals["active_terms"].alert
    same = np.repeat(rows[:1], len(rows), axis=0)  # every text the same few terms
    same[:, np.argsort(-same[0])[3:]] = 0
    watch.observe_sparse(same)
    signals = {s.name: s for s in watch.evaluate()[0]}
    assert signals["collapse"].alert and signals["active_terms"].alert, signals


def test_cli_embed_sparse_writes_ids_to_weights(tmp_path: Path) -> None:
    src = tmp_path / "in.txt"
    src.write_text("The cat sat on the mat.\nRates rose.\n")
    r = cli("embed", "--sparse", "-i", str(src), "--top-k", "4", "--tokens", process=False)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["line"] for row in rows] == [1, 2]
    assert all(len(row["sparse"]) == 4 and row["tokens"].keys() == row["sparse"].keys()
               for row in rows)
    assert "cat" in rows[0]["tokens"].values()
    out = tmp_path / "out.parquet"
    assert cli("embed", "--sparse", "-i", str(src), "-o", str(out),
               process=False).returncode == 0
    import pyarrow.parquet as pq

    table = pq.read_table(out).to_pydict()
    assert len(table["sparse_indices"][0]) == len(table["sparse_values"][0]) > 4
    npy = cli("embed", "--sparse", "-i", str(src), "-o", str(tmp_path / "x.npy"),
              process=False)
    assert npy.returncode != 0 and ".jsonl or .parquet" in npy.stderr
    assert cli("embed", "--tokens", "x", process=False).returncode == 2


def test_lockfile_holds_and_checks_a_sparse_models_outputs(splade: Any, tmp_path: Path
                                                           ) -> None:
    from sureserve.gate.lock import verify, write_lock

    lock = write_lock(splade, tmp_path / "sureserve.lock")
    assert lock["outputs"]["kind"].startswith("sparse weights")
    assert verify(lock, splade).ok
    lock["outputs"]["values"][0][0] += 0.01  # as if an upgrade moved one weight
    rep = verify(lock, splade)
    assert not rep.ok and "probe text 0" in rep.outputs[0]


def test_bench_sparse_runs_side_by_side_with_sparse_encoder(tmp_path: Path) -> None:
    from sureserve.bench.sparse import run_sparse_bench

    # short texts only: the long ones' padded logits are what makes the peer slow
    rep = run_sparse_bench(24, out=tmp_path / "sparse.json", log=lambda _: None,
                           long_share=0.0)
    assert json.loads((tmp_path / "sparse.json").read_text())["texts"] == 24
    assert rep["max_abs_weight_diff"] < 1e-4 and rep["top10_terms_agree"] > 0.99
    assert set(rep["texts_per_s"]) == {"sureserve", "sentence-transformers"}
