"""Lockfile and verify on a copy of minilm that we then change in each of the four ways."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sureserve.settings import Settings
from sureserve.zoo import ZOO
from tests import mutations as M
from tests.cli import cli as _cli

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A copy of minilm and its lockfile, made once by ``sureserve lock``."""
    folder = tmp_path_factory.mktemp("pristine")
    model, lock = folder / "model", folder / "sureserve.lock"
    shutil.copytree(ZOO["minilm"].path(Settings()), model)
    r = _cli("lock", str(model), "-o", str(lock))
    assert r.returncode == 0, r.stderr
    return model, lock


@pytest.fixture()
def locked(pristine: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """This test's own copy of the locked model (each test changes it in its own way); the
    lock, made for an identical folder, names this copy."""
    model, lock = tmp_path / "model", tmp_path / "sureserve.lock"
    shutil.copytree(pristine[0], model)
    data = json.loads(pristine[1].read_text())
    assert data["model"]["identifier"] == str(pristine[0])
    data["model"]["identifier"] = str(model)
    lock.write_text(json.dumps(data, indent=2) + "\n")
    return model, lock


def _verify(lock: Path) -> tuple[int, dict[str, object]]:
    r = _cli("verify", str(lock), "--json")
    return r.returncode, json.loads(r.stdout)


def test_lockfile_is_readable_and_complete(pristine: tuple[Path, Path]) -> None:
    _, lock = pristine
    data = json.loads(lock.read_text())
    assert "model.safetensors" in data["files"] and len(data["files"]["config.json"]) == 64
    assert {"torch", "transformers", "tokenizers"} <= set(data["versions"])
    assert data["tokenizer"]["normalizer"]["type"] == "BertNormalizer"
    assert data["tokenizer"]["probe_ids"][0][0] == 101  # [CLS]
    assert data["outputs"]["kind"] == "embeddings" and data["outputs"]["tolerance"] == 1e-4
    assert lock.read_text().count("\n") > 20  # indented, diffable


def test_unchanged_verifies(locked: tuple[Path, Path]) -> None:
    code, rep = _verify(locked[1])
    assert code == 0 and rep["ok"] and not rep["files_changed"]


def test_file_change_without_behaviour_change_is_reported_not_failed(
        locked: tuple[Path, Path]) -> None:
    model, lock = locked
    (model / "README.md").write_text("edited\n")
    code, rep = _verify(lock)
    assert code == 0
    assert rep["files_changed"] == ["file README.md: changed"]


def test_version_change_is_reported(locked: tuple[Path, Path]) -> None:
    _, lock = locked
    data = json.loads(lock.read_text())
    data["versions"]["transformers"] = "4.0.0"
    lock.write_text(json.dumps(data))
    code, rep = _verify(lock)
    assert code == 0 and any("transformers: 4.0.0" in v for v in rep["versions_changed"])


def test_tokenizer_change_fails(locked: tuple[Path, Path], tmp_path: Path) -> None:
    model, lock = locked
    flipped = M.casing_flipped_tokenizer(model, tmp_path / "flipped")
    shutil.copy(flipped / "tokenizer.json", model / "tokenizer.json")
    shutil.copy(flipped / "tokenizer_config.json", model / "tokenizer_config.json")
    code, rep = _verify(lock)
    assert code == 3
    assert rep["tokenizer_changed"] and any("normalizer" in t for t in rep["tokenizer_changed"])


def test_weight_drift_fails(locked: tuple[Path, Path]) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    model, lock = locked
    weights = load_file(model / "model.safetensors")
    key = next(k for k in weights if "encoder.layer.0.output.dense.weight" in k)
    torch.manual_seed(0)
    weights[key] = weights[key] + 0.01 * torch.randn_like(weights[key])
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    code, rep = _verify(lock)
    assert code == 3
    assert rep["outputs_drifted"] and rep["max_drift"] > 1e-4
    assert any("model.safetensors" in f for f in rep["files_changed"])
