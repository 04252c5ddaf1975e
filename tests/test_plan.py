import pytest

from sureserve.errors import SettingsError
from sureserve.loading.plan import DeviceCaps, make_plan

CPU = DeviceCaps()
CPU_BF16 = DeviceCaps(cpu_bf16=True)
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
    assert any("bfloat16" in r for r in p.reasons)


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


def test_bf16_on_cpu_without_native_support_warns() -> None:
    p = make_plan(CPU, dtype="bf16")
    assert p.dtype == "bfloat16"
    assert any("no native bf16" in w for w in p.warnings)
