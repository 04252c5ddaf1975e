"""How fast this machine's CPU multiplies in each dtype, measured once and cached.

CPU flags do not predict it: a CPU with AVX-512 BF16 but no AMX ran minilm in bf16 at
0.66x its fp32 speed, one without any bf16 support at 0.12x (BENCHMARKS.md). So the plan's
dtype advice comes from this short measurement (~0.5 s, once per CPU model, torch version
and thread count), kept under ``<home>/machine/``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

DTYPES = ("float32", "bfloat16", "float16")
#: bf16 matmuls at least this much faster than fp32: worth measuring bf16 on the user's data
#: (the plan's hint, the doctor's warn). Below 1.2x the precision lost buys too little.
BF16_WORTH = 1.2
#: a dtype whose matmuls run below this share of fp32 has no native support here
SLOW_DTYPE = 0.5
ONEDNN_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
IDEEP_CACHE_ENV = "LRU_CACHE_CAPACITY"
SIZE, SECONDS = 512, 0.12


def cpuinfo_field(*names: str) -> str | None:
    """The value of the first ``/proc/cpuinfo`` line that starts with one of ``names``
    (None where there is no such file or line)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(names):
                    return line.split(":", 1)[-1].strip()
    except OSError:
        pass
    return None


def _cpu_name() -> str:
    return cpuinfo_field("model name") or platform.processor() or platform.machine()


def bound_onednn_cache(capacity: int) -> int:
    """Cap oneDNN's primitive cache for this process; returns the capacity in force.

    oneDNN (torch's CPU kernels for GELU, bf16 matmuls, convolutions) compiles one
    primitive per tensor shape and keeps up to 1,024 of them. A server's batches have a
    new shape almost every time (batch size x padded length x packing), so the cache, and
    the heap it pins, grew for as long as traffic ran (BENCHMARKS.md "Memory under load").
    oneDNN reads the variable once, when it first compiles a primitive, so this must run
    before any model does; a value the user set wins.

    The same bound goes to ideep's cache (``LRU_CACHE_CAPACITY``, also 1,024 by default):
    torch's oneDNN ops on prepacked weights (``loading/packed.py``) keep their primitives
    there, one per input row count (~0.3-0.5 MB each), and oneDNN's own capacity does not
    bound it. Without it a server with packed linears grew ~700 MB over ten minutes of
    mixed traffic until that cache filled (BENCHMARKS.md "Memory with packed linears").
    At least 1 there: torch's packed ops crash (segmentation fault) with an ideep cache of
    0, so a capacity of 0 turns off oneDNN's cache only."""
    os.environ.setdefault(IDEEP_CACHE_ENV, str(max(1, capacity)))
    return int(os.environ.setdefault(ONEDNN_CACHE_ENV, str(capacity)))


def gemm_gflops(dtype_name: str = "float32", n: int = 2048, seconds: float = 2.0) -> float:
    """Measured matrix-multiply rate of this machine, in GFLOP/s, for square n x n (also
    the benchmarks' GEMM figure)."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)  # warm-up
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def best_ms(fn: Callable[[], object], reps: int = 5) -> float:
    """Best of ``reps`` timed calls of ``fn`` in milliseconds, after one warm-up call (the
    first call of a new shape pays kernel setup)."""
    fn()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def _ident(threads: int | None = None) -> str:
    import torch

    threads = torch.get_num_threads() if threads is None else threads
    return f"{_cpu_name()}|{platform.machine()}|{torch.__version__}|{threads}"


def speeds_path(home: Path, threads: int | None = None) -> Path:
    """Where this machine's measured speeds are cached: one file per CPU model, torch
    version and thread count (this process's unless ``threads`` is given)."""
    digest = hashlib.sha256(_ident(threads).encode()).hexdigest()[:16]
    return home / "machine" / f"{digest}.json"


def cpu_speeds(home: Path) -> dict[str, float]:
    """Matmul GFLOP/s of each dtype on this CPU (cached per machine; measured by one process
    at a time, see ``_one_at_a_time``)."""
    path = speeds_path(home)

    def read() -> dict[str, float] | None:
        try:
            return {k: float(v) for k, v in json.loads(path.read_text())["gflops"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    speeds = read()
    if speeds is not None:
        return speeds
    with _one_at_a_time(path):
        speeds = read()  # another process may have measured while this one waited
        if speeds is None:
            speeds = {d: round(gemm_gflops(d, SIZE, SECONDS), 2) for d in DTYPES}
            write_speeds(home, speeds)
    return speeds


def write_speeds(home: Path, speeds: dict[str, float], note: str = "measured",
                 threads: int | None = None) -> None:
    """Store ``speeds`` as this machine's (atomic). Besides the measurement itself, tests use
    it to make this machine read as another kind (a bf16-fast or bf16-less CPU)."""
    path = speeds_path(home, threads)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, {"machine": _ident(threads), "note": note, "gflops": speeds})
    except OSError:
        pass  # a read-only home still gets the advice, measured again next time


def _write_atomic(path: Path, data: Any) -> None:
    # a temporary name of this process and thread: two threads writing must not share one
    tmp = path.with_suffix(f".{os.getpid()}-{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


#: how long a process waits for another's measurement before measuring on its own
LOCK_WAIT_S = 300.0


@contextlib.contextmanager
def _one_at_a_time(path: Path) -> Iterator[None]:
    """Hold ``path``'s lock file while a measurement runs and its result is merged in. Why:
    processes started together (two pytest lanes, Ray replicas, a server and a CLI job)
    measured the same entry at once, each at a fraction of the CPU, so the cache kept a
    speed that the machine does not have; and each wrote its own read of the file back,
    dropping the entry another had just added (measured again at the next start, maybe to
    another verdict). A home where no lock file can be made (read-only) or a lock held
    past ``LOCK_WAIT_S`` measures without it, as before. A measurement must not itself
    measure into the same file (a second lock on it would wait for the first)."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(path.with_name(f".{path.name}.lock")), timeout=LOCK_WAIT_S)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
        held = True
    except (OSError, Timeout):
        held = False
    try:
        yield
    finally:
        if held:
            lock.release()


def measured_once(home: Path | None, prefix: str, key: str, measure: Callable[[], Any],
                  parse: Callable[[Any], T]) -> T:
    """``parse(measure())``, cached per machine beside its matmul speeds: entry ``key`` of
    ``<home>/machine/<prefix>-<speeds file name>`` (one file per CPU model, torch version and
    thread count, like the speeds). ``measure`` returns something JSON can hold; a missing
    or unreadable entry is measured again and stored (atomic), and nothing is stored when
    ``home`` is None or read-only. Used for the per-shape timings the decode paths are
    chosen by (generation/layout.py, generation/native.py): the same shapes load again and
    again, and one verdict per machine keeps the choice stable from one start to the
    next."""
    if home is None:
        return parse(measure())
    base = speeds_path(home)
    path = base.with_name(f"{prefix}-{base.name}")

    def read() -> tuple[dict[str, Any], list[T]]:  # the file's entries; [the parsed entry]
        try:
            loaded = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}, []
        cached = loaded if isinstance(loaded, dict) else {}
        try:
            return cached, [parse(cached[key])]
        except (ValueError, KeyError, TypeError, IndexError):
            return cached, []

    _, hit = read()
    if hit:
        return hit[0]
    with _one_at_a_time(path):
        cached, hit = read()  # measured by another process while this one waited
        if hit:
            return hit[0]
        value = measure()
        # merged into what the file holds now, not what this process read first; a home
        # that cannot be written measures again next time
        with contextlib.suppress(OSError):
            _write_atomic(path, {**cached, key: value})
    return parse(value)


#: the CPU kinds seen so far, as their measured matmul GFLOP/s (2 threads): a test presets
#: one with ``write_speeds`` so the code that branches on measured speed runs both ways
KINDS: dict[str, dict[str, float]] = {
    "bf16-faster": {"float32": 160.0, "bfloat16": 368.0, "float16": 40.0},  # AVX-512 BF16
    "bf16-slower": {"float32": 150.0, "bfloat16": 18.0, "float16": 12.0},  # AVX2 only
    "bf16-even": {"float32": 160.0, "bfloat16": 165.0, "float16": 30.0},  # neither
}


def preset_kind(home: Path, kind: str) -> list[Path]:
    """Make this machine read as ``kind`` (a key of KINDS) for every thread count a process
    here may run with; returns the files written (delete them to measure again). Another
    ``kind`` is a ValueError that lists the kinds."""
    if kind not in KINDS:
        raise ValueError(f"choose one of {', '.join(sorted(KINDS))}")
    written = []
    for threads in range(1, (os.cpu_count() or 1) + 1):
        write_speeds(home, KINDS[kind], note=f"preset: {kind}", threads=threads)
        written.append(speeds_path(home, threads))
    return written


def bf16_speed(home: Path) -> float:
    """bf16 matmul speed as a multiple of fp32 on this CPU."""
    s = cpu_speeds(home)
    return s["bfloat16"] / max(s["float32"], 1e-9)


def linear_flops_per_token(model: Any) -> int:
    """2 x weights of every nn.Linear the tokens pass through (the GEMM work per token)."""
    import torch

    return sum(2 * m.in_features * m.out_features for m in model.modules()
               if isinstance(m, torch.nn.Linear))


class RssSampler:
    """Peak resident memory of a process (this one by default) while a block runs
    (sampled every 10 ms)."""

    def __init__(self, pid: int | None = None) -> None:
        import psutil

        self.proc = psutil.Process(os.getpid() if pid is None else pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(0.01)

    def __enter__(self) -> RssSampler:
        self.peak = self.proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
