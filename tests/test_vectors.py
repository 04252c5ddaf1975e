"""Shorter and smaller vectors (vectors.py): exact truncation, sentence-transformers'
quantization, the recall measure, and what a model may serve."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sureserve import vectors as V
from sureserve.errors import InputError


def _unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_shorten_truncates_and_renormalises_exactly() -> None:
    v = _unit(5, 16)
    s = V.shorten(v, 6)
    np.testing.assert_allclose(np.linalg.norm(s, axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(s * np.linalg.norm(v[:, :6], axis=1, keepdims=True), v[:, :6],
                               atol=1e-6)
    np.testing.assert_array_equal(V.shorten(v, 6, renormalize=False), v[:, :6])


@pytest.mark.parametrize("precision", ["int8", "uint8", "binary", "ubinary"])
def test_precisions_equal_sentence_transformers_with_the_same_ranges(precision: str) -> None:
    from sentence_transformers.util.quantization import quantize_embeddings

    v = _unit(40, 20)
    ranges = V.int8_ranges(v[:25])  # calibrated on part: the rest may fall outside (clipped)
    ours = V.quantize(v, precision, ranges)
    theirs = quantize_embeddings(v, precision=precision, ranges=ranges)
    assert ours.dtype == theirs.dtype
    np.testing.assert_array_equal(ours, theirs)


def test_int8_codes_decode_to_within_a_bucket() -> None:
    v = _unit(50, 8)
    ranges = V.int8_ranges(v)
    step = (ranges[1] - ranges[0]) / 255
    for p in ("int8", "uint8"):
        back = V.decode(V.quantize(v, p, ranges), p, ranges)
        assert (np.abs(back - v) <= step / 2 + 1e-6).all()


def test_int8_without_ranges_and_unknown_precisions_are_refused() -> None:
    with pytest.raises(InputError, match="ranges"):
        V.quantize(_unit(3, 4), "int8")
    with pytest.raises(InputError, match="unknown precision 'fp4'"):
        V.quantize(_unit(3, 4), "fp4")


def test_recall_is_one_for_the_same_order_and_falls_with_noise() -> None:
    v = _unit(60, 32)
    assert V.recall_at_k(v, v @ v.T).min() == 1.0
    assert V.rank_agreement(v, v).min() == pytest.approx(1.0)
    noisy = v + np.random.default_rng(1).normal(scale=0.5, size=v.shape).astype(np.float32)
    noisy = V.shorten(noisy, 32)
    assert V.recall_at_k(v, noisy @ noisy.T).mean() < 0.9
    [short, full] = V.measure_dimensions(v, [16, 32], 0.95)
    assert short.status == "rejected" and full.status == "rejected"  # 32 is not shorter
    [ok] = V.measure_dimensions(v, [31], 0.0)
    assert ok.status == "accepted" and ok.figures["bytes_per_vector"] == 124


def test_a_model_serves_what_it_declares_or_was_measured_for(tmp_path: Path) -> None:
    (tmp_path / "config_sentence_transformers.json").write_text(
        json.dumps({"matryoshka_dimensions": [8, 4]}))
    a = V.allowed(tmp_path, {}, 16)
    a.check(8, None)
    a.check(16, None)
    for dims, needle in ((6, "neither declared"), (0, "between 1 and 16"),
                         (32, "between 1 and 16")):
        with pytest.raises(InputError, match=needle) as exc:
            a.check(dims, None)
        assert dims != 6 or "sureserve quantize" in exc.value.fix
    with pytest.raises(InputError, match="int8 vectors were not measured"):
        a.check(None, "int8")
    v = _unit(30, 16)
    dims = V.measure_dimensions(v, [12, 6], 0.0)
    precs, ranges = V.measure_precisions(v, v, ["int8", "binary"], 0.0)
    dims[1].status = "rejected"
    V.write(tmp_path, dims, precs, ranges, 30)
    b = V.allowed(tmp_path, {"matryoshka_dims": [2]}, 16)
    assert b.declared == (2, 4, 8) and b.measured == (12,)
    assert b.precisions == ("float32", "int8", "binary")
    np.testing.assert_array_equal(b.apply(v, None, "int8"), V.quantize(v, "int8", ranges))
    np.testing.assert_allclose(b.apply(v, 12, None), V.shorten(v, 12))
    with pytest.raises(InputError, match="together were not measured"):
        b.check(12, "int8")
    with pytest.raises(InputError, match="neither declared"):
        b.check(6, None)
