"""Run the command line as a user would: ``sureserve ARGS`` in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def cli(*args: str, stdin: str | None = None, env: dict[str, str] | None = None,
        timeout: float = 600, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``sureserve ARGS`` with this interpreter; ``env`` adds to the environment."""
    return subprocess.run([sys.executable, "-m", "sureserve.cli", *args], capture_output=True,
                          text=True, input=stdin, timeout=timeout, cwd=cwd,
                          env={**os.environ, **(env or {})})
