"""Request and response bodies, in the shapes users know (TEI and OpenAI)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Inputs = str | list[str]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


Parameters = dict[str, Any] | None
_PARAMS = Field(default=None, description="The Hugging Face inference payload's options "
                "object (as InferenceClient sends it): the same keys as the top-level fields, "
                "null meaning not set; a key this route does not implement is refused (422), "
                "never ignored.")
Direction = Literal["left", "right", "Left", "Right"] | None
_TRUNCATE = Field(default=False, description="Cut inputs longer than the model's maximum "
                  "instead of answering 413 (reported in metrics).")
_PROMPT_NAME = Field(default=None, description="A prompt from the model's "
                     "sentence-transformers config, prepended to every input (default: the "
                     "model's default_prompt_name, if any; \"\" for none).")
_DIMENSIONS = Field(default=None, description="Shorter vectors: the first n components, "
                    "renormalised. Served where the model declares Matryoshka sizes or "
                    "`sureserve quantize --dimensions` measured and accepted n; refused (422) "
                    "otherwise.")
EmbedDtype = Literal["float32", "int8", "uint8", "binary", "ubinary"] | None
_EMBED_DTYPE = Field(default=None, description="Smaller vectors, as sentence-transformers' "
                     "quantize_embeddings makes them: int8/uint8 (ranges calibrated on your "
                     "texts), binary/ubinary (sign bits, 8 per byte). Served only after "
                     "`sureserve quantize --precisions` measured and accepted it (422 "
                     "otherwise).")
_DIRECTION = Field(default=None, description="Which end a cut takes tokens from when "
                   "truncating: 'right' (default; keep the start) or 'left' (keep the end).")


class EmbedRequest(_Strict):
    """text-embeddings-inference ``POST /embed``."""

    inputs: Inputs
    normalize: bool = True
    truncate: bool = _TRUNCATE
    truncation_direction: Direction = _DIRECTION
    prompt_name: str | None = _PROMPT_NAME
    dimensions: int | None = _DIMENSIONS
    embed_dtype: EmbedDtype = _EMBED_DTYPE
    model: str | None = Field(default=None, description="Served model name (default: the "
                              "first embedding model).")
    parameters: Parameters = _PARAMS


class EmbedSparseRequest(_Strict):
    """text-embeddings-inference ``POST /embed_sparse`` (SPLADE models)."""

    inputs: Inputs
    truncate: bool = _TRUNCATE
    truncation_direction: Direction = _DIRECTION
    prompt_name: str | None = _PROMPT_NAME
    top_k: int | None = Field(default=None, ge=0, description="Only each text's k strongest "
                              "terms (sureserve's; default the sparse_top_k setting, 0: all).")
    return_tokens: bool = Field(default=False, description="Add each term's token text "
                                "(sureserve's; TEI returns indices only).")
    model: str | None = Field(default=None, description="Served model name (default: the "
                              "first sparse model).")
    parameters: Parameters = _PARAMS


class SparseValue(BaseModel):
    index: int = Field(description="Token id in the model's vocabulary.")
    value: float = Field(description="The term's weight (> 0).")
    token: str | None = Field(default=None, description="With return_tokens: the token.")


class PredictRequest(_Strict):
    """text-embeddings-inference ``POST /predict``."""

    inputs: Inputs
    raw_scores: bool = Field(default=False, description="Return logits instead of "
                             "probabilities.")
    truncate: bool = False
    truncation_direction: Direction = _DIRECTION
    top_k: int | None = Field(default=None, description="Only the k best labels (default: "
                              "all, best first).")
    function_to_apply: Literal["softmax", "sigmoid", "none"] | None = Field(
        default=None, description="Scores from the logits by this function instead of the "
        "model's own (softmax, or sigmoid for multi-label models).")
    model: str | None = None
    parameters: Parameters = _PARAMS


class SimilarityInputs(_Strict):
    source_sentence: str
    sentences: list[str]


class SimilarityRequest(_Strict):
    """The Hugging Face ``sentence-similarity`` task: cosine of each sentence to the source."""

    inputs: SimilarityInputs
    truncate: bool = False
    truncation_direction: Direction = _DIRECTION
    prompt_name: str | None = None
    model: str | None = None
    parameters: Parameters = _PARAMS


class EmbedAllRequest(_Strict):
    """TEI ``POST /embed_all``: every token's last hidden state, unpooled."""

    inputs: Inputs
    truncate: bool = False
    truncation_direction: Direction = _DIRECTION
    prompt_name: str | None = None
    model: str | None = None
    parameters: Parameters = _PARAMS


class DecodeRequest(_Strict):
    """TEI ``POST /decode``: token ids back to text."""

    ids: list[int] | list[list[int]]
    skip_special_tokens: bool = True
    model: str | None = None


class RerankGroup(_Strict):
    query: str
    texts: list[str]


class RerankRequest(_Strict):
    """text-embeddings-inference ``POST /rerank``: ``texts`` by relevance to ``query``; or
    sureserve's batch form, ``queries``: several (query, texts) groups in one request, all
    pairs batched together, answered with one ranking per group."""

    query: str | None = None
    texts: list[str] | None = None
    queries: list[RerankGroup] | None = Field(
        default=None, description="Instead of query and texts: several groups, each ranked "
        "on its own (answer: a list of rankings, in order); their pairs share batches.")
    truncate: bool = Field(default=False, description="Cut a (query, text) pair that is too "
                           "long by cutting the text (never the query) instead of 413.")
    truncation_direction: Direction = _DIRECTION
    raw_scores: bool = Field(default=False, description="Logits instead of sigmoids.")
    return_text: bool = False
    model: str | None = None


class Rank(BaseModel):
    index: int
    score: float
    text: str | None = None
    truncated: bool | None = Field(default=None, description="Present when cutting was "
                                   "allowed: whether this text was cut.")
    chunks: int | None = None


class DocumentText(_Strict):
    text: str


class V1RerankRequest(_Strict):
    """``POST /v1/rerank``, the shape RAG frameworks call (Cohere, Jina)."""

    query: str
    documents: list[str | DocumentText]
    top_n: int | None = Field(default=None, ge=1, description="Only the n best (default: "
                              "all).")
    return_documents: bool = False
    max_tokens_per_doc: int | None = Field(
        default=None, ge=1, description="Cohere's: a document longer than this many tokens "
        "is cut to them (listed in meta.warnings). A pair still over the model's limit is "
        "handled as SURESERVE_V1_RERANK_TRUNCATION says.")
    model: str | None = None


class V1RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: DocumentText | None = None


class RerankUsage(BaseModel):
    total_tokens: int


class RerankMeta(BaseModel):
    warnings: list[str] = Field(default_factory=list, description="Every document that "
                                "was cut or scored in chunks, and how (Cohere's shape).")


class V1RerankResponse(BaseModel):
    model: str
    results: list[V1RerankResult]
    usage: RerankUsage
    meta: RerankMeta = Field(default_factory=RerankMeta)


class InferenceRequest(BaseModel):
    """``POST /`` and ``/invocations``: checked against the default model's task's own
    request shape (``EmbedRequest``, ``PredictRequest``, ``SimilarityRequest`` or
    ``RerankRequest``)."""

    model_config = ConfigDict(extra="allow")

    inputs: Inputs | SimilarityInputs | None = Field(default=None, description="Texts (or "
                                                     "a similarity pair); a reranker takes "
                                                     "query and texts instead.")
    model: str | None = None
    parameters: Parameters = _PARAMS


class TokenizeRequest(_Strict):
    inputs: Inputs
    add_special_tokens: bool = True
    model: str | None = None


class Prediction(BaseModel):
    label: str
    score: float
    truncated: bool | None = Field(default=None, description="Present when cutting was "
                                   "allowed (truncate, or the server's truncation policy): "
                                   "whether this input was cut to the model's maximum.")
    chunks: int | None = Field(default=None, description="Present with truncated: the "
                               "chunks this input ran as (chunk policy; 1 otherwise).")


class SimpleToken(BaseModel):
    id: int
    text: str
    special: bool
    start: int | None
    stop: int | None


class OpenAIEmbeddingRequest(BaseModel):
    """OpenAI ``POST /v1/embeddings``."""

    model_config = ConfigDict(extra="ignore")  # e.g. "user" is accepted and ignored

    # token ids are parsed only to be refused with the reason (see the route)
    input: Inputs | list[int] | list[list[int]] = Field(description=(
        "A text or texts. Token ids (what LangChain's OpenAIEmbeddings sends by default) are "
        "refused: they come from another tokenizer."))
    model: str | None = None
    encoding_format: Literal["float", "base64"] = Field(
        default="float", description="base64: the vector's bytes (little-endian float32, or "
        "the integers of embed_dtype), base64-encoded.")
    dimensions: int | None = _DIMENSIONS
    embed_dtype: EmbedDtype = _EMBED_DTYPE


class OpenAIEmbedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | list[int] | str


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


class DriftAlert(BaseModel):
    model: str
    signal: str
    score: float | None
    threshold: float
    alert: bool = True
    detail: str


class ReplicaHealth(BaseModel):
    replica: str = Field(description="Ray Serve's replica id (the 'replica' metrics label)")
    pid: int
    node: str = Field(description="Ray node id (first 12 characters)")
    status: Literal["loading", "ready", "failed", "lost"] = Field(
        description="lost: the replica stopped reporting (its process died) and Ray has not "
        "replaced it yet")
    models: dict[str, str]
    reason: str | None = None
    seconds_since_report: float


class Health(BaseModel):
    status: Literal["ok", "degraded", "loading", "failed"] = Field(
        description="degraded: every model is ready but a drift alert is on (see drift); "
        "under Ray Serve also: some replicas are ready, others are not")
    models: dict[str, str]
    reason: str | None = None
    drift: list[DriftAlert] = Field(default_factory=list,
                                    description="Drift signals above their threshold")
    replicas: list[ReplicaHealth] | None = Field(
        default=None, description="Under Ray Serve (serve --ray): every replica, whichever "
        "answered; absent for a single server")


class ModelInfo(BaseModel):
    name: str
    task: str
    path: str
    max_input_length: int
    dim: int | None = None
    prompts: dict[str, str] | None = Field(
        default=None, description="Embedding models: the sentence-transformers prompts "
        "prompt_name can name")
    default_prompt_name: str | None = Field(
        default=None, description="The prompt put before every input when a request names "
        "none (as sentence-transformers applies it); null: none")
    labels: list[str] | None = None
    gate_passed: bool | None = None
    gate_overridden: bool = False
    packed_batches: bool | None = Field(
        default=None, description="Whether short texts share rows of a forward pass "
        "(checked against padded outputs at warm-up); null for generation models")
    forward_workers: int | None = Field(
        default=None, description="Forward passes of this model that run at once")
    precision: str = Field(default="float32", description="dtype, or the quantization method")
    quantization_evaluated: bool | None = Field(
        default=None, description="Whether the quantization was measured and accepted by "
        "`sureserve quantize` (null: not quantized)")
    warnings: list[str] = Field(default_factory=list, description="The load report's "
                                "warnings (e.g. layers placed on the CPU, unmeasured "
                                "quantization)")
    decode_path: str | None = Field(
        default=None, description="Generation models: how decoding runs here (the direct "
        "decode step or why the model's forward runs it; the weight layout measured for "
        "this CPU, or why it is unchanged); null for other models")
    decode_kernel: dict[str, Any] | None = Field(
        default=None, description="Generation models: sureserve's GEMV kernel for decode "
        "steps (decode_kernel): its instruction set, up to how many rows it runs "
        "(max_rows, 0: not used), why not (reason), and the measurement it was chosen by "
        "(step_ms: per row count, ms of one step's matmuls through torch and with the "
        "kernel where faster; shape_rows: per weight shape, the most rows it serves)")
    packed_linear: dict[str, Any] | None = Field(
        default=None, description="oneDNN packed linears (packed_linear): the path "
        "(measured, or off and why), how many layers and MiB are packed under the bound, "
        "the fewest rows that take them, and per weight shape the measurement it was chosen "
        "by (ms: per row count, F.linear and packed ms per matrix)")
    drift: dict[str, Any] | None = Field(
        default=None, description="The drift watch: baseline (reference file or first "
        "window of traffic) and whether it is complete, window, every signal with its score, "
        "threshold and alert, the recent history of scores (and, for classifiers, the label "
        "mix of the window and the baseline); null when the watch is off")


class Info(BaseModel):
    model_id: str
    version: str
    max_batch_tokens: int
    max_client_batch_size: int
    max_queue_inputs: int
    max_input_length: int
    models: list[ModelInfo]


# --- generation (OpenAI completions and chat completions) -------------------------------
# Parameters that change what OpenAI would return and that sureserve does not implement are
# refused with a 422 naming them (see server/completions.py), never silently ignored.

class _GenParams(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    temperature: float = Field(default=1.0, description="0 is greedy; OpenAI's default is 1.")
    top_p: float = 1.0
    top_k: int = Field(default=0, description="sureserve extension: keep the k most likely "
                       "tokens (0 = off).")
    repetition_penalty: float = Field(default=1.0, description="sureserve extension (as in "
                                      "transformers): > 1 discourages repeating tokens.")
    frequency_penalty: float = Field(default=0.0, description="OpenAI's: a token's logit "
                                     "loses this times its count in the output (-2..2).")
    presence_penalty: float = Field(default=0.0, description="OpenAI's: a token's logit loses "
                                    "this once it appears in the output (-2..2).")
    logit_bias: dict[str, float] | None = Field(default=None, description="OpenAI's: token id "
                                                "-> bias added to its logit (-100..100).")
    n: int = Field(default=1, description="Completions per prompt.")
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, bool] | None = Field(default=None, description="{'include_usage':"
                                                   " true} adds a final usage chunk.")
    max_tokens: int | None = Field(default=None, description="Tokens to generate (default: the "
                                   "server's max_new_tokens setting).")
    response_format: dict[str, Any] | None = Field(
        default=None, description="OpenAI's structured output, enforced by constrained "
        "decoding: {'type': 'json_object'} (any JSON object) or {'type': 'json_schema', "
        "'json_schema': {'name': ..., 'schema': {...}}}; the output always parses (and "
        "validates against the schema) unless max_tokens cuts it (finish_reason 'length'). "
        "A schema that cannot be enforced is a 422 naming what is unsupported.")
    user: str | None = None


class CompletionRequest(_GenParams):
    """OpenAI ``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(description=(
        "A text, texts, or token ids (one prompt as a list of ids, several as lists), as "
        "OpenAI's completions take them; ids are the model's own tokenizer's."))
    logprobs: int | None = Field(default=None, description="Log-probabilities of each "
                                 "generated token and of this many alternatives (0..5).")
    echo: bool = Field(default=False, description="Start each choice with its prompt (and, "
                       "with logprobs, the prompt tokens' log-probabilities, the first null); "
                       "with max_tokens 0 the prompt is scored and nothing generated.")


class ChatContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ToolCallFunction(BaseModel):
    name: str
    arguments: str = Field(description="The arguments as a JSON-encoded object.")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ChatContentPart] | None = Field(
        default=None, description="Required except on an assistant message with tool_calls.")
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(default=None, description="An assistant "
                                              "message's earlier calls (multi-turn tools).")
    tool_call_id: str | None = Field(default=None, description="role 'tool': the call this "
                                     "message answers.")


class ChatCompletionRequest(_GenParams):
    """OpenAI ``POST /v1/chat/completions``."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = Field(default=None, description="Log-probabilities of each "
                                  "generated token (the model's, before sampling).")
    top_logprobs: int | None = Field(default=None, description="With logprobs: this many "
                                     "most likely alternatives per token (0..20).")
    tools: list[dict[str, Any]] | None = Field(
        default=None, description="OpenAI function tools, rendered by the model's chat "
        "template (refused when the template has no tool support); calls are produced under "
        "constrained decoding and returned as tool_calls.")
    tool_choice: str | dict[str, Any] | None = Field(
        default=None, description="'auto' (default with tools; templates that write "
        "<tool_call> blocks), 'none', 'required' (one or more calls), or {'type': "
        "'function', 'function': {'name': ...}}.")


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: Literal["stop", "length", "tool_calls"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage
