"""The decode weight layout (generation/layout.py): same values in another memory order,
chosen by this machine's measurement (faked here both ways, so no verdict depends on the
CPU), cached per machine, and outputs unchanged but for float rounding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import sureserve
from sureserve.generation import layout as L

ROW_FAST = ((1.0, 10.0), (2.0, 10.0))  # (row-major, column-major) ms at (1 row, batch)
COL_FAST = ((2.0, 10.0), (1.0, 9.0))


def _load(path: Path, **kw: Any) -> sureserve.Engine:
    return sureserve.load(str(path), accept_gate_failure=True, drift_watch=False, **kw)


@pytest.fixture()
def fake(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """measure_shape answers what the test says (and counts its calls)."""
    state: dict[str, Any] = {"answer": COL_FAST, "calls": 0}

    def measure(o: int, i: int, dtype: Any) -> Any:
        state["calls"] += 1
        return state["answer"]
    monkeypatch.setattr(L, "measure_shape", measure)
    return state


def test_column_major_keeps_values_and_the_tie(tiny_llama: Path, fake: dict[str, Any],
                                               tmp_path: Path) -> None:
    plain = _load(tiny_llama, decode_weight_layout=False)
    assert plain.generation is not None
    assert plain.generation.layout.path.startswith("unchanged: turned off")
    laid = _load(tiny_llama, home=tmp_path, decode_weight_layout=True)
    assert laid.generation is not None
    plan = laid.generation.layout
    assert plan.path == "measured" and plan.moved == sum(
        1 for m in laid.model.modules() if isinstance(m, torch.nn.Linear))
    for (name, a), (_, b) in zip(plain.model.named_parameters(), laid.model.named_parameters(),
                                 strict=True):
        assert torch.equal(a, b), name
    lm_head = laid.model.get_output_embeddings().weight
    assert not lm_head.is_contiguous() and lm_head.t().is_contiguous()
    assert laid.model.get_input_embeddings().weight is lm_head  # still tied
    assert "column-major" in plan.describe()


def test_outputs_equal_the_plain_layout(tiny_llama: Path, fake: dict[str, Any],
                                        tmp_path: Path) -> None:
    plain = _load(tiny_llama, decode_weight_layout=False)
    laid = _load(tiny_llama, home=tmp_path, decode_weight_layout=True)
    ids = torch.tensor([[1, 5, 9, 200, 7, 3]])
    with torch.inference_mode():
        a, b = plain.model(input_ids=ids).logits, laid.model(input_ids=ids).logits
    assert float((a - b).abs().max()) < 1e-4
    prompts = [[1, 5, 9, 200], [1, 42], [1, 7, 7, 7, 7, 7, 300]]
    assert plain.generation is not None and laid.generation is not None
    assert plain.generation.generate_ids(prompts, 8) == laid.generation.generate_ids(prompts, 8)


def test_row_major_measured_faster_leaves_the_model_alone(tiny_llama: Path,
                                                          fake: dict[str, Any],
                                                          tmp_path: Path) -> None:
    fake["answer"] = ROW_FAST
    laid = _load(tiny_llama, home=tmp_path, decode_weight_layout=True)
    assert laid.generation is not None and laid.generation.layout.moved == 0
    assert all(m.weight.is_contiguous() for m in laid.model.modules()
               if isinstance(m, torch.nn.Linear))
    assert "row-major" in laid.generation.layout.describe()


def test_a_batch_slowdown_vetoes_column_major() -> None:
    assert not L.choose(((2.0, 10.0), (1.0, 12.0)))
    assert L.choose(COL_FAST) and not L.choose(ROW_FAST)


def test_measurements_are_cached_per_machine(tiny_llama: Path, fake: dict[str, Any],
                                             tmp_path: Path) -> None:
    _load(tiny_llama, home=tmp_path, decode_weight_layout=True)
    first = fake["calls"]
    assert first >= 2  # one per distinct weight shape
    fake["answer"] = ROW_FAST  # a new measurement would now say otherwise: it is not taken
    again = _load(tiny_llama, home=tmp_path, decode_weight_layout=True)
    assert fake["calls"] == first
    assert again.generation is not None and again.generation.layout.moved > 0


def test_not_a_cpu_is_unchanged_with_the_reason() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    plan = L.plan_and_apply(model, "cuda:0")
    assert plan.path.startswith("unchanged: not a CPU") and not plan.shapes
    assert model[0].weight.is_contiguous()


def test_measure_shape_times_both_layouts() -> None:
    # 1 MiB of copies: a 64x32 matrix at the default 96 MiB is 12,288 copies (10 s here)
    row, col = L.measure_shape(64, 32, torch.float32, stream_bytes=2**20)
    assert all(x > 0 for x in (*row, *col))
