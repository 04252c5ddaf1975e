"""The llama.cpp benchmark peer: never built in the suite; a machine that cannot build it
gets a clear reason, and the report's ratios are computed from the rows present."""

from __future__ import annotations

from pathlib import Path

import pytest

from sureserve.bench import chat, llamacpp
from tests.cli import cli


def test_no_compiler_means_a_clear_reason_and_nothing_built(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llamacpp.shutil, "which", lambda tool: None)
    with pytest.raises(llamacpp.PeerUnavailable, match="cmake is not installed"):
        llamacpp.build(tmp_path)
    assert not (tmp_path / "llama.cpp").exists()


def test_a_finished_build_is_reused_without_building(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    done = tmp_path / "llama.cpp"
    (done / "bin").mkdir(parents=True)
    (done / ".complete").write_text("ok\n")
    monkeypatch.setattr(llamacpp, "_run", lambda *a, **k: pytest.fail("rebuilt"))
    assert llamacpp.build(tmp_path, log=lambda m: pytest.fail(m)) == done


def test_server_command_binds_slots_and_context() -> None:
    cmd = llamacpp.server_cmd(Path("/x"), Path("/m.gguf"), threads=2, parallel=32, context=1024)
    assert cmd[0] == "/x/bin/llama-server"
    assert cmd[cmd.index("-np") + 1] == "32" and cmd[cmd.index("-c") + 1] == str(32 * 1024)
    assert "--host" not in cmd  # the caller binds it to 127.0.0.1


def _row(name: str, wl: str, c: int, tps: float, p50: float, p99: float) -> dict[str, object]:
    return {"contender": name, "workload": wl, "clients": c, "tokens_per_s": tps,
            "ttft_p50_s": p50, "ttft_p99_s": p99}


def test_ratios_follow_the_issue_targets() -> None:
    rows = [_row("sureserve fp32", "short", 32, 200.0, 0.5, 1.0),
            _row("llama.cpp F32", "short", 32, 100.0, 0.6, 2.0),
            _row("sureserve fp32", "shared-prefix", 32, 90.0, 0.5, 3.0),
            _row("sureserve fp32, no prefix reuse", "shared-prefix", 32, 50.0, 2.0, 9.0)]
    r = chat.ratios(rows)  # type: ignore[arg-type]
    assert r["tok/s sureserve fp32 / llama.cpp F32, 32 clients"] == 2.0
    assert r["TTFT p99 llama.cpp F32 / sureserve fp32, 32 clients"] == 2.0
    assert r["shared prefix: TTFT p50 without / with reuse"] == 4.0
    assert chat.ratios([]) == {}


def test_a_quantized_contender_needs_a_folder_quantize_wrote(tmp_path: Path) -> None:
    """``--quantized DIR`` names a folder ``sureserve quantize`` wrote; any other is refused
    before anything starts, with the command that makes one."""
    r = cli("bench", "generate", "--peer", "llama.cpp", "--quantized", str(tmp_path),
            "--contender", "int8", "-o", str(tmp_path / "out.json"))
    assert r.returncode != 0
    assert "holds no quantization recipe" in r.stderr, r.stderr
    assert "sureserve quantize smollm2 --eval FILE -o DIR" in r.stderr, r.stderr
    assert not (tmp_path / "out.json").exists()
