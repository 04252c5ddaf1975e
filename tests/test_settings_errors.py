from pathlib import Path

import pytest

from sureserve import errors
from sureserve.settings import Settings


def test_env_var_is_read_and_explicit_value_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SURESERVE_MAX_BATCH_TOKENS", "1234")
    monkeypatch.setenv("SURESERVE_TRUNCATION", "chunk")
    s = Settings.build()
    assert s.max_batch_tokens == 1234
    assert s.truncation == "chunk"
    s2 = Settings.build(max_batch_tokens=99, truncation=None)
    assert s2.max_batch_tokens == 99
    assert s2.truncation == "chunk"  # None means "not given": the env var still applies


def test_safe_defaults() -> None:
    s = Settings()
    assert s.allow_pickle is False
    assert s.trust_remote_code is False
    assert s.allow_download is False
    assert s.truncation == "error"


def test_bad_setting_names_the_field_and_env_var() -> None:
    with pytest.raises(errors.SettingsError) as exc:
        Settings.build(truncation="sometimes")
    assert "truncation" in exc.value.message
    assert "SURESERVE_" in exc.value.fix
    assert exc.value.http_status == 400


def test_help_text_names_env_var() -> None:
    assert "[env: SURESERVE_MAX_BATCH_TOKENS]" in Settings.help("max_batch_tokens")


def test_home_expands_user() -> None:
    assert Settings(home=Path("~/x")).home_dir() == Path("~/x").expanduser()


@pytest.mark.parametrize("cls,status", [
    (errors.SettingsError, 400), (errors.ModelSourceError, 404), (errors.UnsafeWeightsError, 400),
    (errors.TaskMismatchError, 400), (errors.InputError, 422), (errors.TooManyInputsError, 413),
    (errors.OverloadedError, 429), (errors.GateError, 503), (errors.InferenceError, 500),
])
def test_every_error_has_message_fix_and_status(cls: type[errors.SureserveError],
                                                status: int) -> None:
    e = cls("what went wrong", "what to do")
    assert e.http_status == status
    assert "what went wrong" in str(e) and "fix: what to do" in str(e)
    assert e.to_dict()["fix"] == "what to do"
    assert issubclass(cls, errors.SureserveError)
