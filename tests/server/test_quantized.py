"""A folder written by `sureserve quantize`, served (the server's app, on loopback) and read
by a real client; and `sureserve bench quantize` end to end through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np

import sureserve
from sureserve.quantize import measure as M
from sureserve.quantize.run import quantize
from sureserve.settings import Settings
from tests.cli import cli
from tests.server.conftest import serve_here

TEXTS = [f"Sentence {i}: the weather, the markets and the match report." for i in range(12)]


def test_a_quantized_folder_serves_with_its_precision_in_info(tiny_bert: Path,
                                                              tmp_path: Path) -> None:
    out = tmp_path / "q"
    rep = quantize(str(tiny_bert), TEXTS, methods=["int8-dynamic"], output=out,
                   thresholds=M.Thresholds(min_cosine=0.5, min_speedup=0.0),
                   settings=Settings(accept_gate_failure=True))  # a random model's gate
    assert rep["chosen"] == "int8-dynamic"
    with serve_here([str(out)], accept_gate_failure=True) as server:
        info = httpx.get(f"{server.url}/info").json()
        (model,) = info["models"]
        assert model["precision"] == "int8-dynamic" and model["quantization_evaluated"] is True
        r = httpx.post(f"{server.url}/embed", json={"inputs": TEXTS[:3]})
        assert r.status_code == 200
        local = sureserve.load(str(out), accept_gate_failure=True).embed(TEXTS[:3],
                                                                        normalize=True)
        # /embed normalizes (TEI); activations are quantized per call, so batches may differ
        np.testing.assert_allclose(np.array(r.json()), local, atol=0.06)


def test_bench_quantize_runs_end_to_end_through_the_cli(tmp_path: Path) -> None:
    out = tmp_path / "quantize.json"
    # in this process: the bench starts no server and sets no signal handler
    r = cli("bench", "quantize", "--part", "embed", "--n", "40", "--long-share", "0", "-o",
            str(out), process=False)  # short texts: what is tested is the pipeline
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert set(rep) == {"torch", "transformers", "threads", "cpu_gflops", "embed"}
    rows = {row["name"]: row for row in rep["embed"]["side_by_side"]}
    assert rows["sureserve fp32"]["vs_sureserve"] == 1.0
    assert rows["sentence-transformers torch fp32"]["min_cosine"] > 0.999
    methods = {c["method"] for c in rep["embed"]["quantize"]["candidates"]}
    assert {"int8-dynamic", "int8-weight-only"} <= methods
