"""Compiling one of sureserve's C sources once per machine, and finding it again.

Why here: two layers use compiled C — the decode step's GEMV (``generation/gemv.c``) and the
per-token int8 quantization of ``int8-smooth`` (``loading/int8rows.c``) — and the lower one
(loading) cannot import the higher (generation). A source is compiled with the system's C
compiler for this CPU (``-march=native``: AVX-512, AVX2 or plain C, whichever it has),
keyed by the source, the CPU's flags, the compiler's version, the flags and torch's
version, and kept under ``<home>/kernels/``; a missing or broken compiler is a reason the
caller reports, never an error.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import threading
from pathlib import Path

FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC")
LIBS = ("-lm",)
_LOCK = threading.Lock()  # one compile of a file at a time (temporary names are per pid)


def cpu_flags() -> str:
    """This CPU's instruction-set flags (part of a build's key; the tests read them)."""
    import platform

    from sureserve.loading.machine import cpuinfo_field

    return cpuinfo_field("flags", "Features") or platform.processor() or platform.machine()


def compiler() -> tuple[str | None, str, str]:
    """(the compiler, its ``--version`` text, "") or (None, "", why there is none)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None, "", "no C compiler to build it (install gcc, or set CC)"
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return None, "", f"the C compiler {cc!r} does not run ({exc})"
    return cc, version, ""


def build_key(source: Path, version: str, march: str) -> str:
    import torch  # its version is part of the key (the library links its libgomp)

    flags = (*FLAGS, f"-march={march}")
    return hashlib.sha256(source.read_bytes() + cpu_flags().encode() + version.encode()
                          + " ".join(flags + LIBS).encode() + torch.__version__.encode()
                          ).hexdigest()[:16]


def compiled(source: Path, home: Path | None, cc: str, key: str, march: str = "native"
             ) -> Path:
    """The shared library of ``source`` for ``key``, compiled now if it is not there yet.
    Raises ``OSError`` (or ``subprocess.SubprocessError``) when compiling fails."""
    folder = (home if home is not None else Path(os.environ.get("TMPDIR", "/tmp"))
              / "sureserve") / "kernels"
    so = folder / f"{source.stem}-{key}.so"
    with _LOCK:
        if not so.exists():
            folder.mkdir(parents=True, exist_ok=True)
            tmp = so.with_suffix(f".{os.getpid()}.tmp.so")
            r = subprocess.run([cc, *FLAGS, f"-march={march}", str(source), "-o", str(tmp),
                                *LIBS], capture_output=True, text=True, timeout=120)
            if r.returncode != 0:
                raise OSError(f"{cc} failed: {r.stderr.strip()[-300:]}")
            tmp.replace(so)
    return so
