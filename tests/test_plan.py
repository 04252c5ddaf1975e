import json
from pathlib import Path

import pytest

from sureserve.errors import SettingsError
from sureserve.loading.plan import DeviceCaps, make_plan

CPU = DeviceCaps()
CPU_BF16 = DeviceCaps(cpu_bf16_speed=2.3)  # measured, as on a CPU with AMX
CPU_SLOW_BF16 = DeviceCaps(cpu_bf16_speed=0.5)  # AVX-512 BF16 without AMX measured so
H100 = DeviceCaps(cuda_count=1, cuda_capability=(9, 0), cuda_name="H100",
                  flash_attn_installed=True)
H100_NO_FA = DeviceCaps(cuda_count=1, cuda_capability=(9, 0), cuda_name="H100")
T4 = DeviceCaps(cuda_count=1, cuda_capability=(7, 5), cuda_name="T4", flash_attn_installed=True)
MAC = DeviceCaps(mps=True)


def test_cpu_defaults_to_fp32_and_sdpa_with_reasons() -> None:
    p = make_plan(CPU)
    assert (p.device, p.dtype, p.attn_implementation) == ("cpu", "float32", "sdpa")
    assert any("no CUDA" in r for r in p.reasons)
    assert any("flash_attention_2 not used" in r for r in p.reasons)


def test_cpu_with_bf16_hints_but_keeps_fp32() -> None:
    p = make_plan(CPU_BF16)
    assert p.dtype == "float32"
    assert any("2.3x faster" in r and "sureserve quantize" in r for r in p.reasons)


def test_bf16_advice_follows_the_measurement_not_the_flags() -> None:
    p = make_plan(CPU_SLOW_BF16)
    assert any("0.50x the fp32 speed here: not worth it" in r for r in p.reasons)
    asked = make_plan(CPU_SLOW_BF16, dtype="bfloat16")
    assert asked.warnings and "slower, not faster" in asked.warnings[0]
    assert not make_plan(CPU_BF16, dtype="bfloat16").warnings


def test_cpu_speeds_are_measured_once_and_cached(tmp_path: Path) -> None:
    from sureserve.loading import machine

    first = machine.cpu_speeds(tmp_path)
    assert set(first) == {"float32", "bfloat16", "float16"} and first["float32"] > 0
    (cached,) = (tmp_path / "machine").glob("*.json")
    data = json.loads(cached.read_text())
    data["gflops"]["float32"] = 12345.0
    cached.write_text(json.dumps(data))
    assert machine.cpu_speeds(tmp_path)["float32"] == 12345.0  # read back, not re-measured


def test_ampere_plus_gpu_gets_bf16_and_flash_attention() -> None:
    p = make_plan(H100)
    assert (p.device, p.dtype, p.attn_implementation) == ("cuda:0", "bfloat16",
                                                          "flash_attention_2")


def test_no_flash_attn_package_falls_back_to_sdpa_with_reason() -> None:
    p = make_plan(H100_NO_FA)
    assert p.attn_implementation == "sdpa"
    assert any("not installed" in r for r in p.reasons)


def test_old_gpu_gets_fp16_and_sdpa() -> None:
    p = make_plan(T4)
    assert p.dtype == "float16"
    assert p.attn_implementation == "sdpa"
    assert any("7.5" in r for r in p.reasons)


def test_requested_flash_attention_on_cpu_is_a_stated_fallback() -> None:
    p = make_plan(CPU, attn="flash_attention_2")
    assert p.attn_implementation == "sdpa"
    assert p.warnings and "falling back to sdpa" in p.warnings[0]


def test_fp32_request_on_gpu_disables_flash_attention() -> None:
    p = make_plan(H100, dtype="fp32")
    assert p.dtype == "float32" and p.attn_implementation == "sdpa"


def test_mps() -> None:
    p = make_plan(MAC)
    assert p.device == "mps"


def test_requesting_cuda_without_gpu_is_an_error_with_fix() -> None:
    with pytest.raises(SettingsError) as exc:
        make_plan(CPU, device="cuda")
    assert "--device cpu" in exc.value.fix


@pytest.mark.parametrize("bad", [{"device": "tpu"}, {"dtype": "int3"}, {"attn": "magic"}])
def test_unknown_values_are_errors(bad: dict[str, str]) -> None:
    with pytest.raises(SettingsError):
        make_plan(CPU, **bad)


def test_bf16_on_cpu_measured_slow_warns() -> None:
    p = make_plan(CPU_SLOW_BF16, dtype="bf16")
    assert p.dtype == "bfloat16"
    assert any("measured 0.50x" in w for w in p.warnings)
