"""Shorter and smaller embedding vectors: Matryoshka truncation and output precisions,
each allowed only where it is declared or was measured on the user's texts.

* ``dimensions``: the first d components, renormalised to unit length. Faithful for a model
  trained for it (Matryoshka): declared by its folder (``matryoshka_dimensions`` /
  ``matryoshka_dims`` in ``config.json`` or ``config_sentence_transformers.json``), or
  measured by ``sureserve quantize MODEL --eval FILE --dimensions 256,128``.
* precisions ``int8``/``uint8`` (per-dimension ranges calibrated on the calibration slice
  of the eval texts, 256 buckets; values outside the ranges are clipped) and
  ``binary``/``ubinary`` (the sign bit of each component, 8 per byte; ``binary`` offset by
  -128 into int8), as
  sentence-transformers' ``quantize_embeddings`` defines them. Measured by ``sureserve
  quantize ... --precisions int8,binary``; int8 cannot run unmeasured (it needs the ranges).

What was measured is written into the model folder ``quantize`` writes
(``sureserve_vectors.json``): each size and precision with its figures and verdict, and the
int8 ranges. ``allowed`` reads it back for the server and the CLI.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sureserve.errors import InputError

PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")
VECTORS_FILE = "sureserve_vectors.json"
NEIGHBOURS = 10
MEASURE = "sureserve quantize MODEL --eval FILE --dimensions 256,128 --precisions int8,binary"


def shorten(vecs: np.ndarray, dims: int, renormalize: bool = True) -> np.ndarray:
    """The first ``dims`` components of each row, renormalised to unit length (unless
    ``renormalize`` is False: a caller that asked for unnormalised vectors)."""
    part = np.asarray(vecs, dtype=np.float32)[:, :dims]
    if not renormalize:
        return part.copy()
    norms = np.linalg.norm(part, axis=1, keepdims=True)
    return (part / np.maximum(norms, 1e-12)).astype(np.float32)


def int8_ranges(calibration: np.ndarray) -> np.ndarray:
    """(2, dim): each component's smallest and largest value on the calibration vectors."""
    c = np.asarray(calibration, dtype=np.float32)
    return np.vstack((c.min(axis=0), c.max(axis=0)))


def quantize(vecs: np.ndarray, precision: str, ranges: np.ndarray | None = None
             ) -> np.ndarray:
    """Vectors in ``precision`` (see the module docstring); ``ranges`` for int8/uint8."""
    v = np.asarray(vecs, dtype=np.float32)
    if precision == "float32":
        return v
    if precision in ("int8", "uint8"):
        if ranges is None:
            raise InputError(f"{precision} vectors need ranges calibrated on typical texts",
                             f"measure them first: {MEASURE}")
        starts = ranges[0].astype(np.float32)
        steps = (ranges[1].astype(np.float32) - starts) / 255
        steps = np.where(steps == 0, 1, steps)
        buckets = np.clip(np.floor((v - starts) / steps), 0, 255)
        return buckets.astype(np.uint8) if precision == "uint8" else \
            (buckets - 128).astype(np.int8)
    if precision == "binary":
        return (np.packbits(v > 0, axis=-1).astype(np.int16) - 128).astype(np.int8)
    if precision == "ubinary":
        return np.packbits(v > 0, axis=-1)
    raise InputError(f"unknown precision {precision!r}", f"use one of {', '.join(PRECISIONS)}")


def similarity(q: np.ndarray, precision: str) -> np.ndarray:
    """All-pairs similarity of quantized vectors as an index over the codes ranks them
    (the verdict's measure): dot products of the int8 codes (uint8 shifted to int8
    first), minus the Hamming distance for the binary forms. Each int8 component has its
    own scale and zero point, so a plain dot product of codes is not the cosine; the
    report adds ``recall_at_10_decoded``, what decoding with the ranges keeps."""
    if precision in ("binary", "ubinary"):
        raw = (q.astype(np.int16) + 128).astype(np.uint8) if precision == "binary" else q
        bits = np.unpackbits(raw, axis=-1).astype(np.float32)
        signs = bits * 2 - 1  # Hamming distance = (bits - dot of the +-1 forms) / 2
        return signs @ signs.T
    x = q.astype(np.float32) - (128 if precision == "uint8" else 0)
    return x @ x.T


def decode(q: np.ndarray, precision: str, ranges: np.ndarray) -> np.ndarray:
    """int8/uint8 codes back to floats at their buckets' centres (what an index that keeps
    the ranges, or a rescoring step, compares)."""
    buckets = q.astype(np.float32) + (128 if precision == "int8" else 0)
    steps = (ranges[1] - ranges[0]) / 255
    return (buckets + 0.5) * np.where(steps == 0, 1, steps) + ranges[0]


def _top(sim: np.ndarray, k: int) -> np.ndarray:
    sim = sim.astype(np.float64, copy=True)
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]


def recall_at_k(full: np.ndarray, sim: np.ndarray, k: int = NEIGHBOURS) -> np.ndarray:
    """Per text: the share of its k nearest neighbours by full-size fp32 cosine that the
    other similarity also puts in its k nearest."""
    u = shorten(full, full.shape[1])
    k = min(k, len(u) - 1)
    ref, got = _top(u @ u.T, k), _top(sim, k)
    return np.asarray([len(set(a) & set(b)) / k for a, b in zip(ref, got, strict=True)])


def rank_agreement(full: np.ndarray, short: np.ndarray) -> np.ndarray:
    """Per text: Spearman correlation between its cosines to every other text at full
    size and shortened (1: the same order)."""
    a, b = shorten(full, full.shape[1]), short
    sa, sb = a @ a.T, b @ b.T
    out = []
    for i in range(len(a)):
        x, y = np.delete(sa[i], i), np.delete(sb[i], i)
        rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
        out.append(float(np.corrcoef(rx, ry)[0, 1]) if len(x) > 1 else 1.0)
    return np.asarray(out)


@dataclass
class Measured:
    """One size or precision measured on the eval texts against full-size fp32."""

    name: str  # "256" (dimensions) or "int8" (precision)
    status: str  # accepted | rejected
    reason: str
    figures: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "reason": self.reason,
                **self.figures}


def measure_dimensions(full: np.ndarray, dims: list[int], min_recall: float
                       ) -> list[Measured]:
    width = full.shape[1]
    out = []
    for d in dims:
        if not 0 < d < width:
            out.append(Measured(str(d), "rejected", f"not between 1 and {width - 1} (the "
                                f"model gives {width})"))
            continue
        short = shorten(full, d)
        rec, agree = recall_at_k(full, short @ short.T), rank_agreement(full, short)
        figs = {"recall_at_10": round(float(rec.mean()), 4),
                "recall_at_10_min": round(float(rec.min()), 4),
                "rank_agreement_min": round(float(agree.min()), 4),
                "rank_agreement_p1": round(float(np.percentile(agree, 1)), 4),
                "bytes_per_vector": 4 * d}
        out.append(_verdict(str(d), figs, min_recall))
    return out


def measure_precisions(full: np.ndarray, calibration: np.ndarray, precisions: list[str],
                       min_recall: float) -> tuple[list[Measured], np.ndarray]:
    """Each precision's recall@10 against fp32 (int8 ranges from ``calibration``); returns
    the verdicts and the ranges."""
    ranges = int8_ranges(calibration)
    out = []
    for p in precisions:
        if p not in PRECISIONS or p == "float32":
            raise InputError(f"unknown precision {p!r}",
                             f"use some of {', '.join(PRECISIONS[1:])}")
        q = quantize(full, p, ranges)
        rec = recall_at_k(full, similarity(q, p))
        figs = {"recall_at_10": round(float(rec.mean()), 4),
                "recall_at_10_min": round(float(rec.min()), 4),
                "bytes_per_vector": int(q.shape[1] * q.itemsize)}
        if p in ("int8", "uint8"):  # for information: what decoding with the ranges keeps
            back = decode(q, p, ranges)
            figs["recall_at_10_decoded"] = round(float(recall_at_k(full, back @ back.T)
                                                       .mean()), 4)
        out.append(_verdict(p, figs, min_recall))
    return out, ranges


def _verdict(name: str, figs: dict[str, Any], min_recall: float) -> Measured:
    if figs["recall_at_10"] >= min_recall:
        return Measured(name, "accepted", f"recall@10 {figs['recall_at_10']:.3f} >= "
                        f"{min_recall:g}", figs)
    return Measured(name, "rejected", f"recall@10 {figs['recall_at_10']:.3f} < "
                    f"{min_recall:g}", figs)


def write(folder: Path, dims: list[Measured], precisions: list[Measured],
          ranges: np.ndarray | None, eval_texts: int) -> None:
    data = {"eval_texts": eval_texts,
            "dimensions": {m.name: m.to_dict() for m in dims},
            "precisions": {m.name: m.to_dict() for m in precisions},
            "int8_ranges": ranges.tolist() if ranges is not None else None}
    (folder / VECTORS_FILE).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


@dataclass(frozen=True)
class Allowed:
    """What a served model may shorten to and quantize to, and why."""

    width: int
    declared: tuple[int, ...] = ()  # Matryoshka sizes the model's folder declares
    measured: tuple[int, ...] = ()  # sizes accepted by sureserve quantize
    precisions: tuple[str, ...] = ("float32",)
    ranges: np.ndarray | None = None

    def check(self, dimensions: int | None, precision: str | None) -> None:
        """Refuse a size or precision that is neither declared nor measured and accepted,
        naming what is allowed and how to measure more."""
        if dimensions is not None and dimensions != self.width:
            if not 0 < dimensions < self.width:
                raise InputError(f"dimensions={dimensions}: this model gives {self.width}",
                                 f"send a size between 1 and {self.width}")
            if dimensions not in self.declared and dimensions not in self.measured:
                sizes = sorted(set(self.declared) | set(self.measured))
                raise InputError(
                    f"dimensions={dimensions} is neither declared by this model (Matryoshka "
                    "training) nor measured on your texts"
                    + (f"; allowed: {', '.join(map(str, sizes))}" if sizes else ""),
                    f"measure it and serve the folder that writes: {MEASURE} -o DIR")
        shortened = dimensions is not None and dimensions != self.width
        if shortened and precision not in (None, "float32"):
            raise InputError(f"dimensions={dimensions} with {precision} vectors: the two "
                             "together were not measured (each was on its own)",
                             "send one of them")
        if precision is not None and precision not in self.precisions:
            if precision not in PRECISIONS:
                raise InputError(f"unknown precision {precision!r}",
                                 f"use one of {', '.join(PRECISIONS)}")
            raise InputError(f"{precision} vectors were not measured for this model (allowed: "
                             f"{', '.join(self.precisions)})",
                             f"measure it and serve the folder that writes: {MEASURE} -o DIR")

    def apply(self, vecs: np.ndarray, dimensions: int | None, precision: str | None,
              renormalize: bool = True) -> np.ndarray:
        self.check(dimensions, precision)
        if dimensions is not None and dimensions != self.width:
            vecs = shorten(vecs, dimensions, renormalize)
        return quantize(vecs, precision or "float32", self.ranges)


def allowed(folder: Path, config: dict[str, Any], width: int) -> Allowed:
    """What ``folder`` declares and what ``sureserve quantize`` accepted for it."""
    declared: list[int] = []
    st = {}
    path = folder / "config_sentence_transformers.json"
    if path.is_file():
        st = json.loads(path.read_text(encoding="utf-8"))
    for src in (config, st):
        for key in ("matryoshka_dimensions", "matryoshka_dims"):
            declared += [int(d) for d in (src.get(key) or []) if isinstance(d, int)]
    measured: list[int] = []
    precisions = ["float32"]
    ranges = None
    path = folder / VECTORS_FILE
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        measured = [int(k) for k, v in data.get("dimensions", {}).items()
                    if v.get("status") == "accepted"]
        precisions += [k for k, v in data.get("precisions", {}).items()
                       if v.get("status") == "accepted"]
        if data.get("int8_ranges") is not None:
            ranges = np.asarray(data["int8_ranges"], dtype=np.float32)
    return Allowed(width, tuple(sorted(set(declared))), tuple(sorted(set(measured))),
                   tuple(precisions), ranges)
