"""sentence-transformers prompts: the model's default_prompt_name applied by default, as
sentence-transformers applies it, on the Python API, the CLI and the server alike."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

import sureserve
from sureserve import errors
from sureserve.zoo.registry import minilm_dir
from tests.cli import cli
from tests.server.conftest import serve_here

TEXTS = ["What is the capital of France?", "Rates rose on Tuesday."]
PROMPTS = {"query": "query: ", "passage": "passage: ", "plain": ""}


@pytest.fixture(scope="module")
def prompted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """minilm with prompts declared, the query prompt the default (weights linked)."""
    src, dest = minilm_dir(), tmp_path_factory.mktemp("prompted") / "m"
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("model.safetensors"))
    (dest / "model.safetensors").symlink_to(src / "model.safetensors")
    (dest / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": PROMPTS, "default_prompt_name": "query"}))
    return dest


@pytest.fixture(scope="module")
def engine(prompted: Path) -> Any:
    return sureserve.load(str(prompted), drift_watch=False)


def test_default_and_named_prompts_equal_sentence_transformers(prompted: Path,
                                                               engine: Any) -> None:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(prompted), device="cpu")
    assert st.default_prompt_name == "query"
    np.testing.assert_allclose(engine.embed(TEXTS), st.encode(TEXTS), atol=1e-5)
    np.testing.assert_allclose(engine.embed(TEXTS, prompt_name="passage"),
                               st.encode(TEXTS, prompt_name="passage"), atol=1e-5)
    np.testing.assert_allclose(engine.embed(TEXTS, prompt_name=""),
                               st.encode(TEXTS, prompt=""), atol=1e-5)
    assert not np.allclose(engine.embed(TEXTS), engine.embed(TEXTS, prompt_name=""),
                           atol=1e-3)
    with pytest.raises(errors.InputError, match="'query', 'passage', 'plain'"):
        engine.embed(TEXTS, prompt_name="search")
    st_info = engine.info()["sentence_transformers"]
    assert st_info["default_prompt_name"] == "query" and st_info["prompts"] == PROMPTS
    # the CLI takes the same names
    r = cli("embed", "-m", str(prompted), "--prompt-name", "passage", TEXTS[0], process=False)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.splitlines()[0])["embedding"]
    np.testing.assert_allclose(got, st.encode([TEXTS[0]], prompt_name="passage")[0],
                               atol=1e-5)


def test_the_server_applies_the_default_and_reports_it(prompted: Path, engine: Any) -> None:
    with serve_here([str(prompted)]) as s:
        info = httpx.get(f"{s.url}/info").json()["models"][0]
        assert info["default_prompt_name"] == "query" and info["prompts"] == PROMPTS
        for body, want in (({"inputs": TEXTS}, engine.embed(TEXTS)),
                           ({"inputs": TEXTS, "prompt_name": ""},
                            engine.embed(TEXTS, prompt_name="")),
                           ({"inputs": TEXTS, "parameters": {"prompt_name": "passage"}},
                            engine.embed(TEXTS, prompt_name="passage"))):
            r = httpx.post(f"{s.url}/embed", json=body, timeout=60)
            assert r.status_code == 200, r.text
            np.testing.assert_allclose(r.json(), want, atol=1e-5)
        oa = httpx.post(f"{s.url}/v1/embeddings", json={"input": TEXTS}, timeout=60).json()
        np.testing.assert_allclose([d["embedding"] for d in oa["data"]], engine.embed(TEXTS),
                                   atol=1e-5)
        r = httpx.post(f"{s.url}/embed", json={"inputs": TEXTS, "prompt_name": "search"})
        assert r.status_code == 422 and "'query', 'passage', 'plain'" in r.text
