"""Every branch that follows this CPU's measured matmul speeds, run on any CPU: the
machine-speed cache is preset to each kind seen so far (``machine.KINDS``), and the plan,
the doctor and quantize must answer as that kind calls for, naming its figures."""

from __future__ import annotations

from pathlib import Path

import pytest

from sureserve.doctor.local import dtype_advice
from sureserve.loading import machine
from sureserve.loading import precision as Q
from sureserve.loading.plan import detect_caps, make_plan
from sureserve.quantize.run import _hopeless_dtype
from sureserve.settings import Settings


@pytest.fixture(params=sorted(machine.KINDS))
def kind(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Path, float]:
    machine.preset_kind(tmp_path, request.param)
    speeds = machine.KINDS[request.param]
    return request.param, tmp_path, speeds["bfloat16"] / speeds["float32"]


def test_preset_is_read_back_not_measured(kind: tuple[str, Path, float]) -> None:
    name, home, _ = kind
    assert machine.cpu_speeds(home) == machine.KINDS[name]
    assert machine.bf16_speed(home) == pytest.approx(kind[2])


def test_plan_hint_follows_the_preset(kind: tuple[str, Path, float]) -> None:
    _, home, bf16 = kind
    caps = detect_caps(home)
    assert caps.cpu_bf16_speed == pytest.approx(bf16)
    plan = make_plan(caps)
    assert plan.dtype == "float32"  # the CPU default never changes with the hint
    dtype_reason = next(r for r in plan.reasons if r.startswith("dtype float32"))
    if bf16 >= machine.BF16_WORTH:
        assert f"{bf16:.1f}x faster here" in dtype_reason
    else:
        assert f"{bf16:.2f}x the fp32 speed here: not worth it" in dtype_reason
    asked = make_plan(caps, dtype="bfloat16")
    assert bool(asked.warnings) == (bf16 < 1), asked.warnings


def test_doctor_dtype_advice_follows_the_preset(kind: tuple[str, Path, float]) -> None:
    name, home, bf16 = kind
    speeds = machine.cpu_speeds(home)
    line, verdict, fix = dtype_advice("float32", speeds)
    assert f"bfloat16 {bf16:.2f}x" in line
    if bf16 >= machine.BF16_WORTH:
        assert verdict == "warn" and f"measured {bf16:.2f}x float32" in fix, (name, fix)
    else:
        assert verdict is None and fix == "", (name, fix)
    # a model loaded in bf16 on a CPU where bf16 is slow is a failure that names the figure
    line, verdict, fix = dtype_advice("bfloat16", speeds)
    if bf16 < machine.SLOW_DTYPE:
        assert verdict == "fail" and f"{bf16:.2f}x float32" in fix and "--dtype float32" in fix
    else:
        assert verdict != "fail"


def test_quantize_skips_bf16_only_where_it_measured_hopeless(
        kind: tuple[str, Path, float]) -> None:
    _, home, bf16 = kind
    reason = _hopeless_dtype(Q.get("bf16"), "cpu", Settings(home=home))
    if bf16 < machine.SLOW_DTYPE:
        assert reason is not None and f"{bf16:.2f}x the fp32 speed" in reason
    else:
        assert reason is None
