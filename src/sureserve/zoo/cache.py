"""Build-once cache entries under ``SURESERVE_HOME``.

An entry is a folder that is either complete or absent: it is built in a private temporary
folder next to its final place and renamed into place only after the builder returned and
a ``.complete`` marker was written. A file lock serialises two processes that start the
same build at once; the second one waits and then finds the finished entry.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

MARKER = ".complete"


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file()


def cached_build(final: Path, builder: Callable[[Path], None]) -> Path:
    """Return ``final``, running ``builder(tmp_dir)`` first if the entry is not complete.

    ``builder`` fills the empty folder it is given; it must not touch ``final``.
    """
    if is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(final.parent / f".{final.name}.lock"))
    with lock:
        if is_complete(final):  # another process finished it while we waited
            return final
        # A half-built entry from a crashed run has no marker: clear it.
        if final.exists():
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            builder(tmp)
            (tmp / MARKER).write_text("ok\n")
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final
