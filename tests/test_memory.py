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
from typing import Any

import numpy as np
import pytest

# load a tiny BERT (its GELU runs through oneDNN) through sureserve, run a batch of 3 at
# each of 8 lengths (shapes the gate's probes do not use), then the first length again;
# oneDNN logs every kernel creation. Then embed three texts (after the evictions) and save
# the vectors: the outputs must not depend on the cache.
SCRIPT = """
import sys, numpy, torch, sureserve
m = sureserve.load(sys.argv[1])
for n in [41, 42, 43, 44, 45, 46, 47, 48, 41]:
    with torch.inference_mode():
        m.model(input_ids=torch.full((3, n), 1000),
                attention_mask=torch.ones(3, n, dtype=torch.long))
numpy.save(sys.argv[2], m.embed(['a short one', 'a somewhat longer text than that', 'x']))
"""
OURS = {f"3x{n}x64" for n in range(41, 49)}
#: one process per cache configuration (each costs a fresh interpreter's imports), run side
#: by side on one thread each
CONFIGS = {"capacity 4": {"SURESERVE_ONEDNN_CACHE_CAPACITY": "4"},
           "capacity 0": {"SURESERVE_ONEDNN_CACHE_CAPACITY": "0"},
           "explicit 1024": {"SURESERVE_ONEDNN_CACHE_CAPACITY": "4",
                             "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024"}}


@pytest.fixture(scope="module")
def runs(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory
         ) -> dict[str, tuple[list[tuple[str, str]], np.ndarray]]:
    """For each configuration: the GELU kernel creations oneDNN logged, and the vectors."""
    out_dir = tmp_path_factory.mktemp("onednn")
    clean = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    procs = {}
    for name, env in CONFIGS.items():  # side by side: each is mostly one thread's imports
        vecs = out_dir / f"{name.replace(' ', '-')}.npy"
        # oneDNN's log goes to a file, not a pipe: on a machine whose measurements are not
        # cached yet, the process that measures holds the cache's file lock while it logs
        # hundreds of kernels, and a full pipe the test is not reading yet (it waits on
        # another process, which waits on that lock) hung the suite
        log = (out_dir / f"{name.replace(' ', '-')}.log").open("w+")
        procs[name] = (vecs, log, subprocess.Popen(
            [sys.executable, "-c", SCRIPT, str(tiny_bert), str(vecs)], stdout=log,
            stderr=subprocess.STDOUT, text=True,
            env={**clean, "ONEDNN_VERBOSE": "profile_create", "SURESERVE_ACCEPT_GATE_FAILURE": "1",
                 "OMP_NUM_THREADS": "1",
                 **env}))
    got = {}
    for name, (vecs, log, proc) in procs.items():
        proc.wait(timeout=300)
        log.seek(0)
        out = log.read()
        log.close()
        assert proc.returncode == 0, out[-3000:]
        rows = []
        for line in out.splitlines():  # onednn_verbose,v1,primitive,create:cache_miss,...
            parts = line.split(",")
            if len(parts) > 4 and parts[3].startswith("create:") and parts[-2] in OURS:
                rows.append((parts[3].removeprefix("create:"), parts[-2]))
        got[name] = (rows, np.load(vecs))
    return got


def test_the_onednn_cache_is_bounded_by_the_setting(runs: dict[str, Any]) -> None:
    rows, _ = runs["capacity 4"]
    # one kernel per length (the second layer reuses the first's): the cache's growth
    assert {shape for _, shape in rows} == OURS, rows
    # the first length was evicted by the next ones (at most 4 kernels are kept, whatever
    # the traffic), so coming back to it compiles it again
    assert rows.count(("cache_miss", "3x41x64")) == 2, rows


def test_an_explicit_onednn_variable_wins(runs: dict[str, Any]) -> None:
    rows, _ = runs["explicit 1024"]
    assert rows.count(("cache_miss", "3x41x64")) == 1, rows


def test_the_default_is_bounded() -> None:
    from sureserve.settings import Settings

    capacity = Settings().onednn_cache_capacity
    assert 0 <= capacity <= 256  # oneDNN's own default, 1,024, is what grew for hours


@pytest.mark.parametrize("capacity", ["capacity 0", "capacity 4"])
def test_outputs_do_not_depend_on_the_cache(runs: dict[str, Any], capacity: str) -> None:
    """Vectors with a bounded (or no) cache equal those with oneDNN's 1,024 kernels."""
    assert (runs[capacity][1] == runs["explicit 1024"][1]).all()


# packed linears (loading/packed.py) keep one primitive per input row count in ideep's
# cache, which oneDNN's capacity does not bound: 300 row counts through one packed weight
IDEEP_SCRIPT = """
import psutil, torch
from sureserve.loading.machine import bound_onednn_cache
from sureserve.loading.packed import pack, packed_linear
bound_onednn_cache(8)
p = pack(torch.randn(256, 256))
rss = lambda: psutil.Process().memory_info().rss
with torch.inference_mode():
    for m in range(1, 41):  # warm-up: the allocator's and oneDNN's first use
        packed_linear(torch.randn(m, 256), p, None)
    before = rss()
    for m in range(41, 341):
        packed_linear(torch.randn(m, 256), p, None)
print((rss() - before) / 2**20)
"""


def test_packed_linears_row_counts_are_bounded_too() -> None:
    """With the setting's bound, 300 new row counts leave a few MB; with ideep's own
    default (a user's explicit variable wins) the same run keeps ~0.4 MB per row count
    (122 MB measured here): the control shows the figure can fail."""
    from sureserve.loading.packed import why_unavailable

    if why_unavailable():
        pytest.skip(why_unavailable())
    clean = {k: v for k, v in os.environ.items()
             if k not in ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")}
    procs = {name: subprocess.Popen([sys.executable, "-c", IDEEP_SCRIPT],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env={**clean, "OMP_NUM_THREADS": "1", **env})
             for name, env in (("bounded", {}), ("ideep default", {"LRU_CACHE_CAPACITY":
                                                                   "1024"}))}
    grew = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        grew[name] = float(out.split()[-1])
    assert grew["bounded"] < 20 and grew["ideep default"] > 3 * grew["bounded"] + 40, grew


def test_a_zero_capacity_keeps_one_ideep_entry_and_packing_refuses_a_zero(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's packed ops crash (segmentation fault) with ``LRU_CACHE_CAPACITY=0``: the
    setting's 0 turns off oneDNN's cache only, and a 0 the user exported turns packing off
    with the reason instead of crashing the first forward."""
    from sureserve.loading import machine, packed

    for name in (machine.ONEDNN_CACHE_ENV, machine.IDEEP_CACHE_ENV):
        monkeypatch.delenv(name, raising=False)
    assert machine.bound_onednn_cache(0) == 0
    assert os.environ[machine.IDEEP_CACHE_ENV] == "1"
    monkeypatch.setenv(machine.IDEEP_CACHE_ENV, "0")
    why = packed.why_unavailable()
    assert why is not None and "LRU_CACHE_CAPACITY=0" in why
