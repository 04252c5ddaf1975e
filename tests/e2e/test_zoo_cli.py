"""The zoo and the CLI on the real packaged models."""

from __future__ import annotations

import json

import pytest

from sureserve.settings import Settings
from sureserve.zoo import ZOO
from tests.cli import cli

pytestmark = pytest.mark.e2e


def test_models_lists_the_zoo() -> None:
    r = cli("models", "--json")
    assert r.returncode == 0, r.stderr
    names = {row["name"] for row in json.loads(r.stdout)}
    assert names == set(ZOO)


@pytest.mark.parametrize("alias,arch,task", [
    ("minilm", "BertModel", "embed"),
    ("smollm2", "LlamaForCausalLM", "generate"),
    ("sentiment-demo", "BertForSequenceClassification", "classify"),
    ("rerank-demo", "BertForSequenceClassification", "rerank"),
])
def test_info_json(alias: str, arch: str, task: str) -> None:
    r = cli("info", alias, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["architecture"] == arch and d["task"] == task
    assert d["plan"]["device"] == "cpu" and d["plan"]["dtype"] == "float32"
    assert d["plan"]["reasons"]
    assert any(f["name"] == "model.safetensors" for f in d["files"])
    assert d["parameters"] > 1_000_000
    if alias == "smollm2":
        assert d["chat_template"] is True
        # 2 x 30 layers x 3 kv heads x 64 head dim x 4 bytes
        assert d["kv_cache_bytes_per_token"] == 2 * 30 * 3 * 64 * 4
        assert d["max_position_embeddings"] == 8192
    if alias == "minilm":
        assert d["usable_max_tokens"] == 256
        assert d["sentence_transformers"] == {"pooling": "mean", "normalize": True,
                                              "max_seq_length": 256, "prompts": {},
                                              "default_prompt_name": None, "splade": None}


def test_info_table_shows_plan_and_why() -> None:
    r = cli("info", "minilm")
    assert r.returncode == 0
    assert "why: device cpu" in r.stdout and "model.safetensors" in r.stdout


def test_info_task_mismatch_is_a_clear_error() -> None:
    r = cli("info", "minilm", "--task", "generate")
    assert r.returncode == 2
    assert "BertModel" in r.stderr and "fix:" in r.stderr


def test_sentiment_demo_accuracy_report() -> None:
    report = json.loads((ZOO["sentiment-demo"].path(Settings()) / "build_report.json").read_text())
    assert report["held_out"] == 1000
    assert report["held_out_accuracy"] >= 0.85


def test_rerank_demo_report_meets_its_target() -> None:
    report = json.loads((ZOO["rerank-demo"].path(Settings()) / "build_report.json").read_text())
    assert report["held_out"] >= 150 and report["candidates"] == 10
    assert report["held_out_top1"] >= 0.9
    assert report["unseen_topics"] == ["sports", "tech"] and report["unseen"] == 100
    assert 0 <= report["unseen_topics_top1"] <= 1


def test_smollm2_greedy_answer() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ZOO["smollm2"].path(Settings())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


@pytest.mark.parametrize("args", [["models"], ["zoo", "build", "minilm"], ["settings"]])
def test_a_bad_setting_is_a_clean_error_in_every_command(args: list[str]) -> None:
    r = cli(*args, timeout=120, env={"SURESERVE_MAX_WAIT_MS": "abc"})
    assert r.returncode == 2, r.stderr
    assert "max_wait_ms" in r.stderr and "SURESERVE_" in r.stderr
    assert "Traceback" not in r.stderr


def test_flags_are_generated_from_the_settings() -> None:
    import typer.main

    from sureserve.cli import app
    from sureserve.settings import GROUPS

    group = typer.main.get_command(app)
    ctx = typer.Context(group)

    def flags(*path: str) -> set[str]:
        cmd = group
        for name in path:
            cmd = cmd.get_command(ctx, name)  # type: ignore[attr-defined]
        return {o for p in cmd.params for o in p.opts}

    serve = flags("serve")
    for name in Settings.model_fields:  # serve takes every setting
        assert "--" + name.replace("_", "-") in serve, name
    assert {"--packing", "--tokenizer-workers", "--forward-workers"} <= serve
    chat = flags("chat")
    assert {"--dtype", "--device", "--kv-cache-mb", "--max-new-tokens", "-n"} <= chat
    assert "--truncation" not in chat  # batching settings are not the chat's
    assert {"--" + n.replace("_", "-") for n in GROUPS["batching"]} <= flags("embed")
    r = cli("settings", "--max-batch-tokens", "77", "--no-packing")
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert shown["max_batch_tokens"] == 77 and shown["packing"] is False
