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
    (errors.AuthError, 401), (errors.NotReadyError, 503), (errors.ClientGoneError, 499),
    (errors.BadLineError, 422), (errors.InputTooLongError, 413), (errors.BuildError, 500),
])
def test_every_error_has_message_fix_and_status(cls: type[errors.SureserveError],
                                                status: int) -> None:
    e = cls("what went wrong", "what to do")
    assert e.http_status == status
    assert "what went wrong" in str(e) and "fix: what to do" in str(e)
    assert e.to_dict()["fix"] == "what to do"
    # its own machine-readable code, in every body the server writes
    assert e.code != errors.SureserveError.code
    assert e.openai_body()["error"]["type"] == e.code  # type: ignore[index]


def test_error_codes_are_unique() -> None:
    classes = [c for c in vars(errors).values()
               if isinstance(c, type) and issubclass(c, errors.SureserveError)]
    codes = [c.code for c in classes]
    assert len(classes) > 10 and len(codes) == len(set(codes))


def test_every_construction_validates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SURESERVE_MAX_WAIT_MS", "abc")
    with pytest.raises(errors.SettingsError, match="max_wait_ms"):
        Settings()  # not only build(): every entry point gets the readable error


def test_readme_settings_table_is_generated_from_the_fields() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert Settings.table() in readme, (
        "README's settings table is stale: replace it with the output of "
        "python -c 'from sureserve.settings import Settings; print(Settings.table())'")


def test_every_setting_is_in_one_flag_group() -> None:
    from sureserve.settings import GROUPS

    grouped = [n for names in GROUPS.values() for n in names]
    assert sorted(grouped) == sorted(Settings.model_fields)
