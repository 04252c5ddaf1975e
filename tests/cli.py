"""Run the command line as a user would: ``sureserve ARGS``.

By default the command runs in this test process (``sureserve.cli.main`` with its own argv,
environment, working folder, stdin and captured stdout/stderr), which skips the ~4 s a
fresh interpreter spends importing torch and transformers; exit codes, output and files
are the same as a real process's. ``process=True`` runs a real subprocess: for what only a
process shows (signals, Ray, servers left behind, a crash that must not take pytest down).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

#: commands that always get a real process: they start Ray or servers, or set signal
#: handlers and thread pools that must not leak into the test process
PROCESS_ONLY = {"serve", "bench"}
_ONE_AT_A_TIME = threading.Lock()  # argv, environ, cwd and std streams are process-wide


def cli(*args: str, stdin: str | None = None, env: dict[str, str] | None = None,
        timeout: float = 600, cwd: Path | None = None,
        process: bool | None = None) -> subprocess.CompletedProcess[str]:
    """``sureserve ARGS``; ``env`` adds to the environment. ``process``: True or False
    forces a real process or this one; by default ``--ray`` and ``PROCESS_ONLY`` commands
    get a process (a ``--ray`` job may run here when this process is connected to the
    cluster: the command then uses that connection, as a program embedding sureserve does,
    and leaves it open)."""
    if process is None:
        process = "--ray" in args or bool(args and args[0] in PROCESS_ONLY)
    if process:
        return subprocess.run([sys.executable, "-m", "sureserve.cli", *args],
                              capture_output=True, text=True, input=stdin, timeout=timeout,
                              cwd=cwd, env={**os.environ, **(env or {})})
    return _in_process(list(args), stdin, env or {}, cwd)


def _in_process(args: list[str], stdin: str | None, env: dict[str, str],
                cwd: Path | None) -> subprocess.CompletedProcess[str]:
    import torch

    from sureserve import cli as cli_module

    out, err = io.StringIO(), io.StringIO()
    # what main's logging.basicConfig would give a fresh process: warnings on stderr
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter(cli_module.LOG_FORMAT))
    handler.setLevel(logging.WARNING)
    fake_stdin = io.TextIOWrapper(io.BytesIO((stdin or "").encode()), encoding="utf-8")
    with _ONE_AT_A_TIME:
        saved_env, saved_argv, saved_cwd = dict(os.environ), sys.argv, os.getcwd()
        saved_stdin, threads = sys.stdin, torch.get_num_threads()
        code: int = 0
        try:
            os.environ.update(env)
            if cwd is not None:
                os.chdir(cwd)
            sys.argv, sys.stdin = ["sureserve", *args], fake_stdin
            logging.getLogger().addHandler(handler)
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    cli_module.main()
                except SystemExit as exc:
                    code = _exit_code(exc.code, err)
        finally:
            logging.getLogger().removeHandler(handler)
            os.environ.clear()
            os.environ.update(saved_env)
            os.chdir(saved_cwd)
            sys.argv, sys.stdin = saved_argv, saved_stdin
            torch.set_num_threads(threads)  # a job's forward workers may have lowered them
    return subprocess.CompletedProcess(["sureserve", *args], code, out.getvalue(),
                                       err.getvalue())


def _exit_code(code: object, err: io.StringIO) -> int:
    """What the interpreter would exit with for ``sys.exit(code)``."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    err.write(f"{code}\n")  # sys.exit("message") prints it and exits 1
    return 1
