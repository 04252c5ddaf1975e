"""The gate on the real packaged models: correct pairs pass, every mismatch is caught."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import sureserve
from sureserve.errors import GateError
from sureserve.settings import Settings
from sureserve.zoo import ZOO
from tests import mutations as M
from tests.cli import cli as _cli

pytestmark = pytest.mark.e2e


def zoo_path(alias: str) -> Path:
    return ZOO[alias].path(Settings())


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("broken")
    mini, smol, sent = zoo_path("minilm"), zoo_path("smollm2"), zoo_path("sentiment-demo")
    return {
        "minilm-shuffled": str(M.shuffled_tokenizer(mini, d / "mshuf")),
        "smollm2-shuffled": str(M.shuffled_tokenizer(smol, d / "sshuf")),
        "sentiment-shuffled": str(M.shuffled_tokenizer(sent, d / "seshuf")),
        "minilm-cased": str(M.casing_flipped_tokenizer(mini, d / "mcase")),
        "minilm-nopad": str(M.no_pad_tokenizer(mini, d / "mnopad")),
        "smollm2-nopad": str(M.no_pad_tokenizer(smol, d / "snopad")),
        "minilm-long": str(M.long_max_length_tokenizer(mini, d / "mlong")),
        "minilm-padded-model": str(M.padded_embeddings_model(mini, d / "mpad")),
    }


@pytest.mark.parametrize("alias", ["minilm", "smollm2", "sentiment-demo"])
def test_correct_pairs_pass_without_any_failure(alias: str) -> None:
    report = sureserve.check(alias)
    assert report.passed, [c for c in report.checks if c.status == "fail"]
    assert report.get("alignment").status == "pass"
    assert report.get("batch-invariance").status == "pass"
    assert report.get("output-collapse").status == "pass"


def test_minilm_gate_is_fast() -> None:
    assert sureserve.check("minilm").seconds < 2.0 * 3  # 2 s target; CI machines are noisy


@pytest.mark.parametrize("model,tok,failing", [
    ("minilm", "minilm-shuffled", {"alignment"}),
    ("smollm2", "smollm2-shuffled", {"alignment", "lm-affinity"}),
    ("sentiment-demo", "sentiment-shuffled", {"alignment"}),
    ("minilm", "smollm2", {"vocab-fits-embeddings", "tokenizer-family"}),
    ("smollm2", "minilm", {"alignment", "tokenizer-family"}),
    ("minilm", "minilm-cased", {"casing"}),
    ("minilm", "minilm-nopad", {"special-tokens"}),
])
def test_mismatches_fail_with_evidence(model: str, tok: str, failing: set[str],
                                       broken: dict[str, str]) -> None:
    report = sureserve.check(model, tokenizer=broken.get(tok, tok))
    assert not report.passed
    failed = {c.name for c in report.failures}
    assert failing <= failed, report.to_dict()
    for c in report.failures:
        assert c.evidence and c.fix


def test_decoder_without_pad_gets_eos_and_a_warning(broken: dict[str, str]) -> None:
    report = sureserve.check("smollm2", tokenizer=broken["smollm2-nopad"])
    special = report.get("special-tokens")
    assert special.status == "warn" and "eos" in special.evidence
    assert report.get("batch-invariance").status == "pass"


def test_too_long_model_max_length_is_a_warning_and_capped(broken: dict[str, str]) -> None:
    report = sureserve.check("minilm", tokenizer=broken["minilm-long"])
    c = report.get("max-length")
    assert c.status == "warn" and "100000" in c.evidence and "512" in c.evidence
    assert report.passed


def test_padded_embedding_matrix_passes(broken: dict[str, str]) -> None:
    report = sureserve.check(broken["minilm-padded-model"])
    c = report.get("vocab-fits-embeddings")
    assert c.status == "pass" and "64 extra rows" in c.evidence
    assert report.passed


def test_load_refuses_a_failed_gate_unless_accepted(broken: dict[str, str],
                                                    caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(GateError) as exc:
        sureserve.load("minilm", tokenizer=broken["minilm-shuffled"])
    assert "alignment" in exc.value.message
    assert "SURESERVE_ACCEPT_GATE_FAILURE" in exc.value.fix
    m = sureserve.load("minilm", tokenizer=broken["minilm-shuffled"], accept_gate_failure=True)
    assert m.gate_report is not None and m.gate_report.overridden
    assert "GATE OVERRIDDEN" in caplog.text


def test_check_cli_exit_codes_and_json(broken: dict[str, str]) -> None:
    ok = _cli("check", "minilm", "--json")
    assert ok.returncode == 0, ok.stderr
    d = json.loads(ok.stdout)
    assert d["passed"] is True and d["model"] == "minilm"
    assert {"name", "status", "evidence", "fix"} <= set(d["checks"][0])
    bad = _cli("check", "minilm", "--tokenizer", broken["minilm-shuffled"])
    assert bad.returncode == 3
    assert "alignment" in bad.stdout and "fail" in bad.stdout
    usage = _cli("check", "no-such-model")
    assert usage.returncode == 2


def test_the_incident(broken: dict[str, str]) -> None:
    """A sentiment classifier with the wrong tokenizer: transformers answers, skewed and
    silent; sureserve refuses."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    from sureserve.zoo.corpora import load_vader
    from sureserve.zoo.sentiment import split

    _, held = split(load_vader("movieReviewSnippets"))
    texts = [r.text for r in held[:200]]
    truth = [r.score > 0 for r in held[:200]]
    model = AutoModelForSequenceClassification.from_pretrained(zoo_path("sentiment-demo"))
    good = pipeline("text-classification", model=model,
                    tokenizer=AutoTokenizer.from_pretrained(zoo_path("sentiment-demo")))
    wrong = pipeline("text-classification", model=model,
                     tokenizer=AutoTokenizer.from_pretrained(broken["sentiment-shuffled"]))
    good_acc = sum((o["label"] == "POSITIVE") == t for o, t in zip(good(texts), truth,
                                                                    strict=True)) / len(texts)
    wrong_out = wrong(texts)  # no error, no warning: answers come back
    wrong_acc = sum((o["label"] == "POSITIVE") == t for o, t in zip(wrong_out, truth,
                                                                     strict=True)) / len(texts)
    top_share = max(sum(o["label"] == lbl for o in wrong_out) for lbl in ("POSITIVE", "NEGATIVE"))
    assert good_acc >= 0.8
    assert wrong_acc < 0.65  # near chance
    assert top_share / len(texts) >= 0.7  # and skewed towards one label
    report = sureserve.check("sentiment-demo", tokenizer=broken["sentiment-shuffled"])
    assert not report.passed and report.get("alignment").status == "fail"
    with pytest.raises(GateError):
        sureserve.load("sentiment-demo", tokenizer=broken["sentiment-shuffled"])
