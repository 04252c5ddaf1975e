"""Shared fixtures: an isolated SURESERVE_HOME and tiny random models built on the fly."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from sureserve.zoo.registry import minilm_dir

#: ``SURESERVE_TEST_MACHINE_KIND=bf16-faster make test`` runs the whole suite (servers and
#: CLI subprocesses included) as if this CPU had measured like that kind (machine.KINDS):
#: the machine-speed cache is preset for the run and removed after it (re-measured later)
MACHINE_KIND_ENV = "SURESERVE_TEST_MACHINE_KIND"
_PRESET: list[Path] = []


def pytest_sessionstart(session: pytest.Session) -> None:
    kind = os.environ.get(MACHINE_KIND_ENV)
    # scripts/test_lanes.py presets once for its two pytest lanes and removes it after both
    if kind and not os.environ.get("SURESERVE_TEST_PRESET_HELD"):
        from sureserve.loading import machine
        from sureserve.settings import Settings

        try:
            _PRESET.extend(machine.preset_kind(Settings().home_dir(), kind))
        except ValueError as exc:
            raise pytest.UsageError(f"{MACHINE_KIND_ENV}={kind}: {exc}") from exc


def pytest_sessionfinish(session: pytest.Session) -> None:
    for path in _PRESET:
        path.unlink(missing_ok=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Lanes for a developer iterating (``make test`` runs everything): ``-m "not ray and
    not bench"`` skips the Ray clusters and the end-to-end benchmarks, ``-m "not e2e"``
    keeps the unit tests (tiny random models, seconds)."""
    for item in items:
        path = str(item.path)
        if "ray" in item.path.stem and "ray_board" not in item.path.stem:
            item.add_marker(pytest.mark.ray)
        if "bench" in item.name or "bench" in item.path.stem:
            item.add_marker(pytest.mark.bench)
        if "e2e" in path.split("tests", 1)[-1] or "/server/" in path:
            item.add_marker(pytest.mark.e2e)
        if item.name in BROWSER_TESTS:
            item.add_marker(pytest.mark.browser)
    # the Ray tests last, the one on a Ray instance of its own first among them: the session's
    # cluster then starts after it and is shut down right after its last user (an idle local
    # Ray takes ~5% of a core, which the tests after it used to pay)
    def order(item: pytest.Item) -> int:
        if item.name == STOPS_THE_SESSION_SERVER:
            return 3
        if item.get_closest_marker("ray") is None:
            return 0
        return 1 if item.name == OWN_RAY_INSTANCE else 2
    items.sort(key=order)  # stable: every other order is kept


#: the test that SIGTERMs the session's server (tests/server/conftest.py ``server``): last
STOPS_THE_SESSION_SERVER = "test_sigterm_finishes_in_flight_requests_then_exits_0"
#: the Ray test that starts (and checks that it leaves nothing of) a Ray instance of its own
OWN_RAY_INSTANCE = "test_ray_serve_answers_like_local_autoscales_overload_killed_replica_clean_exit"


#: the tests that render a page in headless chromium
BROWSER_TESTS = {"test_swagger_ui_renders_the_routes_without_network",
                 "test_url_under_a_flood_reports_429s_and_writes_a_page"}


def pytest_report_header(config: pytest.Config) -> str:
    return f"machine-speed cache: {os.environ.get(MACHINE_KIND_ENV) or 'as measured here'}"


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random BERT with minilm's real tokenizer, saved as safetensors."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_bert")
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_cls")
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                     num_labels=3, id2label={0: "A", 1: "B", 2: "C"},
                     label2id={"A": 0, "B": 1, "C": 2})
    BertForSequenceClassification(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(path)
    return path


@pytest.fixture()
def pickled_bert(tiny_bert: Path, tmp_path: Path) -> Path:
    """The tiny BERT with its weights saved as a pickle (pytorch_model.bin) only."""
    import torch
    from safetensors.torch import load_file

    path = tmp_path / "pickled"
    shutil.copytree(tiny_bert, path)
    # transformers 5 no longer writes pickles itself; write one the way old checkpoints were
    torch.save(load_file(path / "model.safetensors"), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    return path


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SURESERVE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama with smollm2's real tokenizer (a decoder to quantize)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sureserve.settings import Settings
    from sureserve.zoo.registry import ZOO

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_llama")
    tok = AutoTokenizer.from_pretrained(ZOO["smollm2"].path(Settings()))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


#: a Hermes-style chat template with tools (the shape of Qwen2.5's): tools listed in a
#: system turn, calls written as <tool_call>{json}</tool_call>, results as tool_response
HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou can call these functions:\n<tools>\n"
    "{%- for tool in tools %}{{ tool | tojson }}\n{%- endfor %}</tools>\n"
    "Call one as <tool_call>\n{\"name\": ..., \"arguments\": {...}}\n</tool_call>"
    "<|im_end|>\n{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'tool' %}<|im_start|>user\n<tool_response>\n"
    "{{ message.content }}\n</tool_response><|im_end|>\n"
    "{%- elif message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant"
    "{%- for call in message.tool_calls %}\n<tool_call>\n{\"name\": \""
    "{{ call.function.name }}\", \"arguments\": {{ call.function.arguments | tojson }}}"
    "\n</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")


@pytest.fixture(scope="session")
def tool_llama(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_llama with a chat template that renders tools (Hermes style)."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tool_llama")
    shutil.copytree(tiny_llama, path, dirs_exist_ok=True)
    # room for the rendered tools (~200 tokens) and a call after them
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 512}))
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = HERMES_TEMPLATE
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """One local Ray cluster for the session (start-up is paid once), bound to 127.0.0.1;
    yields its address for ``--ray-address``."""
    import ray

    from sureserve.ray.cluster import start_local

    start_local(num_cpus=2)
    yield str(ray.get_runtime_context().gcs_address)
    ray.shutdown()
