"""Request and response bodies, in the shapes users know (TEI and OpenAI)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Inputs = str | list[str]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EmbedRequest(_Strict):
    """text-embeddings-inference ``POST /embed``."""

    inputs: Inputs
    normalize: bool = True
    truncate: bool = Field(default=False, description="Cut inputs longer than the model's "
                           "maximum instead of answering 413 (reported in metrics).")
    model: str | None = Field(default=None, description="Served model name (default: the "
                              "first embedding model).")


class PredictRequest(_Strict):
    """text-embeddings-inference ``POST /predict``."""

    inputs: Inputs
    raw_scores: bool = Field(default=False, description="Return logits instead of "
                             "probabilities.")
    truncate: bool = False
    model: str | None = None


class TokenizeRequest(_Strict):
    inputs: Inputs
    add_special_tokens: bool = True
    model: str | None = None


class Prediction(BaseModel):
    label: str
    score: float


class SimpleToken(BaseModel):
    id: int
    text: str
    special: bool
    start: int | None
    stop: int | None


class OpenAIEmbeddingRequest(BaseModel):
    """OpenAI ``POST /v1/embeddings``."""

    model_config = ConfigDict(extra="ignore")  # e.g. "user" is accepted and ignored

    input: Inputs
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, description="Must equal the model's "
                                   "dimension if given; sureserve does not shorten vectors.")


class OpenAIEmbedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class OpenAIEmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIEmbedding]
    model: str
    usage: Usage


class OpenAIModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "sureserve"


class OpenAIModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]


class ErrorBody(BaseModel):
    """TEI-style error."""

    error: str
    error_type: str
    fix: str = ""


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail


class Health(BaseModel):
    status: Literal["ok", "loading", "failed"]
    models: dict[str, str]
    reason: str | None = None


class ModelInfo(BaseModel):
    name: str
    task: str
    path: str
    max_input_length: int
    dim: int | None = None
    labels: list[str] | None = None
    gate_passed: bool | None = None
    gate_overridden: bool = False


class Info(BaseModel):
    model_id: str
    version: str
    max_batch_tokens: int
    max_client_batch_size: int
    max_queue_inputs: int
    max_input_length: int
    models: list[ModelInfo]
