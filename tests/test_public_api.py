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
    assert set(sureserve.ZOO) == {"minilm", "smollm2", "sentiment-demo", "rerank-demo"}
    assert sureserve.ZOO["minilm"].task_name == "embed"
    assert sureserve.ZOO["smollm2"].task_name == "generate"
    assert sureserve.ZOO["sentiment-demo"].task_name == "classify"
    assert sureserve.ZOO["rerank-demo"].task_name == "rerank"
    assert sureserve.DEFAULT_MODEL in sureserve.ZOO
