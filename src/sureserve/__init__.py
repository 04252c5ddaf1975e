"""sureserve: run Hugging Face transformer models fast, and never silently wrong.

Public API (pinned by tests/test_public_api.py)::

    import sureserve
    m = sureserve.load("minilm")          # zoo alias, local folder or cached hub id
    vecs = m.embed(["some text"])         # (n, dim) numpy array, input order
    sureserve.info("smollm2")             # plan + facts, no weights loaded
    sureserve.check("minilm")             # the preflight gate's report
    lm = sureserve.load("smollm2")
    lm.generate(["The capital of France is"], max_new_tokens=8)   # texts, input order
    for piece in lm.stream("Once upon a time"): ...               # streamed text
"""

from sureserve import errors
from sureserve.api import check, info, load
from sureserve.engine import Engine, RunSummary
from sureserve.gate.report import Check, GateReport
from sureserve.generation.continuous import Completion
from sureserve.generation.sampling import SamplingParams
from sureserve.settings import Settings
from sureserve.version import __version__
from sureserve.zoo import DEFAULT_MODEL, ZOO

__all__ = [
    "DEFAULT_MODEL",
    "ZOO",
    "Check",
    "Completion",
    "Engine",
    "GateReport",
    "RunSummary",
    "SamplingParams",
    "Settings",
    "__version__",
    "check",
    "errors",
    "info",
    "load",
]
