"""Memory that must stay bounded under steady traffic (issue: the server's RSS grew ~100 MB
a minute). The root cause was oneDNN's primitive cache: one compiled kernel per new tensor
shape, up to 1,024 of them, and a server makes a new shape for almost every batch. These
tests watch the cache itself (oneDNN reports every kernel creation as a cache hit or miss),
not a timed RSS figure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# load a tiny BERT (its GELU runs through oneDNN) through sureserve, run a batch of 3 at
# each of 8 lengths (shapes the gate's probes do not use), then the first length again;
# oneDNN logs every kernel creation
SCRIPT = """
import sys, torch, sureserve
m = sureserve.load(sys.argv[1])
for n in [41, 42, 43, 44, 45, 46, 47, 48, 41]:
    with torch.inference_mode():
        m.model(input_ids=torch.full((3, n), 1000),
                attention_mask=torch.ones(3, n, dtype=torch.long))
"""
OURS = {f"3x{n}x64" for n in range(41, 49)}


def _gelu_creations(tiny_bert: Path, env: dict[str, str]) -> list[tuple[str, str]]:
    clean = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_bert)], check=True,
                         capture_output=True, text=True, timeout=300,
                         env={**clean, "ONEDNN_VERBOSE": "profile_create",
                              "SURESERVE_ACCEPT_GATE_FAILURE": "1", **env}).stdout
    rows = []
    for line in out.splitlines():  # onednn_verbose,v1,primitive,create:cache_miss,...,1x3x64,ms
        parts = line.split(",")
        if len(parts) > 4 and parts[3].startswith("create:") and parts[-2] in OURS:
            rows.append((parts[3].removeprefix("create:"), parts[-2]))
    return rows


def test_the_onednn_cache_is_bounded_by_the_setting(tiny_bert: Path) -> None:
    rows = _gelu_creations(tiny_bert, {"SURESERVE_ONEDNN_CACHE_CAPACITY": "4"})
    # one kernel per length (the second layer reuses the first's): the cache's growth
    assert {shape for _, shape in rows} == OURS, rows
    # the first length was evicted by the next ones (at most 4 kernels are kept, whatever
    # the traffic), so coming back to it compiles it again
    assert rows.count(("cache_miss", "3x41x64")) == 2, rows


def test_an_explicit_onednn_variable_wins(tiny_bert: Path) -> None:
    rows = _gelu_creations(tiny_bert, {"SURESERVE_ONEDNN_CACHE_CAPACITY": "4",
                                       "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024"})
    assert rows.count(("cache_miss", "3x41x64")) == 1, rows


def test_the_default_is_bounded() -> None:
    from sureserve.settings import Settings

    capacity = Settings().onednn_cache_capacity
    assert 0 <= capacity <= 256  # oneDNN's own default, 1,024, is what grew for hours


@pytest.mark.parametrize("capacity", ["0", "4"])
def test_outputs_do_not_depend_on_the_cache(tiny_bert: Path, capacity: str) -> None:
    script = ("import sys, numpy, sureserve; m = sureserve.load(sys.argv[1]); "
              "numpy.save(sys.argv[2], m.embed(['a short one', 'a somewhat longer text "
              "than that', 'x']))")
    outs = []
    for cap in (capacity, "1024"):
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"sureserve-cache-{os.getpid()}-{cap}.npy"
        subprocess.run([sys.executable, "-c", script, str(tiny_bert), str(path)], check=True,
                       timeout=300, env={**os.environ, "SURESERVE_ONEDNN_CACHE_CAPACITY": cap,
                              "SURESERVE_ACCEPT_GATE_FAILURE": "1"})
        import numpy as np

        outs.append(np.load(path))
        path.unlink()
    assert (outs[0] == outs[1]).all()
