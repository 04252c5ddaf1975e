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


def test_the_alternated_phase_sends_each_request_to_every_server_in_turn(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every contender up at once; each request goes to each of them, the order rotated per
    request; a contender's tok/s is its tokens over its own requests' seconds; texts are
    compared with sureserve fp32's; every server is stopped, and the ratios name the rows."""
    calls: list[tuple[str, str]] = []
    stopped: list[str] = []
    speed = {"u-fp32": 0.5, "u-f32": 1.0, "u-q8": 0.25}  # seconds a request takes

    def launch(c: chat.Contender, report: object, log: object) -> tuple[str, str]:
        return c.name, f"u-{c.model}"

    async def closed_loop(url: str, reqs: list[object], clients: int, max_tokens: int,
                          tok: object, model: str) -> tuple[list[chat.Result], float]:
        if max_tokens == 8:  # the warm-up: a prompt of its own, not a timed one
            assert reqs == [[{"role": "user", "content": "warm"}]]
            return [chat.Result(text="w", tokens=1, seconds=1.0)], 1.0
        calls.append((url, str(reqs[0])))
        text = "same" if url != "u-q8" else f"other {len(calls)}"
        return [chat.Result(text=text, tokens=10, ttft=0.1, seconds=speed[url])], 0.0

    monkeypatch.setattr(chat, "_launch", launch)
    monkeypatch.setattr(chat, "_closed_loop", closed_loop)
    monkeypatch.setattr(chat, "_stop", lambda proc: stopped.append(proc))
    contenders = [chat.Contender("sureserve fp32", [], model="fp32"),
                  chat.Contender("llama.cpp F32", [], model="f32"),
                  chat.Contender("sureserve int8-weight-only-head (accepted)", [],
                                 model="q8")]
    reqs = [[{"role": "user", "content": f"q{i}"}] for i in range(4)]
    report: dict[str, object] = {"runs": [], "peers": {}}
    chat._alternated(contenders, reqs, 2, 64, None, report, lambda m: None,
                     warm=[{"role": "user", "content": "warm"}])
    assert [u for u, _ in calls] == ["u-fp32", "u-f32", "u-q8", "u-f32", "u-q8", "u-fp32",
                                     "u-q8", "u-fp32", "u-f32", "u-fp32", "u-f32", "u-q8"]
    for i, r in enumerate(reqs):  # each request went to all three
        assert sum(str(r) == m for _, m in calls) == 3, i
    assert sorted(stopped) == sorted(c.name for c in contenders)
    rows = {r["contender"]: r for r in report["runs"]}  # type: ignore[attr-defined]
    assert rows["sureserve fp32"]["tokens_per_s"] == 20.0  # 40 tokens in 4 x 0.5 s
    assert rows["llama.cpp F32"]["tokens_per_s"] == 10.0
    assert rows["llama.cpp F32"]["identical"] == 4
    assert rows["llama.cpp F32"]["peak_rss_mb"] is None  # not sampled here
    assert rows["sureserve int8-weight-only-head (accepted)"]["identical"] == 0
    r = chat.ratios(report["runs"])  # type: ignore[arg-type]
    assert r["tok/s sureserve fp32 / llama.cpp F32, 1 clients, alternated"] == 2.0
    assert r["tok/s sureserve int8-weight-only-head (accepted) / llama.cpp F32, 1 client, "
             "alternated"] == 4.0
