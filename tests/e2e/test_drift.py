"""The drift watch in offline runs and generation: a reference file as the baseline, the
run summary's warning, and the loop signal on smollm2."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import sureserve
from sureserve.bench.drift import LOOPY
from sureserve.zoo.corpora import load_vader
from tests.cli import cli

pytestmark = pytest.mark.e2e

QUESTIONS = ["What is the capital of France?", "Why is the sky blue?", "Name a fruit.",
             "How many legs does a spider have?", "What is two plus two?",
             "Write one sentence about the sea.", "What colour is grass?",
             "Who wrote Hamlet?", "What is water made of?", "Name a planet.",
             "What do bees make?", "Give me a word that rhymes with cat.",
             "What is the opposite of hot?", "How many days are in a week?",
             "What language is spoken in Spain?", "What is the largest ocean?",
             "Say hello in French.", "What animal says moo?", "What is ice?",
             "Name a musical instrument."]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    rows = load_vader("movieReviewSnippets")
    random.Random(5).shuffle(rows)
    d = tmp_path_factory.mktemp("drift")
    out = {"ordinary": [r.text for r in rows[:300]], "ordinary2": [r.text for r in rows[300:500]],
           "negative": [r.text for r in rows if r.score < -2.5][:200]}
    paths = {}
    for name, texts in out.items():
        paths[name] = d / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return paths


def test_offline_run_warns_against_a_reference(files: dict[str, Path]) -> None:
    args = ("classify", "-i", str(files["negative"]), "--reference", str(files["ordinary"]),
            "--drift-window", "100")
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    assert "drift warning" in r.stderr and "NEGATIVE" in r.stderr, r.stderr
    assert len(r.stdout.splitlines()) == 200  # the outputs are all there, in order
    quiet = cli("classify", "-i", str(files["ordinary2"]), "--reference",
                str(files["ordinary"]), "--drift-window", "100")
    assert quiet.returncode == 0 and "drift warning" not in quiet.stderr, quiet.stderr


def test_python_api_reference_baseline(files: dict[str, Path]) -> None:
    engine = sureserve.load("sentiment-demo", drift_window=100,
                            drift_reference=files["ordinary"])
    watch = engine.watch
    assert watch is not None and watch.baseline_ready(True)
    assert watch.baseline.inputs == 300 and watch.info()["window_inputs"] == 0
    texts = [json.loads(line)["text"] for line in files["negative"].read_text().splitlines()]
    engine.classify(texts[:100])
    signals = {s.name: s for s in watch.evaluate()[0]}
    assert signals["label_js"].alert and "reference" in signals["label_js"].detail
    off = sureserve.load("sentiment-demo", drift_watch=False)
    assert off.watch is None


def test_generation_loops_raise_the_loop_signal() -> None:
    engine = sureserve.load("smollm2", drift_window=20)
    watch = engine.watch
    assert watch is not None and "unknown_tokens" not in watch.names  # byte-level BPE
    engine.complete([[{"role": "user", "content": q}] for q in QUESTIONS], max_new_tokens=32)
    assert watch.baseline_ready(True)
    signals = {s.name: s for s in watch.evaluate()[0]}
    assert not signals["loops"].alert, signals["loops"].detail
    engine.complete([" ".join([w] * 12) for w in LOOPY], max_new_tokens=32)
    signals = {s.name: s for s in watch.evaluate()[0]}
    assert signals["loops"].alert, signals["loops"].detail
