"""sureserve's GEMV kernel for decode steps (generation/native.py, gemv.c): it computes
``F.linear`` (to float32 rounding) for every shape and row count a decode step gives it,
the direct step through it gives the forward's logits to rounding and the same greedy
tokens, the plan follows what was measured (whatever this machine measured), and a machine
that cannot build it decodes through torch's kernels and says why."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from sureserve.generation import native
from sureserve.generation.direct import DirectDecode, plan
from tests.test_direct_decode import _both, _model


@pytest.fixture(scope="module")
def gemv(tmp_path_factory: pytest.TempPathFactory) -> native.Gemv:
    kernel, why = native.build(tmp_path_factory.mktemp("home"))
    if kernel is None:  # a machine without a C compiler: the fallback test below covers it
        pytest.skip(f"the GEMV kernel is unavailable here: {why}")
    assert kernel.isa in ("avx512", "avx2", "scalar")
    return kernel


def forced(model: Any, kernel: native.Gemv, rows: int = 16) -> native.KernelPlan:
    """A plan that sends every linear layer the kernel reads (float32 or int8 weight-only)
    through it, whatever this machine measured (so that the kernel's path is tested on
    every CPU)."""
    shapes = {native.shape_key(got[0]): rows
              for got in map(native.weights_of, model.modules()) if got is not None}
    return native.KernelPlan(kernel, rows, "", {1: (2.0, 1.0)}, shapes)


def int8_model(model: Any, head: bool = False) -> tuple[Any, Any]:
    """(``model`` with every decoder linear layer int8 weight-only, lm_head too with
    ``head`` (``int8-weight-only-head``), else kept as ``sureserve quantize`` keeps heads;
    a float32 copy holding the dequantized weights, whose forward is what the kernel must
    compute)."""
    import copy

    from sureserve.loading.kernels import Int8WeightOnlyLinear

    if head:
        model.lm_head = Int8WeightOnlyLinear(model.lm_head)
    for layer in model.model.layers:
        for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                              (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                setattr(parent, name, Int8WeightOnlyLinear(getattr(parent, name)))
    deq = copy.deepcopy(model)
    for name, m in list(deq.named_modules()):
        if isinstance(m, Int8WeightOnlyLinear):
            lin = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(m.weight_int8.float() * m.scale[:, None])
                if m.bias is not None:
                    lin.bias.copy_(m.bias)
            deq.set_submodule(name, lin)
    return model, deq


def q8(n: int, k: int, bias: bool = True) -> tuple[Any, torch.Tensor, native.Linear]:
    """An int8 weight-only layer, its dequantized float32 weight and its kernel structure."""
    from sureserve.loading.kernels import Int8WeightOnlyLinear

    layer = Int8WeightOnlyLinear(torch.nn.Linear(k, n, bias=bias))
    st = native.linear_struct(layer)
    assert st is not None
    return layer, layer.weight_int8.float() * layer.scale[:, None], st


@pytest.mark.parametrize("n,k", [(576, 576), (49, 33), (7, 16), (40, 100), (1, 5)])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_the_kernel_is_f_linear(gemv: native.Gemv, m: int, n: int, k: int) -> None:
    """Row counts, widths that are not a multiple of the vector width or of the block of
    rows, with and without a bias, 2-D and (rows, 1, k) inputs as a decode step gives."""
    torch.manual_seed(n * 7 + k)
    w, b, x = torch.randn(n, k), torch.randn(n), torch.randn(m, 1, k)
    for bias in (None, b):
        assert gemv.accepts(x, w, bias)
        got = gemv(x, w, bias)
        assert got.shape == (m, 1, n) and got.dtype == torch.float32
        torch.testing.assert_close(got, F.linear(x, w, bias), rtol=1e-4, atol=1e-4)
    flat = gemv(x[:, 0], w, b)
    torch.testing.assert_close(flat, F.linear(x[:, 0], w, b), rtol=1e-4, atol=1e-4)
    # a non-contiguous input is made contiguous first (the weight must be: see accepts)
    wide = torch.randn(m, 2 * k)[:, ::2]
    torch.testing.assert_close(gemv(wide, w), F.linear(wide, w), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n,k", [(576, 576), (49, 33), (96, 1536)])
def test_float32_rows_do_not_depend_on_how_many_rows_ran_together(gemv: native.Gemv, n: int,
                                                                   k: int) -> None:
    """A few rows read W one row after another, more rows take register tiles: both add a
    row's products in the same order, so a row's float32 result is bit-identical whether it
    ran alone, with a few others or in a batch (a request's tokens do not change with the
    company it decodes in)."""
    torch.manual_seed(n + 3 * k)
    w, b, x = torch.randn(n, k), torch.randn(n), torch.randn(12, k)
    alone = torch.cat([gemv(x[i:i + 1], w, b) for i in range(12)])
    for m in (2, 3, 4, 5, 8, 12):
        assert torch.equal(gemv(x[:m], w, b), alone[:m]), m


@pytest.mark.parametrize("n,k", [(576, 576), (49, 33), (7, 16), (40, 100), (1, 5), (96, 1536)])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_int8_weights_are_their_dequantized_product(gemv: native.Gemv, m: int, n: int,
                                                     k: int) -> None:
    """int8 weight-only layers (one scale per output row), widened in registers: the
    product of the dequantized weights to float32 rounding (activations are not rounded),
    with a bias and with a residual."""
    torch.manual_seed(n + k)
    for bias in (True, False):
        layer, w, st = q8(n, k, bias)
        x, res = torch.randn(m, 1, k), torch.randn(m, 1, n)
        want = F.linear(x, w, layer.bias)
        torch.testing.assert_close(gemv.linear(x, st), want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(gemv.linear(x, st, res), want + res, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n,k", [(576, 576), (49, 33), (1, 5), (300, 130)])
def test_int8_products_that_widen_panels_are_their_dequantized_product(
        gemv: native.Gemv, n: int, k: int) -> None:
    """A prompt's int8 product (``pmin`` set: each panel of columns widened to float32 as
    the product goes) is ``F.linear`` of the dequantized weights, with a bias and with a
    residual, where the outputs leave a partial panel and the inner size is not a multiple
    of the four bytes read at a time; a row's result is bit-identical whatever rows ran with
    it (a prompt's keys do not depend on its chunking or its group)."""
    torch.manual_seed(n + 5 * k)
    layer, w, st = q8(n, k)
    st.pmin = 1
    x, res = torch.randn(45, k), torch.randn(45, n)
    want = F.linear(x, w, layer.bias)
    whole = gemv.linear(x, st)
    torch.testing.assert_close(whole, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gemv.linear(x, st, res), want + res, rtol=1e-4, atol=1e-4)
    for rows in (1, 2, 5, 6, 7, 8, 13):
        assert torch.equal(gemv.linear(x[:rows], st), whole[:rows]), rows
        assert torch.equal(gemv.linear(x[rows:rows + 9], st), whole[rows:rows + 9]), rows


def test_it_refuses_what_it_cannot_take(gemv: native.Gemv) -> None:
    w, x = torch.randn(8, 4), torch.randn(2, 4)
    assert gemv.accepts(x, w, None)
    assert not gemv.accepts(x.bfloat16(), w.bfloat16(), None)
    assert not gemv.accepts(x, w.t().contiguous().t(), None)  # column-major weight
    assert not gemv.accepts(torch.randn(2, 5), w, None)
    assert not gemv.accepts(x, w, torch.randn(8).double())
    # what the kernel's structures are made from: float32 or int8 weight-only layers only
    assert native.weights_of(torch.nn.Linear(4, 8)) is not None
    assert native.weights_of(torch.nn.Linear(4, 8).bfloat16()) is None
    assert native.weights_of(torch.nn.Conv1d(4, 8, 1)) is None
    layer, _, _ = q8(8, 4)
    got = native.weights_of(layer)
    assert got is not None and got[0].dtype == torch.int8 and got[1] is not None
    assert native.shape_key(got[0]) == (8, 4, "int8")
    assert native.shape_key(torch.nn.Linear(4, 8).weight) == (8, 4)


def _mlp_bias_llama() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.test_direct_decode import COMMON

    torch.manual_seed(0)
    cfg = LlamaConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2, mlp_bias=True)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).eval()
    for layer in model.model.layers:
        torch.nn.init.normal_(layer.mlp.down_proj.bias, std=0.5)
    return model


@pytest.mark.parametrize("kind", ["llama", "qwen2", "llama-mlp-bias"])
@pytest.mark.parametrize("lengths", [[5, 9, 3], [6], [70, 2]],
                         ids=["padded", "one-row", "blocks"])
@pytest.mark.parametrize("whole", [True, False], ids=["one-call", "per-layer"])
def test_the_direct_step_through_the_kernel_matches_the_forward(
        gemv: native.Gemv, kind: str, lengths: list[int], whole: bool) -> None:
    """Logits within float32 rounding of the model's forward and the same keys written.
    One call of the kernel runs the whole step (every layer, the attention over the cache
    in blocks of columns with a running maximum, lm_head); with that off, a Llama layer runs
    as the kernel's three fused calls (qwen2: with the q/k/v biases), and a layer those do
    not cover (MLP biases) takes the kernel one linear layer at a time."""
    model = _mlp_bias_llama() if kind == "llama-mlp-bias" else _model(kind)
    fused, wholes = [], []
    real, real_whole = DirectDecode._fusable, DirectDecode._whole

    def spy(self: Any, *args: Any) -> bool:
        fused.append(real(self, *args))
        return fused[-1]

    def spy_whole(self: Any, *args: Any) -> Any:
        wholes.append(real_whole(self, *args))
        return wholes[-1]

    step = DirectDecode(model, kernel=forced(model, gemv), whole=whole)
    assert "sureserve's GEMV kernel" in step.describe()
    assert ("each step one call of the kernel" in step.describe()) == whole
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DirectDecode, "_fusable", spy)
        mp.setattr(DirectDecode, "_whole", spy_whole)
        ref, got, ref_k, got_k = _both(model, lengths, step=step)
    if whole:
        assert len(wholes) == 1 and wholes[0] is not None and fused == []
    else:
        assert wholes == [None] and fused == [kind != "llama-mlp-bias"] * 2  # two layers
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_k, ref_k, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("lengths", [[5, 9, 3], [6]], ids=["padded", "one-row"])
@pytest.mark.parametrize("whole", [True, False], ids=["one-call", "per-layer"])
@pytest.mark.parametrize("head", [False, True], ids=["fp32-head", "int8-head"])
@pytest.mark.parametrize("widen", [0, 1], ids=["row-major", "widened"])
def test_an_int8_weight_only_model_decodes_through_the_kernel(
        gemv: native.Gemv, lengths: list[int], whole: bool, head: bool, widen: int) -> None:
    """An int8 weight-only model (what ``sureserve quantize`` makes; lm_head in int8 too
    with ``int8-weight-only-head``) decodes through the kernel reading its int8 weights,
    row-major or widened into panels as the products go: logits and keys are the forward of
    the dequantized float32 model to float32 rounding (torch's own int8 path rounds
    activations to bf16, which this does not), and greedy tokens are the same."""
    model, deq = int8_model(_model("qwen2"), head)
    if widen and gemv.panel_width:  # products widen int8 panels as they go, from one row
        got = [g for g in map(native.weights_of, model.modules()) if g is not None]
        native._give_widen(model, {native.shape_key(g[0]): widen for g in got
                                   if g[1] is not None})
        assert native.widen_of(model.model.layers[0].mlp.down_proj) == widen
    plan_ = forced(model, gemv)
    assert (96, 64, "int8") in plan_.shape_rows
    assert ((300, 64, "int8") in plan_.shape_rows) == head
    step = DirectDecode(model, kernel=plan_, whole=whole)
    ref, got, ref_k, got_k = _both(deq, lengths, step=step)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_k, ref_k, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    assert (step._prep is not None and step._prep.ok) == whole
    if whole:
        assert step._prep.head is not None and bool(step._prep.head.scale) == head
        assert step._prep.layers[0].down.pmin == (widen if gemv.panel_width else 0)


def test_the_whole_step_follows_swapped_layers(gemv: native.Gemv) -> None:
    """``sureserve quantize`` swaps layers of a live model: the one-call step is made again
    for the new layers (an int8 layer read as int8, even one whose shape the plan has no
    figure for: the step as a whole was measured); a layer the kernel cannot read (4-bit)
    sends the step back to the layer loop, where that layer runs as a module."""
    from sureserve.loading.kernels import Int4WeightOnlyLinear, Int8WeightOnlyLinear

    model = _model("llama")
    step = DirectDecode(model, kernel=forced(model, gemv))
    _, got, _, _ = _both(model, [4, 6], step=step)
    first = step._prep
    assert first is not None and first.ok and first.head_rows == {2: True}
    mlp = model.model.layers[1].mlp
    down = mlp.down_proj
    mlp.down_proj = Int4WeightOnlyLinear(down)
    ref, got, _, _ = _both(model, [4, 6], step=step)
    assert step._prep is not first and not step._prep.ok and "neither" in step._prep.why
    assert "in the Python loop (a linear layer is neither" in step.describe()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    mlp.down_proj = Int8WeightOnlyLinear(down)  # int8 64x96: no figure in the plan
    ref, got, _, _ = _both(model, [4, 6], step=step)
    assert step._prep is not None and step._prep.ok
    # the forward rounds the int8 layer's activations to bf16 where faster; the kernel not
    torch.testing.assert_close(got, ref, rtol=3e-2, atol=3e-2)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_a_final_norm_of_another_epsilon_runs_outside_the_call(gemv: native.Gemv) -> None:
    """The call takes one RMSNorm epsilon: with the final norm's different, the layers run
    in the call and the final norm and lm_head after it, with the same logits."""
    model = _model("llama")
    model.model.norm.variance_epsilon = 1e-2
    step = DirectDecode(model, kernel=forced(model, gemv))
    ref, got, _, _ = _both(model, [5, 9, 3], step=step)
    assert step._prep is not None and step._prep.ok and step._prep.head is None
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_steps_above_the_planned_rows_keep_torchs_kernels(gemv: native.Gemv) -> None:
    """Above max_rows the step is the bit-identical TorchScript one; a shape planned for
    fewer rows than the step has goes through F.linear."""
    model = _model("llama")
    plan_ = forced(model, gemv, rows=1)
    step = DirectDecode(model, kernel=plan_)
    assert plan_.active(1) and not plan_.active(2)
    w = model.lm_head.weight
    assert plan_.takes(w, 1) and not plan_.takes(w, 2)
    plan_.shape_rows[(int(w.shape[0]), int(w.shape[1]))] = 0
    assert not plan_.takes(w, 1)
    ref, got, _, _ = _both(model, [4, 6], step=step)  # two rows > max_rows 1
    assert torch.equal(ref, got)


def test_the_plan_follows_the_measurement(monkeypatch: pytest.MonkeyPatch,
                                          gemv: native.Gemv, tmp_path: Path) -> None:
    """Faked timings (the choice must not depend on this CPU): the kernel serves the longest
    run of row counts from one where the step's matmuls gain STEP_GAIN, each shape up to
    where it won; a kernel slower everywhere is not used, with the figures."""
    model = _model("llama")  # shapes: 64x64 (q, o), 32x64 (k, v), 96x64, 64x96, 300x64
    timings = {1: (1.0, 0.4), 4: (1.0, 0.5), 8: (1.0, 1.0), 16: (1.0, 2.0), 32: (1.0, 2.0)}

    def fake(home: Any, kernel: Any, key: tuple[Any, ...], rows: int
             ) -> tuple[float, float, float | None]:
        a, b = timings.get(rows, (1.0, 0.5))  # (128: an int8 model's prompt rows)
        if key == (300, 64) and rows == 8:
            b = 0.5  # the head still wins at 8 rows
        return a, b, None  # (no panels: test_panels_follow_the_measurement)

    monkeypatch.setattr(native, "_measured", fake)
    got = native.plan(model, "cpu", tmp_path)
    assert got.max_rows == 4 and got.reason == ""
    assert got.shape_rows[(300, 64)] == 8 and got.shape_rows[(64, 64)] == 4
    assert got.step_ms[1][0] > got.step_ms[1][1] * native.STEP_GAIN
    assert "for steps of up to 4 rows" in got.describe()
    assert got.to_dict()["shape_rows"]["300x64"] == 8
    timings.update({1: (1.0, 1.1), 4: (1.0, 0.5)})  # slower at one row: not used at all
    slow = native.plan(model, "cpu", tmp_path)
    assert slow.max_rows == 0 and "no faster than F.linear here" in slow.reason
    assert "torch's matmul kernels (no faster than F.linear" in slow.describe()
    assert DirectDecode(model, kernel=slow).kernel is None
    # an int8 weight-only model: its int8 shapes are measured as such, and in float32 too
    # (a layer may be swapped back); lm_head stays float32
    timings.update({1: (1.0, 0.4)})
    q = native.plan(int8_model(_model("llama"))[0], "cpu", tmp_path)
    assert q.max_rows == 4 and q.shape_rows[(96, 64, "int8")] == 4
    assert q.shape_rows[(300, 64)] == 8 and (96, 64) in q.shape_rows
    assert q.to_dict()["shape_rows"]["96x64:int8"] == 4
    # a step gain under STEP_GAIN but over MIN_GAIN: a float32 model keeps its TorchScript
    # loop there, an int8 one (Python loop either way) takes the kernel
    timings.update({8: (1.1, 1.0), 16: (2.0, 2.0)})
    assert native.plan(model, "cpu", tmp_path).max_rows == 4
    assert native.plan(int8_model(_model("llama"))[0], "cpu", tmp_path).max_rows == 8


def test_without_a_compiler_decoding_keeps_torchs_kernels_and_says_why(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(native, "_BUILT", {})
    got = native.plan(_model("llama"), "cpu", tmp_path)
    assert got.kernel is None and "does not run" in got.reason
    assert got.describe().startswith("torch's matmul kernels (the C compiler")
    step = plan(_model("llama"), kernel=got)
    assert step.direct is not None and step.direct.kernel is None
    assert "TorchScript, bit-identical" in step.describe()
    assert native.plan(_model("llama"), "cpu", tmp_path, enabled=False).reason == \
        "decode_kernel is off"
    assert "another dtype" in native.plan(_model("llama", dtype=torch.bfloat16), "cpu",
                                          tmp_path).reason


def test_the_measurement_is_cached_per_machine(gemv: native.Gemv, tmp_path: Path) -> None:
    a = native._measured(tmp_path, gemv, (64, 32), 1)
    assert a[0] > 0 and a[1] > 0
    assert native._measured(tmp_path, gemv, (64, 32), 1) == a  # read back, not re-measured
    q = native._measured(tmp_path, gemv, (64, 32, "int8"), 1)  # against torch's int8 path
    assert q[0] > 0 and q[1] > 0 and q != a
    assert native._measured(tmp_path, gemv, (64, 32, "int8"), 1) == q
    assert list((tmp_path / "machine").glob(f"gemv-{gemv.key}-*.json"))


def paneled(model: Any, kernel: native.Gemv, rows: int = 1) -> Any:
    """``model`` with every float32 linear layer given panels read from ``rows`` rows (as
    ``plan`` gives them where they measured no slower)."""
    shapes = {native.shape_key(got[0]): rows for got in map(native.weights_of, model.modules())
              if got is not None and got[1] is None}
    native._give_panels(model, kernel, shapes)
    return model


@pytest.mark.parametrize("n,k", [(576, 576), (49, 33), (40, 100), (1, 5), (300, 64)])
def test_panels_are_f_linear_and_rows_do_not_depend_on_their_company(
        gemv: native.Gemv, n: int, k: int) -> None:
    """Panels (widths that are not a multiple of the panel or the vector, row counts past a
    tile): F.linear to float32 rounding, and each row's result bit for bit the same whatever
    the number of rows computed with it (one FMA chain per output); below ``pmin`` rows the
    row-major path runs."""
    if not gemv.panel_width:
        pytest.skip("this build has no vector unit: no panels")
    torch.manual_seed(0)
    w, b, res = torch.randn(n, k), torch.randn(n), torch.randn(37, n)
    x = torch.randn(37, k)
    held = native.Panels(w, gemv.pack_panels(w), 1)
    st = native.struct_of((w, None, b), held)
    assert held.panels.numel() == -(-n // gemv.panel_width) * gemv.panel_width * k
    alone = gemv.linear(x, st)
    torch.testing.assert_close(alone, F.linear(x, w, b), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gemv.linear(x, st, res), F.linear(x, w, b) + res, rtol=1e-4,
                               atol=1e-4)
    for m in (1, 2, 7, 8, 9, 16, 33):
        assert torch.equal(gemv.linear(x[:m], st), alone[:m]), m
        assert torch.equal(gemv.linear(x[m:m + 1], st), alone[m:m + 1]), m
    st.pmin = 8  # fewer rows: the row-major weights
    assert torch.equal(gemv.linear(x[:7], st), gemv(x[:7], w, b))
    assert torch.equal(gemv.linear(x[:8], st), alone[:8])


def test_stale_panels_are_never_read(gemv: native.Gemv) -> None:
    """Panels belong to the weight they were made from: a weight changed in place, swapped
    or converted runs the row-major path; a copy or a pickle of the layer carries none."""
    import copy
    import pickle

    if not gemv.panel_width:
        pytest.skip("this build has no vector unit: no panels")
    layer = torch.nn.Linear(40, 24)
    native._give_panels(layer, gemv, {(24, 40): 1})
    st = native.linear_struct(layer)
    assert native.panels_of(layer) is not None and st is not None and st.p and st.pmin == 1
    assert native.panels_of(copy.deepcopy(layer)) is None
    assert native.panels_of(pickle.loads(pickle.dumps(layer))) is None
    with torch.no_grad():
        layer.weight.mul_(2)  # in place: the panels hold the old values
    assert native.panels_of(layer) is None
    st = native.linear_struct(layer)
    assert st is not None and not st.p
    x = torch.randn(3, 40)
    torch.testing.assert_close(gemv.linear(x, st), layer(x), rtol=1e-4, atol=1e-4)
    native._give_panels(layer, gemv, {(24, 40): 1})
    assert native.panels_of(layer) is not None
    layer.weight = torch.nn.Parameter(torch.randn(24, 40))  # swapped
    assert native.panels_of(layer) is None
    with torch.inference_mode():  # weights made in inference mode keep no version counter
        made = torch.nn.Linear(40, 24)
    native._give_panels(made, gemv, {(24, 40): 1})
    assert made.weight.is_inference() and native.panels_of(made) is not None


@pytest.mark.parametrize("whole", [True, False])
def test_the_direct_step_reads_panels_and_follows_in_place_changes(
        gemv: native.Gemv, whole: bool) -> None:
    """The whole-step call and the fused calls of the Python loop read the layers' panels
    and give the forward's logits; a weight changed in place afterwards is read row-major
    (the step's structures are made again), never through the stale panels."""
    if not gemv.panel_width:
        pytest.skip("this build has no vector unit: no panels")
    model = paneled(_model("llama"), gemv)
    step = DirectDecode(model, kernel=forced(model, gemv, rows=16), whole=whole)
    ref, got, ref_k, got_k = _both(model, [5, 40, 3, 9, 9, 1, 12, 30], step=step)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_k, ref_k, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    if whole:
        prep = step._prep
        assert prep is not None and prep.ok and prep.layers[0].q.p and prep.head.p
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(-1)
    ref, got, _, _ = _both(model, [5, 40, 3], step=step)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    if whole:
        assert step._prep is not prep and not step._prep.layers[0].down.p
        assert step._prep.layers[0].up.p


def test_panels_follow_the_measurement(monkeypatch: pytest.MonkeyPatch, gemv: native.Gemv,
                                       tmp_path: Path) -> None:
    """Faked timings: a shape reads panels from the smallest row count from which they
    measured no slower than its row-major weights at every larger one; the shapes that save
    the most go first within the byte bound, the rest keep row-major weights (said in the
    plan); none are made when the bound is 0 or the kernel does not run."""
    model = _model("llama")  # 64x64 (q, o), 32x64 (k, v), 96x64, 64x96, 300x64 (+ 2 layers)

    def fake(home: Any, kernel: Any, key: tuple[Any, ...], rows: int
             ) -> tuple[float, float, float | None]:
        panel = {1: 0.5, 4: 0.5, 8: 0.5, 16: 0.5, 32: 0.5, 128: 0.5}[rows]
        if key == (64, 96) and rows == 1:
            panel = 0.9  # the down projection: slower than row-major at one row
        if key == (32, 64):
            panel = 2.0  # k and v: never faster
        return 2.0, 0.5 if rows < 8 else 1.5, panel

    monkeypatch.setattr(native, "_measured", fake)
    got = native.plan(model, "cpu", tmp_path, panel_bytes=2**30)
    assert got.max_rows == 32
    assert got.panel_rows == {(64, 64): 1, (96, 64): 1, (64, 96): 4, (300, 64): 1}
    assert native.panels_of(model.model.layers[1].mlp.down_proj).min_rows == 4
    assert native.panels_of(model.model.layers[0].self_attn.k_proj) is None
    made = {id(p.panels): p.panels.numel() * 4 for p in map(native.panels_of, model.modules())
            if p is not None}
    assert got.panel_mb == pytest.approx(sum(made.values()) / 2**20)
    assert "panels" in got.describe() and got.to_dict()["panel_rows"]["300x64"] == 1
    # the bound holds q and o only (the most time saved a step: 4 matrices)
    small = native.plan(_model("llama"), "cpu", tmp_path, panel_bytes=4 * 64 * 64 * 4)
    assert small.panel_rows == {(64, 64): 1} and "decode_panels_mb bound" in small.panel_why
    assert "300x64" in small.panel_why
    off = native.plan(m := _model("llama"), "cpu", tmp_path, panel_bytes=0)
    assert off.panel_rows == {} and "decode_panels_mb is 0" in off.panel_why
    assert native.panels_of(m.lm_head) is None
    # a kernel that ends up unused: the decode plan frees the panels
    monkeypatch.setattr(native, "_measured", lambda *a: (1.0, 2.0, 2.0))
    unused = native.plan(m, "cpu", tmp_path, panel_bytes=2**30)
    assert unused.max_rows == 0 and native.panels_of(m.lm_head) is not None
    assert plan(m, kernel=unused, calibrate=False).direct is not None
    assert unused.panel_rows == {} and native.panels_of(m.lm_head) is None


def test_prompts_read_the_panels_where_they_measured_faster(
        monkeypatch: pytest.MonkeyPatch, gemv: native.Gemv, tmp_path: Path) -> None:
    """Faked timings: a shape whose panels beat torch's product at every prompt row count
    gets a ``PromptPanels`` forward (one that lost at 128 rows does not; nor does a shape
    without panels). Inside ``prompt_panels`` it is the kernel over the panels at any row
    count (Qwen2's biases included), outside and on other threads exactly the layer's
    ``F.linear``; a copy or a pickle carries a plain forward; the forward of the whole
    model stays within rounding; freeing the panels restores every layer's forward."""
    import copy
    import pickle
    import threading

    if not gemv.panel_width:
        pytest.skip("this build has no vector unit: no panels")
    model = _model("qwen2")  # 64x64 (q, o), 32x64 (k, v), 96x64, 64x96, 300x64

    def fake(home: Any, kernel: Any, key: tuple[Any, ...], rows: int
             ) -> tuple[float, float, float | None]:
        if key == (32, 64):
            return 2.0, 0.5, 3.0  # k and v: panels never faster (so none are made)
        if key == (96, 64) and rows == 128:
            return 2.0, 1.5, 2.5  # gate and up: the panels lose at a prefill's rows
        return 2.0, 1.5 if rows > 4 else 0.5, 0.5

    monkeypatch.setattr(native, "_measured", fake)
    got = native.plan(model, "cpu", tmp_path, panel_bytes=2**30)
    assert set(got.prompt_ms) == {(64, 64), (96, 64), (64, 96), (300, 64)}
    assert got.prompt_ms[(96, 64)] == {32: (2.0, 0.5), 128: (2.0, 2.5)}
    assert sorted(got.prompt_shapes) == [(64, 64), (64, 96), (300, 64)]
    assert "prompts' products read the panels too (3 of 4 shapes, 4.00x at 32, 4.00x at " \
        "128 rows)" in got.describe()
    assert got.to_dict()["prompt_shapes"] == ["64x64", "64x96", "300x64"]
    # the plan's test above left this build's panels alone: ``plan`` made them here
    assert native.give_prompt_panels(model, got) == 2 * 3 + 1  # q, o, down; lm_head
    q = model.model.layers[0].self_attn.q_proj
    up = model.model.layers[0].mlp.up_proj
    assert isinstance(q.forward, native.PromptPanels)
    assert "forward" not in up.__dict__
    panels = native.panels_of(q)
    assert panels is not None
    torch.manual_seed(3)
    ref = model.model.layers[0].self_attn.k_proj  # a layer with a bias but no panels
    assert "forward" not in ref.__dict__
    for rows in (1, 7, 40, 130):
        x = torch.randn(1, rows, 64)
        st = native.struct_of(native.weights_of(q), panels)  # type: ignore[arg-type]
        st.pmin = 1
        want = gemv.linear(x, st)
        with torch.inference_mode():
            assert torch.equal(q(x), F.linear(x, q.weight, q.bias))  # outside: as before
            with native.prompt_panels():
                assert torch.equal(q(x), want)
                other: list[torch.Tensor] = []
                t = threading.Thread(target=lambda o=other, x=x: o.append(q(x)))
                t.start()
                t.join()
                assert torch.equal(other[0], F.linear(x, q.weight, q.bias))
        torch.testing.assert_close(want, F.linear(x, q.weight, q.bias), rtol=1e-5,
                                   atol=1e-5)
    ids = torch.randint(0, model.config.vocab_size, (2, 50))
    calls: list[int] = []
    through = gemv.linear
    monkeypatch.setattr(gemv, "linear", lambda x, st, res=None: calls.append(1) or
                        through(x, st, res))
    with torch.inference_mode():
        plain = model(input_ids=ids).logits
        assert not calls
        with native.prompt_panels():
            fast = model(input_ids=ids).logits
    assert len(calls) == 7  # q, o and down of both layers, and lm_head
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)
    for other_model in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        fwd = other_model.model.layers[0].self_attn.q_proj.forward
        assert not isinstance(fwd, native.PromptPanels) and fwd.packed is None
        with torch.inference_mode(), native.prompt_panels():
            assert torch.equal(other_model(input_ids=ids).logits, plain)
    native.drop_panels(model, got)
    assert not any(isinstance(m.__dict__.get("forward"), native.PromptPanels)
                   for m in model.modules())
    assert "forward" not in q.__dict__ and got.prompt_ms == {}
    assert "prompts'" not in got.describe()


def test_int8_prompts_go_through_the_kernel_where_it_measured_faster(
        monkeypatch: pytest.MonkeyPatch, gemv: native.Gemv, tmp_path: Path) -> None:
    """An int8 weight-only model (``sureserve quantize``'s): each int8 shape is timed at the
    prompt row counts too (the product that widens panels as it goes against the layer's
    own forward), and the shapes that won at both read it inside ``prompt_panels`` (one
    that lost at 128 rows keeps the layer's own forward); where widening won at decode row
    counts, the layers' structures widen from there (``widen_rows``). Outside the context,
    and on another thread, a layer is exactly its own forward; inside, the kernel's
    product, and the model's logits are the dequantized float32 model's within bf16
    rounding. Copies and pickles carry the layer's own forward; a kernel unused for decode
    steps keeps the prompts'."""
    import copy
    import pickle
    import threading

    from sureserve.loading.kernels import Int8WeightOnlyLinear

    if not gemv.panel_width:
        pytest.skip("this build has no vector unit: no panels")
    model, deq = int8_model(_model("qwen2"), head=True)
    asked: list[tuple[Any, ...]] = []

    def fake(home: Any, kernel: Any, key: tuple[Any, ...], rows: int
             ) -> tuple[float, float, float | None]:
        if len(key) > 2:
            asked.append((key, rows))
            if key == (96, 64, "int8") and rows == 128:
                return 2.0, float("inf"), 3.0  # widening loses to torch at 128 rows
            return 2.0, 1.5 if rows >= 4 else 0.5, 1.0  # widening wins from 4 rows
        return 2.0, 1.0, None

    monkeypatch.setattr(native, "_measured", fake)
    got = native.plan(model, "cpu", tmp_path, panel_bytes=2**30)
    int8 = {(64, 64, "int8"), (32, 64, "int8"), (96, 64, "int8"), (64, 96, "int8"),
            (300, 64, "int8")}
    assert {k for k, r in asked if r == 128} == int8 and set(got.prompt_ms) == int8
    assert sorted(got.prompt_shapes) == sorted(int8 - {(96, 64, "int8")})
    assert got.widen_rows == dict.fromkeys(int8, 4)
    assert "int8 weights widened into panels as products go, from 4 rows (5 shapes)" in \
        got.describe() and got.to_dict()["widen_rows"]["300x64:int8"] == 4
    assert native.widen_of(model.lm_head) == 4 and native.linear_struct(model.lm_head).pmin == 4
    assert "int8 prompts' products through the kernel too (4 of 5 shapes, 2.00x at 32, " \
        "2.00x at 128 rows)" in got.describe()
    assert native.give_prompt_panels(model, got) == 2 * 5 + 1  # q, k, v, o, down; lm_head
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, Int8WeightOnlyLinear) and isinstance(q.forward, native.PromptInt8)
    assert "forward" not in model.model.layers[0].mlp.up_proj.__dict__
    torch.manual_seed(5)
    for rows in (1, 7, 40):
        x = torch.randn(1, rows, 64)
        own = Int8WeightOnlyLinear.forward(q, x)
        st = native.linear_struct(q)
        assert st is not None
        st.pmin = 1
        with torch.inference_mode():
            assert torch.equal(q(x), own)
            with native.prompt_panels():
                assert torch.equal(q(x), gemv.linear(x, st))
                other: list[torch.Tensor] = []
                t = threading.Thread(target=lambda o=other, x=x: o.append(q(x)))
                t.start()
                t.join()
                assert torch.equal(other[0], own)
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    with torch.inference_mode():
        want = deq(ids).logits
        with native.prompt_panels():
            inside = model(ids).logits
    # gate and up keep their own forward, which rounds activations to bf16 on CPUs where
    # torch's int8 matmul measured faster so (the bound the other int8 tests use)
    torch.testing.assert_close(inside, want, rtol=3e-2, atol=3e-2)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        fwd = twin.model.layers[0].self_attn.q_proj.forward
        assert isinstance(fwd, native.PromptInt8) and fwd.kernel is None
        with torch.inference_mode():
            mine = model(ids).logits
            with native.prompt_panels():  # the copy's layers: their own forward, even here
                assert torch.equal(twin(ids).logits, mine)
    native.drop_panels(model, got)  # the kernel unused for decode steps
    assert set(got.prompt_ms) == int8 and isinstance(q.forward, native.PromptInt8)


def test_a_prompts_row_count_times_torch_and_the_panels_only(gemv: native.Gemv,
                                                              tmp_path: Path) -> None:
    """At a prompt's row count (outside ``ROWS``) the row-major product, which nothing
    reads there, is not timed; the cached figure reads it as infinitely slow."""
    a, b, c = native.measure(gemv, 48, 64, 128, row_major=False)
    assert a > 0 and b is None and (c is None) == (not gemv.panel_width)
    got = native._measured(tmp_path, gemv, (48, 64), 128)
    assert got[1] == float("inf") and got[0] > 0
    assert native._measured(tmp_path, gemv, (48, 64), 32)[1] < float("inf")


def test_a_packed_layer_keeps_its_packed_path_under_prompt_panels(
        monkeypatch: pytest.MonkeyPatch, gemv: native.Gemv, tmp_path: Path) -> None:
    """A layer oneDNN packs keeps its packed copy for everyone else (the direct decode
    step reads it through ``packed_forward``) and gets it back when the panels go."""
    from sureserve.loading import packed

    if not gemv.panel_width or packed.why_unavailable() is not None:
        pytest.skip("no panels or no oneDNN packing in this build")
    model = _model("llama")
    q = model.model.layers[0].self_attn.q_proj
    q.forward = packed.PackedForward(q, packed.pack(q.weight), 4)  # type: ignore[method-assign]
    monkeypatch.setattr(native, "_measured", lambda *a: (2.0, 1.0, 0.5))
    got = native.plan(model, "cpu", tmp_path, panel_bytes=2**30)
    assert native.give_prompt_panels(model, got) > 0
    fwd = packed.packed_forward(q)
    assert isinstance(fwd, native.PromptPanels) and fwd.takes_rows(4, torch.float32)
    x = torch.randn(8, 64)
    with torch.inference_mode():
        assert torch.equal(q(x), packed.packed_linear(x, fwd.packed, q.bias))
    native.drop_panels(model, got)
    back = packed.packed_forward(q)
    assert type(back) is packed.PackedForward and back.packed is fwd.packed
    assert back.fresh() and back.min_rows == 4


@pytest.mark.parametrize("march,isa", [("x86-64-v3", "avx2"), ("x86-64", "scalar")])
def test_the_other_instruction_sets_compute_the_same(march: str, isa: str, tmp_path: Path
                                                     ) -> None:
    """The AVX2 and plain-C builds (what an AVX2-only or another CPU compiles) checked on
    this machine too: every entry point against torch, to float32 rounding."""
    flags = native._cpu_flags().split()
    if isa == "avx2" and not {"avx2", "fma"} <= set(flags):
        pytest.skip("this CPU cannot run AVX2 code")
    kernel, why = native.build(tmp_path, march=march)
    if kernel is None:
        pytest.skip(f"the GEMV kernel is unavailable here: {why}")
    assert kernel.isa == isa
    assert kernel.panel_width == (0 if isa == "scalar" else 16)
    torch.manual_seed(0)
    for m, panels in ((1, False), (3, False), (5, False), (1, True), (7, True), (13, True)):
        if panels and not kernel.panel_width:
            continue
        held: list[Any] = []

        def lin(w: torch.Tensor, b: torch.Tensor | None = None, panels: bool = panels,
                held: list[Any] = held) -> native.Linear:
            p = native.Panels(w, kernel.pack_panels(w), 1) if panels else None
            held.append(p)  # the structure points into it
            return native.struct_of((w, None, b), p)

        x, res = torch.randn(m, 1, 40), torch.randn(m, 1, 40)
        w, b = torch.randn(40, 40), torch.randn(40)
        tol = dict(rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(kernel(x, w, b), F.linear(x, w, b), **tol)
        torch.testing.assert_close(kernel.linear(x, lin(w, b), res), res + F.linear(x, w, b),
                                   **tol)
        norm = torch.rand(40) + 0.5
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm
        ws = [(torch.randn(n, 40), torch.randn(n)) for n in (16, 8, 8)]
        ref = torch.cat([F.linear(h, wi, bi) for wi, bi in ws], -1)
        torch.testing.assert_close(kernel.norm_qkv(x, norm, 1e-5, [lin(*wb) for wb in ws]),
                                   ref, **tol)
        gate, up, down = torch.randn(24, 40), torch.randn(24, 40), torch.randn(40, 24)
        mlp = x + F.linear(F.silu(F.linear(h, gate)) * F.linear(h, up), down)
        torch.testing.assert_close(kernel.mlp(x, norm, 1e-5, lin(gate), lin(up), lin(down)),
                                   mlp, **tol)
        layer, wq, st = q8(24, 40)
        torch.testing.assert_close(kernel.linear(x, st), F.linear(x, wq, layer.bias), **tol)
        st.pmin = 1  # a prompt's product: panels widened from int8 as it goes
        torch.testing.assert_close(kernel.linear(x, st), F.linear(x, wq, layer.bias), **tol)
    # the whole step (attention included) with this build, float32 and int8 weights
    for model, ref_model in ((_model("llama"), None), int8_model(_model("llama"))):
        step = DirectDecode(model, kernel=forced(model, kernel))
        ref, got, ref_k, got_k = _both(ref_model or model, [5, 40, 3], step=step)
        assert step._prep is not None and step._prep.ok
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got_k, ref_k, rtol=1e-4, atol=1e-4)


def test_whole_steps_decide_the_rows_the_kernel_serves(monkeypatch: pytest.MonkeyPatch,
                                                       gemv: native.Gemv,
                                                       tmp_path: Path) -> None:
    """Where the kernel takes whole steps, timed whole steps (not the per-shape sums) decide
    up to how many rows it serves: faked timings (the verdict must not depend on this CPU),
    cached per machine; a real calibration's verdict is what it measured."""
    from sureserve.generation import direct

    model = paneled(_model("llama"), gemv)
    calls: list[int] = []
    ratio = {1: 3.0, 4: 2.0, 8: 1.5, 16: 1.01, 32: 2.0}  # torch's ms / the kernel's

    def fake(model: Any, fast: Any, slow: Any, rows: int) -> tuple[float, float]:
        assert fast.kernel is not None and slow.kernel is None
        calls.append(rows)
        return ratio[rows], 1.0

    monkeypatch.setattr(direct, "_time_steps", fake)
    kp = forced(model, gemv, rows=0)
    got = plan(model, kernel=kp, home=tmp_path)
    assert calls == list(native.ROWS) and kp.max_rows == 8  # 16: under MIN_GAIN
    assert kp.whole_ms[4] == (2.0, 1.0) and "whole steps 3.00x faster at 1 row" in \
        kp.describe() and "1.50x at 8" in kp.describe()
    assert got.direct is not None and got.direct.kernel is kp
    assert kp.to_dict()["whole_step_ms"]["32"] == [2.0, 1.0]
    again = forced(model, gemv, rows=0)
    plan(model, kernel=again, home=tmp_path)  # cached: not timed again
    assert calls == list(native.ROWS) and again.max_rows == 8
    ratio[1] = 1.0  # the kernel's step no faster at one row: unused, panels freed
    slow = forced(model, gemv, rows=0)
    slow.panel_rows = {(64, 64): 1}
    assert plan(model, kernel=slow, home=None).direct.kernel is None  # type: ignore[union-attr]
    assert slow.max_rows == 0 and "whole step is no faster" in slow.reason
    assert slow.panel_rows == {} and native.panels_of(model.lm_head) is None
    monkeypatch.undo()
    m = paneled(_model("llama"), gemv)
    real = forced(m, gemv, rows=0)
    real.panel_rows = {(300, 64): 1}  # as a plan that gave them (freed if unused)
    plan(m, kernel=real, home=None)
    want = 0
    for rows in native.ROWS:
        a, b = real.whole_ms[rows]
        if a < b * native.MIN_GAIN:
            break
        want = rows
    assert real.max_rows == want and (native.panels_of(m.lm_head) is None) == (want == 0)


def test_an_int8_head_model_times_its_whole_steps(gemv: native.Gemv, tmp_path: Path) -> None:
    """``int8-weight-only-head`` leaves lm_head without a float ``weight``: the whole-step
    calibration (what every engine load with the kernel runs, ``sureserve quantize``'s
    candidates included) still times both paths at every row count, the cache keyed by
    the head's width, and the step it chose decodes as the forward of the dequantized
    model does (within bf16 rounding: at row counts the timings gave torch, the int8
    layers' own forward rounds activations to bf16 where that is faster)."""
    model, deq = int8_model(_model("llama"), head=True)
    assert not hasattr(model.lm_head, "weight")
    kp = forced(model, gemv, rows=0)
    got = plan(model, kernel=kp, home=tmp_path)
    assert sorted(kp.whole_ms) == sorted(native.ROWS)
    assert all(a > 0 and b > 0 for a, b in kp.whole_ms.values())
    cached = list((tmp_path / "machine").glob("decode-step-*.json"))
    assert len(cached) == 1 and ":300:" in cached[0].read_text()
    if got.direct is not None and got.direct.kernel is not None:
        ref, out, _, _ = _both(deq, [5, 2], step=got.direct)
        torch.testing.assert_close(out, ref, rtol=3e-2, atol=3e-2)
