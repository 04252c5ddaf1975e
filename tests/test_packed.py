"""oneDNN packed linears (loading/packed.py): the packed product is F.linear up to float
rounding, falls back to F.linear whenever its copy could be stale, survives copies, and is
chosen per shape by measurement: both verdicts run on any CPU (the measurement is faked
here), and the decode step stays bit-identical to the model's forward with packing on."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from sureserve.loading import packed
from sureserve.loading.packed import PackedForward, PackPlan, choose_min_rows, plan_and_apply

pytestmark = pytest.mark.skipif(packed.why_unavailable() is not None,
                                reason=f"{packed.why_unavailable()}")
#: bfloat16 where this CPU can pack it (the refusal elsewhere is tested on every CPU below)
BF16 = pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    packed.dtype_unavailable(torch.bfloat16) is not None,
    reason=f"{packed.dtype_unavailable(torch.bfloat16)}"))
DTYPES = [torch.float32, BF16]


def _fake(monkeypatch: pytest.MonkeyPatch, faster_from: int | None) -> list[tuple[Any, ...]]:
    """Make every shape measure packed 2x faster from ``faster_from`` rows (None: never);
    returns the measurements asked for."""
    asked: list[tuple[Any, ...]] = []

    def measure(n: int, k: int, rows: int, dtype: Any, stream_bytes: int = 0
                ) -> tuple[float, float]:
        asked.append((n, k, rows, dtype))
        win = faster_from is not None and rows >= faster_from
        return (1.0 * n * k / 1e6, (0.5 if win else 2.0) * n * k / 1e6)

    monkeypatch.setattr(packed, "measure", measure)
    monkeypatch.setattr(packed, "_MEMO", {})
    return asked


def _linear(n: int = 48, k: int = 32, dtype: torch.dtype = torch.float32) -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(k, n).to(dtype)


def _packed(mod: torch.nn.Linear, min_rows: int = 1) -> torch.nn.Linear:
    mod.forward = PackedForward(mod, packed.pack(mod.weight), min_rows)  # type: ignore[method-assign]
    return mod


@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_product_is_f_linear_up_to_rounding(dtype: torch.dtype) -> None:
    mod = _linear(dtype=dtype)
    plain = copy.deepcopy(mod)
    _packed(mod)
    x = torch.randn(3, 5, 32).to(dtype)
    with torch.inference_mode():
        ref, got = F.linear(x, plain.weight, plain.bias), mod(x)
        assert mod.forward.takes(x)  # type: ignore[attr-defined]
    assert got.shape == ref.shape and got.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got.float(), ref.float(), atol=tol, rtol=tol)


def test_it_falls_back_to_f_linear_whenever_the_copy_could_be_stale() -> None:
    mod = _packed(_linear(), min_rows=4)
    fwd: PackedForward = mod.forward  # type: ignore[assignment]
    with torch.inference_mode():
        few = torch.randn(3, 32)
        assert not fwd.takes(few)  # fewer rows than the shape was packed for
        assert torch.equal(mod(few), F.linear(few, mod.weight, mod.bias))
        x = torch.randn(8, 32)
        assert fwd.takes(x) and fwd.takes_rows(8, torch.float32)
        assert not fwd.takes_rows(3, torch.float32) and not fwd.takes_rows(8, torch.bfloat16)
    # autograd on: the packed op has no backward
    x = torch.randn(8, 32, requires_grad=True)
    assert not fwd.takes(x)
    mod(x).sum().backward()
    assert x.grad is not None
    with torch.inference_mode():
        mod.weight.mul_(2)  # changed in place (its version moves): never the old copy
        x = torch.randn(8, 32)
        assert not fwd.takes(x) and torch.equal(mod(x), F.linear(x, mod.weight, mod.bias))
    with torch.inference_mode():  # weights made in inference mode keep no version counter
        made = _packed(torch.nn.Linear(32, 48))
        assert made.forward.fresh() and made.forward.takes(x)  # type: ignore[attr-defined]
    mod = _packed(_linear())
    mod.to(torch.bfloat16)  # converted (the Parameter keeps its identity, not its data)
    with torch.inference_mode():
        xb = torch.randn(8, 32).to(torch.bfloat16)
        assert torch.equal(mod(xb), F.linear(xb, mod.weight, mod.bias))


def test_copies_and_pickles_run_f_linear() -> None:
    mod = _packed(_linear())
    x = torch.randn(8, 32)
    for other in (copy.deepcopy(mod), pickle.loads(pickle.dumps(mod))):
        fwd = other.forward
        assert isinstance(fwd, PackedForward) and fwd.packed is None and fwd.module is other
        with torch.inference_mode():
            assert torch.equal(other(x), F.linear(x, other.weight, other.bias))
            assert torch.allclose(other(x), mod(x), atol=1e-5)
    assert mod.forward.packed is not None  # type: ignore[attr-defined]


def test_copy_packed_keeps_the_packed_path_of_every_layer() -> None:
    """What ``sureserve quantize`` restores a layer from: unlike a deep copy, it runs as
    the original does (packed from the same rows), on its own weight."""
    from sureserve.loading.packed import copy_packed, packed_forward

    seq = torch.nn.Sequential(_packed(_linear(), min_rows=4), torch.nn.ReLU(), _linear(32, 48))
    got = copy_packed(seq)
    fwd = packed_forward(got[0])
    assert fwd is not None and fwd.packed is not None and fwd.module is got[0]
    assert fwd.min_rows == 4 and got[0].weight is not seq[0].weight
    assert packed_forward(got[2]) is None  # a plain layer stays plain
    x = torch.randn(8, 32)
    with torch.inference_mode():
        assert fwd.takes(x) and torch.equal(got(x), seq(x))
        got[0].weight.mul_(0)  # its own weight: the original is untouched
        assert not torch.equal(got(x), seq(x))


def test_min_rows_is_where_it_wins_at_every_larger_count() -> None:
    assert choose_min_rows({1: (1.0, 2.0), 4: (1.0, 0.5), 8: (1.0, 0.5)}) == 4
    # a win at few rows after a loss at more is noise, not a regime
    assert choose_min_rows({1: (1.0, 0.5), 4: (1.0, 2.0), 8: (1.0, 0.5)}) == 8
    assert choose_min_rows({1: (1.0, 0.5), 8: (1.0, 0.99)}) is None  # within the margin
    assert choose_min_rows({1: (1.0, 0.5), 8: (1.0, 0.5)}) == 1


def _llama() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


def test_plan_packs_the_shapes_that_measured_faster(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    asked = _fake(monkeypatch, faster_from=8)
    model = _llama()
    plan = plan_and_apply(model, "cpu", tmp_path)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert plan.packed_layers == len(linears) and plan.min_rows() == 8
    assert all(isinstance(m.__dict__.get("forward"), PackedForward) for m in linears)
    assert plan.active(8) and not plan.active(4)
    assert {a[2] for a in asked} == set(packed.ROWS)
    assert "packed from 8 rows" in plan.describe()
    d = plan.to_dict()
    assert d["packed_layers"] == len(linears) and d["min_rows"] == 8
    assert all(s["packed"] for s in d["shapes"])
    assert plan_and_apply(model, "cpu", tmp_path) is plan  # once per model
    # cached per machine: another model of these shapes measures nothing again, here or
    # in another home
    asked.clear()
    plan_and_apply(_llama(), "cpu", tmp_path)
    plan_and_apply(_llama(), "cpu", tmp_path / "other")
    assert asked == []
    assert list((tmp_path / "other" / "machine").glob("packed-*.json"))
    # the packed product's time is what the decode kernel is weighed against
    assert plan.packed_ms((96, 64), "float32", 8) is not None
    assert plan.packed_ms((96, 64), "float32", 4) is None


def test_a_machine_where_packing_is_slower_keeps_f_linear(monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    _fake(monkeypatch, faster_from=None)
    model = _llama()
    plan = plan_and_apply(model, "cpu", tmp_path)
    assert plan.packed_layers == 0 and plan.min_rows() is None and not plan.active(128)
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert "F.linear (packed no faster)" in plan.describe()
    off = plan_and_apply(_llama(), "cpu", tmp_path, enabled=False)
    assert off.path == "off: packed_linear = false" and "packed_linear = false" in off.describe()
    assert plan_and_apply(_llama(), "cuda:0", tmp_path).path == "off: not a CPU"


def test_a_cpu_that_cannot_pack_bfloat16_runs_it_through_f_linear(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """torch's bfloat16 reorder raises on CPUs without AVX-512 or AVX-NE-CONVERT (an
    AVX2-only EPYC failed to load a bfloat16 model): such a CPU keeps F.linear with the
    reason, float32 models still pack, and the check is faked so both run on any CPU."""
    asked = _fake(monkeypatch, faster_from=1)
    monkeypatch.setattr(packed, "_bf16_packable", lambda: False)
    assert "AVX-512" in (packed.dtype_unavailable(torch.bfloat16) or "")
    assert packed.dtype_unavailable(torch.float32) is None
    model = _llama().to(torch.bfloat16)
    plan = plan_and_apply(model, "cpu", tmp_path)
    assert plan.path.startswith("off: oneDNN packs bfloat16 weights only") and not asked
    assert not any("forward" in m.__dict__ for m in model.modules())
    x = torch.randint(0, 300, (2, 5))
    with torch.inference_mode():
        assert model(input_ids=x).logits.dtype == torch.bfloat16  # runs, unpacked
    assert plan_and_apply(_llama(), "cpu", tmp_path).packed_layers > 0
    monkeypatch.setattr(packed, "_bf16_packable", lambda: True)
    assert packed.dtype_unavailable(torch.bfloat16) is None


def test_the_byte_bound_packs_the_largest_savings_first(monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    _fake(monkeypatch, faster_from=1)
    model = _llama()
    # lm_head (300 x 64 fp32, 76.8 kB) saves the most; the bound leaves room for it only
    plan = plan_and_apply(model, "cpu", tmp_path, max_bytes=80_000)
    assert [s.shape for s in plan.shapes if s.packed] == [(300, 64)]
    assert isinstance(model.lm_head.__dict__.get("forward"), PackedForward)
    assert "over the packed_linear_mb bound" in plan.describe()


@pytest.mark.parametrize("script", [True, False], ids=["torchscript", "python"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_step_stays_bit_identical_to_the_packed_forward(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, script: bool,
        dtype: torch.dtype) -> None:
    """Packed from 4 rows: a 3-row step runs F.linear, a 5-row step the packed copies, and
    either way the direct step computes what the model's forward does."""
    from sureserve.generation.direct import DirectDecode
    from tests.test_direct_decode import _both

    _fake(monkeypatch, faster_from=4)
    model = _llama().to(dtype)
    plan = plan_and_apply(model, "cpu", tmp_path)
    assert plan.min_rows() == 4
    step = DirectDecode(model, script, packing=plan)
    assert ("TorchScript," in step.describe()) == script
    assert "oneDNN's packed linears at 4+ rows" in step.describe()
    for lengths in ([5, 9, 3], [5, 9, 3, 4, 6]):
        ref, got, ref_k, got_k = _both(model, lengths, step=step)
        assert torch.equal(ref, got) and torch.equal(ref_k, got_k)
    # and the packed copies ran (the test would pass vacuously otherwise): in float32 they
    # change the sums (bfloat16's rounding hides it on shapes this small)
    kept = copy.deepcopy(model)  # copies run F.linear
    x = torch.randn(5, 1, 64).to(dtype)
    with torch.inference_mode():
        gate = model.model.layers[0].mlp.gate_proj
        assert gate.forward.takes(x)
        a, b = gate(x), kept.model.layers[0].mlp.gate_proj(x)
    assert a.shape == b.shape and (dtype == torch.bfloat16 or not torch.equal(a, b))


def test_the_decode_kernel_is_weighed_against_the_packed_product(tmp_path: Path) -> None:
    """Where a packed shape is faster than the kernel, the kernel does not take it."""
    from sureserve.generation import native

    model = _llama()
    kernel, why = native.build(tmp_path)
    if kernel is None:
        pytest.skip(why)
    measured = native.plan(model, "cpu", tmp_path)
    instant = PackPlan("measured", [packed.ShapePack(
        (int(m.weight.shape[0]), int(m.weight.shape[1])), "float32", 1,
        dict.fromkeys(packed.ROWS, (1.0, 1e-9)), 1, packed=True)
        for m in model.modules() if isinstance(m, torch.nn.Linear)])
    weighed = native.plan(model, "cpu", tmp_path, packing=instant)
    assert weighed.max_rows == 0 and "no faster than oneDNN's packed linears" in weighed.reason
    assert all(ms[0] < 1e-3 for ms in weighed.step_ms.values())
    assert measured.step_ms[1][0] > weighed.step_ms[1][0]


def _bert(act: str = "gelu") -> Any:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, hidden_act=act)
    return BertModel(cfg).eval()


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_feed_forward_gelu_runs_inside_the_packed_product_bit_for_bit(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, dtype: torch.dtype) -> None:
    _fake(monkeypatch, faster_from=1)
    model = _bert().to(dtype)
    plan = plan_and_apply(model, "cpu", tmp_path)
    blocks = [m for m in model.modules() if type(m).__name__ == "BertIntermediate"]
    fused = [m for m in blocks if isinstance(m.__dict__.get("forward"), packed.FusedGelu)]
    # fused only where a probe through the block's own forward agreed bit for bit (checked
    # at load: whether oneDNN's post-op rounds like torch's GELU is the CPU's and dtype's
    # business; measured here, float32 agreed and bfloat16, rounded once instead of twice,
    # did not)
    assert plan.fused_gelu == len(fused) and plan.to_dict()["fused_gelu"] == len(fused)
    assert len(fused) in (0, len(blocks)) and len(blocks) == 2
    assert ("GELU fused into 2" in plan.describe()) == bool(fused)
    # the fused op itself, on any CPU: the GELU of the packed product up to rounding
    x = torch.randn(5, 32).to(dtype)
    with torch.inference_mode():
        ref = F.gelu(blocks[0].dense(x).float())
        got = packed.FusedGelu(blocks[0])(x).float()
    assert torch.allclose(got, ref, atol=1e-5 if dtype == torch.float32 else 3e-2)
    ids = torch.randint(0, 64, (3, 9))
    with torch.inference_mode():
        got = model(input_ids=ids).last_hidden_state
        for m in fused:
            del m.forward  # the packed product, then the GELU on its own
        want = model(input_ids=ids).last_hidden_state
    assert torch.equal(got, want)


def test_gelu_fusion_needs_the_exact_gelu_and_a_packed_layer_and_copies_fall_back(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _fake(monkeypatch, faster_from=1)
    tanh = _bert("gelu_new")  # the tanh approximation: another function, never fused
    assert plan_and_apply(tanh, "cpu", tmp_path).fused_gelu == 0
    _fake(monkeypatch, faster_from=None)
    unpacked = _bert()
    assert plan_and_apply(unpacked, "cpu", tmp_path / "slow").fused_gelu == 0
    _fake(monkeypatch, faster_from=1)
    model = _bert()
    if plan_and_apply(model, "cpu", tmp_path).fused_gelu == 0:
        pytest.skip("oneDNN's GELU post-op does not round like torch's GELU on this CPU")
    ids = torch.randint(0, 64, (2, 7))
    with torch.inference_mode():
        want = model(input_ids=ids).last_hidden_state
    # a deep copy runs the block's own forward through F.linear; copy_packed re-packs and
    # the fused block follows its copied layer
    for other, repacked in ((copy.deepcopy(model), False),
                            (pickle.loads(pickle.dumps(model)), False),
                            (packed.copy_packed(model), True)):
        block = next(m for m in other.modules() if type(m).__name__ == "BertIntermediate")
        assert isinstance(block.__dict__["forward"], packed.FusedGelu)
        layer = packed.packed_forward(block.dense)
        assert layer is not None and layer.fresh() == repacked
        assert layer.module is block.dense  # the copy's own layer, not the original's
        with torch.inference_mode():
            got = other(input_ids=ids).last_hidden_state
        assert torch.allclose(got, want, atol=1e-5)
