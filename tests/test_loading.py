"""Source resolution, pickle refusal, task inference and loading, on tiny models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import sureserve
from sureserve.errors import (
    GateError,
    ModelSourceError,
    TaskMismatchError,
    UnsafeWeightsError,
)
from sureserve.loading.inspect import infer_task, usable_max
from sureserve.loading.source import resolve, vet_weights
from sureserve.settings import Settings


def test_zoo_alias_resolves_to_package_folder() -> None:
    src = resolve("minilm")
    assert src.kind == "zoo" and (src.path / "model.safetensors").is_file()


def test_local_folder(tiny_bert: Path) -> None:
    src = resolve(str(tiny_bert))
    assert src.kind == "local" and src.path == tiny_bert.resolve()


def test_folder_without_config_is_explained(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError) as exc:
        resolve(str(tmp_path))
    assert "config.json" in exc.value.message


def test_unknown_identifier_lists_the_zoo() -> None:
    with pytest.raises(ModelSourceError) as exc:
        resolve("no-such-thing")
    assert "minilm" in exc.value.fix and "sureserve models" in exc.value.fix


def _point_hub_cache(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # huggingface_hub reads HF_HUB_CACHE once at import; patch the resolved constant too.
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_CACHE", str(path))
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(path))


def _fake_hub_cache(root: Path, repo: str, model_dir: Path, commits: dict[str, str]) -> None:
    """Lay out a Hugging Face cache entry: refs/<name> -> snapshots/<sha>/files."""
    base = root / "hub" / ("models--" + repo.replace("/", "--"))
    for ref, sha in commits.items():
        snap = base / "snapshots" / sha
        shutil.copytree(model_dir, snap, dirs_exist_ok=True)
        (base / "refs").mkdir(parents=True, exist_ok=True)
        (base / "refs" / ref).write_text(sha)


def test_hub_id_in_local_cache_with_pinned_revision(
    tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _point_hub_cache(tmp_path / "hf" / "hub", monkeypatch)
    sha_a, sha_b = "a" * 40, "b" * 40
    _fake_hub_cache(tmp_path / "hf", "acme/tiny", tiny_bert, {"main": sha_a})
    _fake_hub_cache(tmp_path / "hf", "acme/tiny", tiny_bert, {"v2": sha_b})
    src = resolve("acme/tiny")
    assert resolve("acme/tiny", revision="v2").path.name == sha_b
    assert src.kind == "hub-cache" and src.path.name == sha_a
    pinned = resolve("acme/tiny", revision=sha_b)
    assert pinned.path.name == sha_b and pinned.revision == sha_b


def test_hub_id_not_in_cache_says_what_to_do(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    _point_hub_cache(tmp_path / "hf" / "hub", monkeypatch)
    with pytest.raises(ModelSourceError) as exc:
        resolve("acme/missing", revision="deadbeef")
    assert "not in the local Hugging Face cache" in exc.value.message
    assert "hf download acme/missing --revision deadbeef" in exc.value.fix
    assert "SURESERVE_ALLOW_DOWNLOAD" in exc.value.fix


def test_pickled_weights_are_refused_with_reason(pickled_bert: Path) -> None:
    with pytest.raises(UnsafeWeightsError) as exc:
        sureserve.load(str(pickled_bert))
    assert "pytorch_model.bin" in exc.value.message
    assert "runs" in exc.value.message or "run" in exc.value.message
    assert "--allow-pickle" in exc.value.fix


def test_pickled_weights_load_when_opted_in(pickled_bert: Path, tiny_bert: Path) -> None:
    assert vet_weights(pickled_bert, allow_pickle=True) is False
    m = sureserve.load(str(pickled_bert), allow_pickle=True, accept_gate_failure=True)
    ref = sureserve.load(str(tiny_bert), accept_gate_failure=True)
    np.testing.assert_allclose(m.embed(["hello there"]), ref.embed(["hello there"]), atol=1e-6)


def test_safetensors_preferred_when_both_exist(pickled_bert: Path, tiny_bert: Path) -> None:
    shutil.copy(tiny_bert / "model.safetensors", pickled_bert / "model.safetensors")
    assert vet_weights(pickled_bert, allow_pickle=False) is True


@pytest.mark.parametrize("arch,st,requested,expected", [
    ("BertModel", True, None, "embed"),
    ("BertModel", False, None, "embed"),
    ("BertForSequenceClassification", False, None, "classify"),
    ("BertForSequenceClassification", False, "embed", "embed"),
    ("LlamaForCausalLM", False, None, "generate"),
])
def test_task_inference(tmp_path: Path, arch: str, st: bool, requested: str | None,
                        expected: str) -> None:
    if st:
        (tmp_path / "modules.json").write_text("[]")
    assert infer_task(tmp_path, {"architectures": [arch]}, requested) == expected


@pytest.mark.parametrize("arch,requested", [
    ("BertModel", "classify"), ("BertModel", "generate"), ("LlamaForCausalLM", "embed"),
    ("BertForSequenceClassification", "generate"),
])
def test_task_mismatch_says_what_was_found(tmp_path: Path, arch: str, requested: str) -> None:
    with pytest.raises(TaskMismatchError) as exc:
        infer_task(tmp_path, {"architectures": [arch]}, requested)
    assert arch in exc.value.message and requested in exc.value.message


def test_usable_max_is_the_smallest_and_says_which() -> None:
    from sureserve.loading.inspect import STConfig

    lim = usable_max({"max_position_embeddings": 512}, 512, STConfig("mean", True, 256))
    assert lim.value == 256 and "max_seq_length" in lim.bound_by
    lim = usable_max({"max_position_embeddings": 128}, int(1e30), None)
    assert lim.value == 128 and "position" in lim.bound_by
    roberta = usable_max({"model_type": "roberta", "max_position_embeddings": 514,
                          "pad_token_id": 1}, 100_000, None)
    assert roberta.value == 512


def test_random_tiny_model_fails_the_gate_and_loads_only_when_accepted(tiny_bert: Path) -> None:
    # Its embeddings are random: related words are no closer than any others.
    with pytest.raises(GateError) as exc:
        sureserve.load(str(tiny_bert))
    assert "alignment" in exc.value.message
    m = sureserve.load(str(tiny_bert), accept_gate_failure=True)
    assert m.gate_report is not None and m.gate_report.overridden


def test_load_tiny_and_info(tiny_bert: Path) -> None:
    m = sureserve.load(str(tiny_bert), accept_gate_failure=True)
    assert m.task_name == "embed"
    d = m.info()
    assert d["path"] == str(tiny_bert.resolve())
    from safetensors.torch import load_file

    stored = load_file(tiny_bert / "model.safetensors")
    assert d["parameters"] == sum(t.numel() for t in stored.values())
    assert d["plan"]["device"] == "cpu" and d["plan"]["dtype"] == "float32"
    assert d["usable_max_tokens"] == 128


def test_explicit_tokenizer_override_is_reported_loudly(tiny_bert: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    m = sureserve.load(str(tiny_bert), tokenizer="minilm", accept_gate_failure=True)
    assert any("TOKENIZER OVERRIDE" in w for w in m.loaded.warnings)
    assert "TOKENIZER OVERRIDE" in caplog.text
    assert m.info()["tokenizer_overridden"] is True


def test_trust_remote_code_is_off(tiny_bert: Path, tmp_path: Path) -> None:
    # A config that asks for remote code is not executed: loading uses the built-in class.
    d = tmp_path / "remote"
    shutil.copytree(tiny_bert, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "evil.EvilModel"}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    m = sureserve.load(str(d), accept_gate_failure=True)
    assert type(m.model).__name__ == "BertModel"
    assert Settings().trust_remote_code is False
