"""The eval file: its texts (and gold labels), and the split into a calibration slice and
the texts that are measured (disjoint, deterministic)."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

from sureserve.errors import InputError

#: the calibration slice: a quarter of the file, capped (the search runs it once per layer)
CALIBRATION_CAP = {"embed": 64, "classify": 64, "generate": 12}
MIN_TEXTS = 10


def read_eval(path: Path, field_name: str = "text", label_field: str | None = None
              ) -> tuple[list[str], list[str] | None]:
    """Texts (and labels, when ``label_field`` is given) of a .txt, .jsonl or .csv file."""
    import csv

    if not path.is_file():
        raise InputError(f"the eval file {path} does not exist", "pass --eval FILE")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        if label_field:
            raise InputError("a .txt eval file has no label column",
                             "use .jsonl or .csv for --label-field")
        return [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()], None
    if suffix == ".jsonl":
        rows = [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines()
                if ln.strip()]
    elif suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    else:
        raise InputError(f"unknown eval file type {suffix!r}", "use .txt, .jsonl or .csv")
    for n, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or field_name not in row:
            raise InputError(f"record {n} of {path} has no field {field_name!r}",
                             "name the text field with --field")
        if label_field and label_field not in row:
            raise InputError(f"record {n} of {path} has no label field {label_field!r}",
                             "name the label field with --label-field")
    texts = [str(r[field_name]) for r in rows]
    return texts, [str(r[label_field]) for r in rows] if label_field else None


def label_indices(labels: Sequence[str], names: Sequence[str]) -> list[int]:
    """Gold labels as class indices: by label name, or as the index itself."""
    lookup = {n.lower(): i for i, n in enumerate(names)}
    out = []
    for raw in labels:
        key = raw.strip().lower()
        if key in lookup:
            out.append(lookup[key])
        elif key.isdigit() and int(key) < len(names):
            out.append(int(key))
        else:
            raise InputError(f"label {raw!r} is not one of the model's labels "
                             f"({', '.join(names)})", "fix the label field, or drop "
                             "--label-field to measure agreement only")
    return out


def split(n: int, task: str, seed: int = 0) -> tuple[list[int], list[int]]:
    """(calibration indices, eval indices): disjoint, deterministic."""
    if n < MIN_TEXTS:
        raise InputError(f"the eval file has {n} texts; quantize needs at least {MIN_TEXTS}",
                         "give a few hundred texts typical of your traffic")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    k = max(2, min(CALIBRATION_CAP[task], n // 4))
    return sorted(order[:k]), sorted(order[k:])
