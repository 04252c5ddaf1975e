"""sureserve fit: every branch of the plan on simulated machines, a 7B decoder planned from
its config alone, the CLI's JSON and exit codes, and where layers landed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sureserve.cli import app
from sureserve.loading.fit import Machine, ModelSize, need_gib, off_device, plan_fit

# a 7B-class decoder: 6.74e9 parameters, 0.5 MiB of KV per token in bf16
SEVEN_B = ModelSize(6_738_415_616, 202_383_360, 524_288)
LLAMA_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
            "intermediate_size": 11008, "num_attention_heads": 32, "num_hidden_layers": 32,
            "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
            "tie_word_embeddings": False}


def test_one_gpu_that_holds_it_is_the_plan() -> None:
    rows, plan = plan_fit(SEVEN_B, Machine((80.0,)), kv_mb=2048)
    assert (plan.placement, plan.precision, plan.devices) == ("single", "bfloat16", ["cuda:0"])
    assert not plan.warnings
    by = {r["precision"]: r for r in rows}
    assert by["bfloat16"]["weights_gib"] == pytest.approx(12.55, abs=0.01)
    assert by["float32"]["kv_bytes_per_token"] == 2 * by["bfloat16"]["kv_bytes_per_token"]
    assert by["int4"]["fits_one_device"]


def test_split_across_gpus_before_quantizing() -> None:
    _, plan = plan_fit(SEVEN_B, Machine((12.0, 12.0)), kv_mb=2048)
    assert plan.placement == "split" and plan.precision == "bfloat16"
    assert plan.devices == ["cuda:0", "cuda:1"] and plan.max_memory is not None
    assert sum(plan.max_memory.values()) >= need_gib(SEVEN_B, "bfloat16", 2048)[2]
    assert "cpu" not in plan.devices


def test_a_block_larger_than_every_gpu_cannot_be_split() -> None:
    huge_block = ModelSize(SEVEN_B.params, int(6e9), SEVEN_B.kv_bytes_per_token)
    _, plan = plan_fit(huge_block, Machine((12.0, 12.0)), kv_mb=2048)
    assert plan.placement == "quantize"


def test_int8_then_int4_on_one_device_and_each_needs_measuring() -> None:
    _, plan8 = plan_fit(SEVEN_B, Machine((12.0,)), kv_mb=1024)
    assert (plan8.placement, plan8.precision) == ("quantize", "int8")
    _, plan4 = plan_fit(SEVEN_B, Machine((7.0,)), kv_mb=1024)
    assert (plan4.placement, plan4.precision) == ("quantize", "int4")
    assert all("sureserve quantize" in p.warnings[0] for p in (plan8, plan4))


def test_offload_only_when_allowed_with_a_loud_warning() -> None:
    _, refused = plan_fit(SEVEN_B, Machine((4.0,), cpu_gib=64), kv_mb=1024)
    assert refused.placement == "refuse" and refused.precision is None
    assert "--allow-offload" in refused.warnings[0]
    _, plan = plan_fit(SEVEN_B, Machine((4.0,), cpu_gib=64), kv_mb=1024, allow_offload=True)
    assert plan.placement == "offload" and "cpu" in plan.devices
    assert "OFFLOAD" in plan.warnings[0] and "tokens/s" in plan.warnings[0]


def test_cpu_only_machines() -> None:
    assert plan_fit(SEVEN_B, Machine((), 64.0), 1024)[1].placement == "single"
    _, q = plan_fit(SEVEN_B, Machine((), 6.0), 1024)
    assert (q.placement, q.precision, q.devices) == ("quantize", "int4", ["cpu"])
    assert plan_fit(SEVEN_B, Machine((), 2.0), 1024)[1].placement == "refuse"
    assert plan_fit(SEVEN_B, Machine((), 2.0), 1024, allow_offload=True)[1].devices == \
        ["cpu", "disk"]


def test_layers_off_the_gpu_are_named() -> None:
    assert off_device({"": 0}) == []
    assert off_device({"model.layers.0": 0, "model.layers.31": "cpu", "lm_head": "disk"}) == \
        ["model.layers.31", "lm_head"]
    assert off_device(None) == []
    assert off_device({"": "cpu"}, "cpu") == []  # planned on the CPU: nothing is "off" it


def test_cli_plans_a_7b_decoder_from_its_config_alone(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_7B))
    runner = CliRunner()
    res = runner.invoke(app, ["fit", str(tmp_path), "--gpus", "2", "--gpu-memory", "12",
                              "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["params"] == 6_738_415_616 and rep["task"] == "generate"
    assert rep["plan"]["placement"] == "split" and rep["machine"]["simulated"]
    assert {r["precision"] for r in rep["precisions"]} == {"float32", "bfloat16", "int8", "int4"}
    refused = runner.invoke(app, ["fit", str(tmp_path), "--gpus", "1", "--gpu-memory", "2",
                                  "--cpu-memory", "4", "--json"])
    assert refused.exit_code == 3
    assert json.loads(refused.stdout)["plan"]["placement"] == "refuse"


def test_tied_embeddings_are_counted_once(tiny_llama: Path) -> None:
    from sureserve.loading.fit import model_size
    from sureserve.loading.inspect import parameter_count, read_json

    size = model_size(tiny_llama, read_json(tiny_llama / "config.json"), "generate")
    assert size.params == parameter_count(tiny_llama)


def test_load_on_gpus_applies_the_plan(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The loader's GPU branch, with a simulated machine: a balanced device_map when the model
    needs two GPUs, CPU memory only when offload is allowed, an error naming fit otherwise."""
    from sureserve.errors import ModelSourceError
    from sureserve.loading import fit, inspect, loader
    from sureserve.settings import Settings

    monkeypatch.setattr(inspect, "parameter_count", lambda folder: SEVEN_B.params)
    cfg = LLAMA_7B
    monkeypatch.setattr(fit, "real_machine", lambda: Machine((12.0, 12.0), 64.0))
    warnings: list[str] = []
    kw = loader.gpu_placement(tmp_path, cfg, "generate", Settings(kv_cache_mb=1024), warnings)
    assert kw["device_map"] == "auto" and set(kw["max_memory"]) == {0, 1}
    assert loader.gpu_placement(tmp_path, cfg, "generate", Settings(device="cuda:1"), []) == {}

    monkeypatch.setattr(fit, "real_machine", lambda: Machine((80.0,), 64.0))
    assert loader.gpu_placement(tmp_path, cfg, "generate", Settings(), []) == {}

    monkeypatch.setattr(fit, "real_machine", lambda: Machine((12.0,), 64.0))
    with pytest.raises(ModelSourceError, match="in 16-bit; int8 would"):
        loader.gpu_placement(tmp_path, cfg, "generate", Settings(kv_cache_mb=1024), [])
    monkeypatch.setattr(fit, "real_machine", lambda: Machine((4.0,), 64.0))
    with pytest.raises(ModelSourceError, match="at any precision"):
        loader.gpu_placement(tmp_path, cfg, "generate", Settings(), [])
    warnings = []
    kw = loader.gpu_placement(tmp_path, cfg, "generate", Settings(allow_offload=True), warnings)
    assert "cpu" in kw["max_memory"] and any("OFFLOAD" in w for w in warnings)


def test_packed_copies_count_on_a_cpu_only() -> None:
    """packed_linear keeps a second copy of 16/32-bit linear weights on a CPU (up to
    packed_linear_mb): a CPU plan counts it, a GPU plan and 8/4-bit rows do not."""
    small = ModelSize(135_000_000, 3_500_000, 46_080)  # smollm2-sized: 0.5 GiB in fp32
    cpu = Machine((), cpu_gib=24.0)
    rows, plan = plan_fit(small, cpu, kv_mb=1024)
    rows_p, plan_p = plan_fit(small, cpu, kv_mb=1024, packed_mb=1024)
    by, by_p = ({r["precision"]: r["needs_gib"] for r in x} for x in (rows, rows_p))
    fp32 = need_gib(small, "float32", 1024)[0]
    assert by_p["float32"] == pytest.approx(by["float32"] + fp32, abs=0.01)  # all of it
    assert by_p["int8"] == by["int8"] and by_p["int4"] == by["int4"]
    assert "packed copies" in " ".join(plan_p.reasons) and "packed" not in " ".join(plan.reasons)
    # the bound caps it
    capped = need_gib(SEVEN_B, "float32", 0, packed_mb=1024)[2] - need_gib(SEVEN_B, "float32", 0)[2]
    assert capped == pytest.approx(1.0)
    gpu_rows, _ = plan_fit(SEVEN_B, Machine((80.0,)), kv_mb=2048, packed_mb=1024)
    assert gpu_rows == plan_fit(SEVEN_B, Machine((80.0,)), kv_mb=2048)[0]


def test_decode_panel_copies_count_for_float32_generation_on_a_cpu(tmp_path: Path) -> None:
    """decode_panels_mb: the decode kernel's panel copies of float32 weights (generation on
    a CPU) are counted on top of the packed copies, capped at the weights, float32 rows
    only, never on a GPU; ``sureserve fit`` takes the flag and counts it for a decoder."""
    small = ModelSize(135_000_000, 3_500_000, 46_080)
    cpu = Machine((), cpu_gib=24.0)
    rows, _ = plan_fit(small, cpu, kv_mb=1024, packed_mb=1024)
    rows_p, plan_p = plan_fit(small, cpu, kv_mb=1024, packed_mb=1024, panel_mb=1024)
    by, by_p = ({r["precision"]: r["needs_gib"] for r in x} for x in (rows, rows_p))
    fp32 = need_gib(small, "float32", 1024)[0]
    assert by_p["float32"] == pytest.approx(by["float32"] + fp32, abs=0.01)  # capped
    assert by_p["bfloat16"] == by["bfloat16"] and by_p["int8"] == by["int8"]
    assert "decode_panels_mb" in " ".join(plan_p.reasons)
    gpu = Machine((80.0,))
    assert plan_fit(SEVEN_B, gpu, 2048, panel_mb=1024)[0] == plan_fit(SEVEN_B, gpu, 2048)[0]
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_7B))
    runner = CliRunner()
    args = ["fit", str(tmp_path), "--gpus", "0", "--cpu-memory", "64", "--json"]
    with_panels = json.loads(runner.invoke(app, args).stdout)
    without = json.loads(runner.invoke(app, [*args, "--decode-panels-mb", "0"]).stdout)
    need = {r["precision"]: r["needs_gib"] for r in with_panels["precisions"]}
    need0 = {r["precision"]: r["needs_gib"] for r in without["precisions"]}
    assert need["float32"] == pytest.approx(need0["float32"] + 1.0, abs=0.01)  # 1024 MB
    assert need["bfloat16"] == need0["bfloat16"]
