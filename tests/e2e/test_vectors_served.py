"""Shorter and smaller vectors end to end: measured by ``sureserve quantize``, then served
from the folder it writes (Python API, CLI, TEI and OpenAI routes), refused elsewhere."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

import sureserve
from sureserve import vectors as V
from sureserve.errors import InputError
from tests.cli import cli
from tests.server.conftest import serve_here

TEXTS = ["The striker scored twice.", "Rates rose on Tuesday.", "A gentle, funny film."]


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    from sureserve.zoo.corpora import realistic_mix

    d = tmp_path_factory.mktemp("vectors")
    (d / "eval.txt").write_text("\n".join(t.replace("\n", " ")
                                          for t in realistic_mix(120, 0.05, seed=7)))
    r = cli("quantize", "minilm", "--eval", str(d / "eval.txt"), "--methods", "none",
            "--dimensions", "256,128", "--precisions", "int8,binary", "--min-recall", "0",
            "-o", str(d / "out"), "--json", process=False)
    assert r.returncode == 0, r.stderr[-2000:]
    return d / "out", json.loads(r.stdout)


def test_quantize_reports_and_writes_what_it_measured(measured: tuple[Path, dict[str, Any]]
                                                      ) -> None:
    folder, rep = measured
    vec = rep["vectors"]
    assert [m["name"] for m in vec["dimensions"]] == ["256", "128"]
    assert [m["name"] for m in vec["precisions"]] == ["int8", "binary"]
    for m in [*vec["dimensions"], *vec["precisions"]]:
        assert m["status"] == "accepted" and 0 <= m["recall_at_10"] <= 1
    assert vec["precisions"][1]["bytes_per_vector"] == 48  # 384 sign bits
    saved = json.loads((folder / V.VECTORS_FILE).read_text())
    assert saved["dimensions"]["256"]["recall_at_10"] == vec["dimensions"][0]["recall_at_10"]
    assert np.asarray(saved["int8_ranges"]).shape == (2, 384)
    assert rep["candidates"] == [] and rep["chosen"] is None


def test_the_measured_folder_serves_them_and_minilm_refuses(
        measured: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    folder, _ = measured
    engine = sureserve.load(str(folder), drift_watch=False)
    full = engine.embed(TEXTS)
    np.testing.assert_allclose(engine.embed(TEXTS, dimensions=256), V.shorten(full, 256),
                               atol=1e-6)
    ranges = np.asarray(json.loads((folder / V.VECTORS_FILE).read_text())["int8_ranges"],
                        dtype=np.float32)
    np.testing.assert_array_equal(engine.embed(TEXTS, precision="int8"),
                                  V.quantize(full, "int8", ranges))
    with pytest.raises(InputError, match="neither declared"):
        engine.embed(TEXTS, dimensions=64)
    with pytest.raises(InputError, match="ubinary vectors were not measured"):
        engine.embed(TEXTS, precision="ubinary")
    out = tmp_path / "bits.npy"
    r = cli("embed", "-m", str(folder), "--precision", "binary", "-o", str(out), *TEXTS,
            process=False)
    assert r.returncode == 0, r.stderr
    bits = np.load(out)
    assert bits.dtype == np.int8 and bits.shape == (3, 48)
    np.testing.assert_array_equal(bits, V.quantize(full, "binary"))
    refused = cli("embed", "--dimensions", "256", "x", process=False)  # plain minilm
    assert refused.returncode != 0 and "sureserve quantize" in refused.stderr

    with serve_here([str(folder), "minilm"]) as s:
        from openai import OpenAI

        names = [m["name"] for m in httpx.get(f"{s.url}/info").json()["models"]]
        client = OpenAI(base_url=f"{s.url}/v1", api_key="unused")
        got = client.embeddings.create(input=TEXTS, model=names[0], dimensions=256)
        np.testing.assert_allclose([d.embedding for d in got.data], V.shorten(full, 256),
                                   atol=1e-5)
        r = httpx.post(f"{s.url}/embed", json={"inputs": TEXTS, "model": names[0],
                                               "embed_dtype": "binary"})
        assert r.status_code == 200 and r.json() == V.quantize(full, "binary").tolist()
        b64 = httpx.post(f"{s.url}/v1/embeddings", json={
            "input": TEXTS[:1], "model": names[0], "embed_dtype": "int8",
            "encoding_format": "base64"}).json()["data"][0]["embedding"]
        # against the float vector of the same one-text request: embedded alone, its
        # floats differ from the 3-text batch's in the last bits, which on an AVX2 EPYC
        # moved one component across an int8 rounding boundary
        alone = httpx.post(f"{s.url}/v1/embeddings", json={
            "input": TEXTS[:1], "model": names[0]}).json()["data"][0]["embedding"]
        np.testing.assert_allclose(alone, full[0], atol=1e-5)
        np.testing.assert_array_equal(np.frombuffer(base64.b64decode(b64), np.int8),
                                      V.quantize(np.asarray([alone], np.float32), "int8",
                                                 ranges)[0])
        for body in ({"inputs": TEXTS, "model": "minilm", "dimensions": 256},
                     {"inputs": TEXTS, "model": names[0], "dimensions": 0},
                     {"inputs": TEXTS, "model": names[0], "dimensions": 999},
                     {"inputs": TEXTS, "model": names[0], "embed_dtype": "uint8"},
                     {"inputs": TEXTS, "model": names[0], "dimensions": 256,
                      "embed_dtype": "int8"}):
            bad = httpx.post(f"{s.url}/embed", json=body)
            assert bad.status_code == 422, (body, bad.text)
        assert "sureserve quantize" in httpx.post(
            f"{s.url}/embed", json={"inputs": TEXTS, "model": "minilm",
                                    "dimensions": 256}).json()["fix"]
        # nothing else disturbed
        assert httpx.post(f"{s.url}/embed", json={"inputs": TEXTS}).status_code == 200
