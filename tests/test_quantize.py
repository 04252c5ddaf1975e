"""sureserve quantize on tiny random models of each task: thresholds honoured (accept and
reject paths), the sensitivity search, exit codes, and a written folder that loads, passes
its gate and is caught when its outputs drift from the golden ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import sureserve
from sureserve.cli import app, exit_code
from sureserve.errors import InputError, ModelSourceError, SettingsError
from sureserve.loading import precision as Q
from sureserve.loading.plan import DeviceCaps
from sureserve.quantize import measure as M
from sureserve.quantize.evalset import label_indices, split
from sureserve.quantize.run import quantize
from sureserve.settings import Settings

# random tiny models fail the gate's alignment probe by design; the quantize runs accept
# that and judge each candidate only by what fails on it and not on the baseline
RANDOM = Settings(accept_gate_failure=True)

SENTENCES = [
    "The film was a delight from start to finish.", "I would not watch it again.",
    "A slow, muddled plot with wooden acting.", "Markets rallied after the central bank spoke.",
    "The new phone's battery lasts two days.", "Rain is expected across the north tonight.",
    "She scored twice in the second half.", "The recipe needs three eggs and some flour.",
    "Parliament debated the budget until midnight.", "This is the best pizza in town!",
    "Customer service never answered my emails.", "The museum reopens next spring.",
    "An utterly forgettable sequel.", "Engineers fixed the bridge ahead of schedule.",
    "Prices of rice rose for the third month.", "What a wonderful surprise party.",
    "The train was late again this morning.", "Our team shipped the release on Friday.",
    "The soup was cold and bland.", "A gripping thriller with a clever twist.",
    "Scientists found water ice near the pole.", "He forgot his keys at the office.",
    "The concert sold out in minutes.", "Traffic was light on the motorway.",
]
LOOSE = M.Thresholds(min_cosine=0.5, min_agreement=0.5, max_accuracy_drop=100,
                     max_perplexity_increase=10.0, min_speedup=0.0)


def test_fidelity_measures() -> None:
    ref = np.eye(4, dtype=np.float32) + 0.1
    fid = M.embed_fidelity(ref, ref * 3)  # scale does not matter to a cosine
    assert fid["min_cosine"] == pytest.approx(1.0) and fid["neighbour_overlap"] == 1.0
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    other = np.array([[0.8, 0.2], [0.3, 0.7], [0.4, 0.6]])
    c = M.classify_fidelity(probs, other, labels=[0, 1, 0])
    assert c["agreement"] == pytest.approx(2 / 3) and c["accuracy_drop"] == pytest.approx(33.333)
    assert c["max_probability_diff"] == pytest.approx(0.2)
    g = M.generate_fidelity([[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 9, 6]], 1.0, 1.1)
    assert g["greedy_agreement"] == 0.5 and g["first_divergence"] == 1
    assert g["perplexity_increase"] == pytest.approx(np.exp(0.1) - 1)
    t = M.Thresholds()
    assert M.verdict("embed", {"min_cosine": 0.98}, t) == "min cosine 0.9800 < 0.99"
    assert M.verdict("classify", c, t) is not None
    assert M.verdict("generate", g, t) is not None  # +10.5% perplexity
    assert t.tightened().min_cosine == pytest.approx(0.995)


def test_split_is_disjoint_and_small_files_are_refused() -> None:
    calib, ev = split(100, "embed")
    assert not set(calib) & set(ev) and len(calib) + len(ev) == 100 and len(calib) == 25
    assert len(split(1000, "generate")[0]) == 12
    with pytest.raises(InputError, match="at least"):
        split(5, "embed")
    assert label_indices(["b", "A", "2"], ["A", "B", "C"]) == [1, 0, 2]
    with pytest.raises(InputError, match="not one of the model's labels"):
        label_indices(["positive"], ["A", "B"])


def test_methods_know_where_they_run() -> None:
    cpu, h200 = DeviceCaps(), DeviceCaps(cuda_count=1, cuda_capability=(9, 0),
                                         flash_attn_installed=True)
    assert Q.unavailable(Q.get("int8-dynamic"), "embed", "cpu", cpu) is None
    assert Q.unavailable(Q.get("bnb-int8"), "embed", "cpu", cpu) is None  # its CPU backend
    assert "CUDA" in (Q.unavailable(Q.get("bf16-flash"), "embed", "cpu", cpu) or "")
    assert "mps" in (Q.unavailable(Q.get("bnb-nf4"), "generate", "mps", cpu) or "")
    assert "CPU kernel" in (Q.unavailable(Q.get("int8-dynamic"), "embed", "cuda:0", h200) or "")
    assert "not a embed method" in (Q.unavailable(Q.get("int4-weight-only"), "embed", "cpu",
                                                  cpu) or "")
    assert Q.unavailable(Q.get("bf16-flash"), "generate", "cuda:0", h200) is None
    old = DeviceCaps(cuda_count=1, cuda_capability=(7, 5), flash_attn_installed=True)
    assert "8.0" in (Q.unavailable(Q.get("bf16-flash"), "generate", "cuda:0", old) or "")
    with pytest.raises(SettingsError, match="unknown quantization method"):
        Q.get("int3")


def test_bitsandbytes_configs_keep_heads_and_chosen_layers() -> None:
    pytest.importorskip("transformers")
    import torch

    kw = Q.load_kwargs(Q.get("bnb-nf4"), ["model.layers.0.mlp.down_proj"], "cuda:0")
    cfg = kw["quantization_config"]
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "nf4"
    assert cfg.bnb_4bit_compute_dtype == torch.bfloat16 and kw["device_map"] == {"": "cuda:0"}
    on_cpu = Q.load_kwargs(Q.get("bnb-nf4"), [], "cpu")
    assert on_cpu["quantization_config"].bnb_4bit_compute_dtype == torch.float32
    assert Q.dtype_on(Q.get("bnb-int8"), "cpu") == "float32"
    assert Q.dtype_on(Q.get("bnb-int8"), "cuda:0") == "float16"
    assert {"lm_head", "model.layers.0.mlp.down_proj"} <= set(cfg.llm_int8_skip_modules)
    assert Q.load_kwargs(Q.get("bnb-int8"), [])["quantization_config"].load_in_8bit
    assert Q.load_kwargs(Q.get("int8-dynamic"), []) == {}


@pytest.mark.parametrize("method", ["int8-dynamic", "int8-weight-only"])
def test_layer_kernels_match_their_float_reference(method: str) -> None:
    import torch

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    from sureserve.loading import kernels

    q = kernels.quantize_layer(Q.get(method), lin)
    x = torch.randn(5, 7, 64)
    with torch.no_grad():
        ref, got = lin(x), q(x)
    assert got.shape == ref.shape
    rel = float((got - ref).norm() / ref.norm())
    assert rel < 0.05, rel
    assert Q.weights_bytes(q) < Q.weights_bytes(lin)


def test_only_the_head_method_quantizes_the_output_head() -> None:
    """Heads stay in full precision (where quantized models lose most) unless the method
    says otherwise (``int8-weight-only-head``, judged by the same perplexity bar); its
    sensitivity search may still keep lm_head."""
    from sureserve.loading import kernels
    from sureserve.loading.kernels import Int8WeightOnlyLinear
    from tests.test_direct_decode import _model

    plain, head = _model("llama"), _model("llama")
    assert "lm_head" not in Q.linear_layers(plain)
    assert Q.linear_layers(plain, heads=True)[-1] == "lm_head"
    kernels.apply(plain, Q.get("int8-weight-only"))
    kernels.apply(head, Q.get("int8-weight-only-head"))
    assert type(plain.lm_head).__name__ == "Linear"
    assert isinstance(head.lm_head, Int8WeightOnlyLinear)
    assert isinstance(head.model.layers[0].mlp.down_proj, Int8WeightOnlyLinear)
    kept = _model("llama")
    kernels.apply(kept, Q.get("int8-weight-only-head"), keep=["lm_head"])
    assert type(kept.lm_head).__name__ == "Linear"
    assert Q.get("int8-weight-only-head").tasks == ("generate",)


def test_int4_kernel_matches_its_dequantized_weights() -> None:
    import torch

    from sureserve.loading.kernels import Int4WeightOnlyLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    q = Int4WeightOnlyLinear(lin)
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert float((q(x) - lin(x)).norm() / lin(x).norm()) < 0.2


def test_embed_accept_writes_a_folder_that_loads_and_is_checked(tiny_bert: Path,
                                                                 tmp_path: Path) -> None:
    out = tmp_path / "q"
    rep = quantize(str(tiny_bert), SENTENCES, methods=["int8-dynamic", "bf16-flash"],
                   thresholds=LOOSE, output=out, settings=RANDOM)
    by = {c["method"]: c for c in rep["candidates"]}
    assert by["bf16-flash"]["status"] == "skipped" and "CUDA" in by["bf16-flash"]["reason"]
    assert by["int8-dynamic"]["status"] == "accepted" and rep["chosen"] == "int8-dynamic"
    assert 0.5 <= by["int8-dynamic"]["min_cosine"] <= 1.0
    assert rep["baseline"]["weights_mib"] > by["int8-dynamic"]["weights_mib"]
    recipe = json.loads((out / Q.RECIPE_FILE).read_text())
    assert recipe["method"] == "int8-dynamic" and recipe["evaluated"]
    assert json.loads((out / Q.REPORT_FILE).read_text())["chosen"] == "int8-dynamic"

    engine = sureserve.load(str(out), accept_gate_failure=True)
    assert engine.loaded.quantization is not None
    assert engine.loaded.precision == "int8-dynamic"
    assert engine.gate_report is not None
    q_check = next(c for c in engine.gate_report.checks if c.name == "quantization")
    assert q_check.status == "pass", q_check.evidence
    assert not any("NOT EVALUATED" in w for w in engine.loaded.warnings)
    info = sureserve.info(str(out))
    assert info["quantization"]["method"] == "int8-dynamic" and info["quantization"]["evaluated"]
    # lock records the method, and verify passes on the same folder
    from sureserve.gate.lock import verify, write_lock

    lock = write_lock(engine, tmp_path / "q.lock")
    assert lock["plan"]["quantization"]["method"] == "int8-dynamic"
    assert lock["outputs"]["dtype"] == "int8-dynamic"
    assert verify(lock, engine).ok
    with pytest.raises(ModelSourceError, match="was quantized with int8-dynamic"):
        sureserve.load(str(out), quantization="int8-weight-only", accept_gate_failure=True)

    # golden outputs that no longer match (another kernel, another library) fail the gate
    recipe["golden"]["values"][0][0] += 0.5
    (out / Q.RECIPE_FILE).write_text(json.dumps(recipe))
    report = sureserve.check(str(out))
    assert "quantization" in [c.name for c in report.failures]


def test_embed_reject_path_runs_the_sensitivity_search(tiny_bert: Path) -> None:
    strict = M.Thresholds(min_cosine=1.01, min_speedup=0.0)  # no candidate can hold it
    rep = quantize(str(tiny_bert), SENTENCES, methods=["int8-dynamic"], thresholds=strict,
                   settings=RANDOM)
    (cand,) = rep["candidates"]
    assert cand["status"] == "rejected" and "min cosine" in cand["reason"]
    assert cand["search"] is not None and cand["search"]["layers"] == 12
    assert rep["chosen"] is None


def test_classify_with_labels(tiny_classifier: Path, tmp_path: Path) -> None:
    labels = ["A", "B", "C"] * 8
    rep = quantize(str(tiny_classifier), SENTENCES, labels, methods=["int8-weight-only"],
                   thresholds=LOOSE, settings=RANDOM)
    (cand,) = rep["candidates"]
    assert cand["status"] == "accepted" and cand["accuracy"] is not None
    assert cand["agreement"] is not None and cand["accuracy_drop"] is not None
    assert rep["baseline"]["accuracy"] is not None
    rep2 = quantize(str(tiny_classifier), SENTENCES, labels, methods=["int8-weight-only"],
                    thresholds=M.Thresholds(min_speedup=1e9), settings=RANDOM)
    assert rep2["candidates"][0]["status"] == "rejected"


def test_generate_candidates(tiny_llama: Path) -> None:
    rep = quantize(str(tiny_llama), SENTENCES, methods=["int4-weight-only", "int8-dynamic"],
                   thresholds=LOOSE, settings=RANDOM)
    by = {c["method"]: c for c in rep["candidates"]}
    assert rep["task"] == "generate"
    for name in ("int4-weight-only", "int8-dynamic"):
        assert by[name]["status"] == "accepted", by[name]["reason"]
        assert by[name]["perplexity_increase"] is not None
        assert by[name]["greedy_agreement"] is not None
        # decoders are timed at both loads: the prompts together and one prompt alone
        assert by[name]["speedup"] > 0 and by[name]["speedup_one_prompt"] > 0
        assert "for one prompt alone" in by[name]["reason"]
    assert rep["baseline"]["one_prompt_per_second"] > 0


def test_bitsandbytes_runs_on_cpu(tiny_llama: Path) -> None:
    """bitsandbytes' CPU backend: the same BitsAndBytesConfig path that runs on CUDA."""
    rep = quantize(str(tiny_llama), SENTENCES, methods=["bnb-int8", "bnb-nf4"],
                   thresholds=LOOSE, settings=RANDOM)
    by = {c["method"]: c for c in rep["candidates"]}
    for name in ("bnb-int8", "bnb-nf4"):
        assert by[name]["status"] == "accepted", by[name]["reason"]
        assert by[name]["weights_mib"] < rep["baseline"]["weights_mib"]
    engine = sureserve.load(str(tiny_llama), quantization="bnb-nf4", accept_gate_failure=True)
    assert type(engine.model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    assert type(engine.model.lm_head).__name__ == "Linear"  # heads stay in full precision
    assert engine.generate(["Hello"], max_new_tokens=3) is not None


def test_cli_exit_codes_and_json(tiny_bert: Path, tmp_path: Path) -> None:
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps({"body": s}) + "\n" for s in SENTENCES))
    runner = CliRunner(env={"SURESERVE_ACCEPT_GATE_FAILURE": "1"})
    ok = runner.invoke(app, ["quantize", str(tiny_bert), "--eval", str(eval_file), "--field",
                             "body", "--methods", "int8-dynamic", "--min-cosine", "0.5",
                             "--min-speedup", "0", "--json"])
    assert ok.exit_code == 0, ok.output
    rep = json.loads(ok.stdout)
    assert rep["chosen"] == "int8-dynamic" and set(rep) >= {"model", "baseline", "candidates",
                                                            "chosen", "output"}
    none = runner.invoke(app, ["quantize", str(tiny_bert), "--eval", str(eval_file), "--field",
                               "body", "--methods", "int8-dynamic", "--min-cosine", "1.01",
                               "--json"])
    assert none.exit_code == 3 and json.loads(none.stdout)["chosen"] is None
    usage = runner.invoke(app, ["quantize", str(tiny_bert), "--eval", str(eval_file),
                                "--methods", "int3"])
    # main() maps the error to its exit code; the runner sees the exception itself
    assert isinstance(usage.exception, SettingsError) and exit_code(usage.exception) == 2


def test_bare_quantization_warns_that_it_was_not_evaluated(tiny_bert: Path) -> None:
    engine = sureserve.load(str(tiny_bert), quantization="int8-weight-only",
                            accept_gate_failure=True)
    assert any("NOT EVALUATED" in w for w in engine.loaded.warnings)
    assert engine.gate_report is not None
    check = next(c for c in engine.gate_report.checks if c.name == "quantization")
    assert check.status == "warn" and "sureserve quantize" in check.fix


@pytest.mark.parametrize("chosen", ["float32", "bfloat16"])
def test_weight_only_kernels_take_the_measured_activation_dtype(
        chosen: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whichever dtype this machine measured faster (faked both ways here), the layer takes
    fp32 in and gives fp32 out; bf16 activations cost at most bf16 rounding."""
    import torch

    from sureserve.loading import kernels as K

    dt = getattr(torch, chosen)
    monkeypatch.setattr(K, "activation_dtype", lambda kind: dt)
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    x = torch.randn(4, 64)
    for layer in (K.Int8WeightOnlyLinear(lin), K.Int4WeightOnlyLinear(lin)):
        with torch.no_grad():
            got = layer(x)
        assert got.dtype == torch.float32
        if isinstance(layer, K.Int8WeightOnlyLinear):
            exact = torch.ops.aten._weight_int8pack_mm(x.to(dt), layer.weight_int8,
                                                       layer.scale.to(dt)).float() + lin.bias
            assert torch.equal(got, exact.detach())
        with torch.no_grad():
            rel = float((got - lin(x)).norm() / lin(x).norm())
        assert rel < 0.2, (chosen, type(layer).__name__, rel)


def test_activation_dtype_is_one_measured_answer_per_kind() -> None:
    import torch

    from sureserve.loading.kernels import activation_dtype

    for kind in ("int8", "int4"):
        assert activation_dtype(kind) in (torch.float32, torch.bfloat16)
        assert activation_dtype(kind) is activation_dtype(kind)  # measured once
