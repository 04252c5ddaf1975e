"""One typed Settings object for the library, the CLI and the server.

Every knob lives here once: its default, its type, its help text (the field description)
and its environment variable (``SURESERVE_<NAME>``). The CLI generates its flags from these
fields (``GROUPS`` says which commands get which) and the README's settings table is
generated from them too (``table``; a test keeps the two equal). Only the flags the user
gave are overrides, so the precedence is: flag or keyword > environment variable > default.
Every construction validates, and an invalid value is a ``SettingsError`` naming the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from sureserve.errors import SettingsError

Truncation = Literal["error", "truncate", "chunk"]
ONEDNN_CACHE_DEFAULT = 64


class Settings(BaseSettings):
    """All settings. Field descriptions double as CLI help and README documentation."""

    model_config = SettingsConfigDict(env_prefix="SURESERVE_", extra="forbid")

    # --- cache and sources -------------------------------------------------------------
    home: Path = Field(
        default=Path("~/.cache/sureserve"),
        description="Cache folder for built zoo models and corpora.",
    )
    allow_download: bool = Field(
        default=False,
        description="Allow fetching a model from the Hugging Face hub when it is not in the "
        "local cache. Off by default: nothing is downloaded behind your back.",
    )
    allow_pickle: bool = Field(
        default=False,
        description="Allow loading pickled PyTorch weights (.bin/.pt). Off by default because "
        "unpickling runs arbitrary code from the file; prefer safetensors.",
    )
    trust_remote_code: bool = Field(
        default=False,
        description="Allow model repositories to run their own Python code. Off by default.",
    )

    # --- load plan -----------------------------------------------------------------------
    device: str | None = Field(
        default=None, description="Device to run on: cpu, cuda, cuda:N or mps. Default: best."
    )
    dtype: str | None = Field(
        default=None,
        description="Weights dtype: float32, bfloat16 or float16. Default: float32 on CPU, "
        "bfloat16 (or float16) on GPUs that support it.",
    )
    attn_implementation: str | None = Field(
        default=None,
        description="Attention kernel: sdpa, eager or flash_attention_2. Default: sdpa; "
        "flash_attention_2 when installed on a GPU with compute capability >= 8.0.",
    )
    quantization: str | None = Field(
        default=None,
        description="Quantize at load: int8-dynamic, int8-weight-only, int8-weight-only-head, "
        "int4-weight-only (CPU); "
        "bf16, fp16, bnb-int8, bnb-nf4 (bitsandbytes, CPU or CUDA); bf16-flash (CUDA). "
        "int8-smooth needs ranges measured on your texts: only from a folder that "
        "`sureserve quantize` wrote. "
        "Unmeasured, so it warns: prefer `sureserve quantize MODEL --eval FILE -o DIR` and "
        "load DIR.",
    )
    allow_offload: bool = Field(
        default=False,
        description="On GPUs, let layers that do not fit go to CPU memory (slow: every step "
        "copies them). Off: a model too big for the GPUs is an error naming what does fit "
        "(see `sureserve fit`).",
    )
    onednn_cache_capacity: int = Field(
        default=ONEDNN_CACHE_DEFAULT, ge=0,
        description="Most compiled oneDNN kernels kept per process (CPU). oneDNN caches one per "
        "tensor shape (1,024 by default) and the server makes a new shape for almost every "
        "batch, so its memory grew by megabytes a minute until the cache filled (BENCHMARKS.md "
        "'Memory under load'). The same bound goes to ideep's cache (LRU_CACHE_CAPACITY), "
        "where torch keeps the packed linears' kernels, one per input row count. Applied "
        "when the first model loads, unless ONEDNN_PRIMITIVE_CACHE_CAPACITY or "
        "LRU_CACHE_CAPACITY is set (that one wins); 0 turns oneDNN's cache off (ideep's keeps "
        "1: torch's packed ops crash without it).",
    )
    packed_linear: bool = Field(
        default=True,
        description="On a CPU, multiply by each linear layer's weight through a copy packed "
        "once, at load, into oneDNN's blocked layout wherever that measured faster than "
        "F.linear on this machine (per weight shape, dtype and row count; measured once, "
        "cached). Measured on a 2-core AMD EPYC: 1.4-1.7x on smollm2's layers at 8-32 rows, "
        "2.4x on its lm_head, 32 generation clients 1.45x llama.cpp F32 (BENCHMARKS.md). "
        "Costs a second copy of the packed weights (bounded by packed_linear_mb) and changes "
        "sums in the last bits (greedy generation is checked against transformers under the "
        "near-tie rule); the kernels it compiles per row count are bounded by "
        "onednn_cache_capacity (a 10-minute mixed soak: RSS +5.9%). /info's packed_linear "
        "gives the figures and the path. Off: F.linear everywhere.",
    )
    packed_linear_mb: float = Field(
        default=1024.0, ge=0,
        description="Most MiB of packed weight copies per model (packed_linear): the shapes "
        "that save the most time are packed first; the rest keep F.linear.",
    )
    accept_gate_failure: bool = Field(
        default=False,
        description="Load and serve a model even when its preflight gate fails. The override "
        "is logged and shown in the gate report. Use only when you understand the failure.",
    )

    # --- batching and truncation ---------------------------------------------------------
    truncation: Truncation = Field(
        default="error",
        description="What to do with texts longer than the model's usable maximum: error "
        "(refuse, naming the text), truncate (cut and report each one) or chunk (split into "
        "overlapping chunks and combine).",
    )
    chunk_stride: int = Field(
        default=32,
        ge=0,
        description="Tokens of overlap between consecutive chunks when truncation=chunk.",
    )
    sparse_top_k: int = Field(
        default=0,
        ge=0,
        description="Sparse (SPLADE) models: keep only each text's strongest terms, this "
        "many (0: every non-zero term). A request's own top_k wins.",
    )
    max_batch_tokens: int = Field(
        default=4096,
        ge=1,
        description="Token budget of one forward pass, counted as longest text x batch size "
        "(padding included).",
    )
    min_batch_tokens: int = Field(
        default=1024,
        ge=0,
        description="A batch that already costs this many tokens closes rather than take a "
        "text that would raise its padding share above max_padding_share.",
    )
    max_padding_share: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="Largest share of padding in a batch that has reached min_batch_tokens.",
    )
    max_batch_size: int = Field(
        default=128, ge=1, description="Most texts in one forward pass, whatever their length."
    )
    planner_window: int = Field(
        default=4096,
        ge=1,
        description="How many pending texts are sorted by length together before batches are "
        "cut. Larger windows pad less but hold more texts in memory.",
    )
    skip_bad_lines: bool = Field(
        default=False,
        description="When reading an input file, skip lines that cannot be decoded or lack "
        "the field, reporting them, instead of stopping at the first one.",
    )

    # --- generation ----------------------------------------------------------------------
    kv_cache_mb: float = Field(
        default=1024, gt=0,
        description="KV-cache budget of a generation model, in MiB. A request reserves "
        "prompt + max_new_tokens tokens for its whole life (counted as the rectangle of the "
        "padded batch cache) and waits until that fits; one that could never fit is refused.",
    )
    max_running_seqs: int = Field(
        default=64, ge=1, description="Most sequences decoded together in one step."
    )
    max_new_tokens: int = Field(
        default=256, ge=1,
        description="Tokens generated when a request does not say (max_tokens).",
    )
    prefill_tokens: int = Field(
        default=512, ge=1,
        description="Prompt tokens a generation model prefills per step (while sequences "
        "are decoding, no new prefill forward starts once prefill_group_tokens are spent). "
        "Waiting prompts that fit are prefilled together (prefill_group_tokens); a longer "
        "prompt is prefilled in chunks of this size, the running sequences decoding a "
        "token between chunks. Lower: smoother streams while long prompts arrive; higher: "
        "fewer, larger forwards.",
    )
    prefill_group_tokens: int = Field(
        default=128, ge=1,
        description="Padded prompt tokens several waiting prompts may share in one prefill "
        "forward (a prompt longer than this still runs whole, up to prefill_tokens). Each "
        "forward's requests get their first token as it ends: smaller gets a burst's first "
        "tokens out sooner; larger, fewer forwards.",
    )
    prefix_cache_mb: float = Field(
        default=256, ge=0,
        description="Memory kept for the keys and values of prompt prefixes already "
        "computed, in MiB (a shared system prompt, earlier chat turns), so a prompt that "
        "starts with one prefills only the rest; least recently used first out. 0 turns "
        "prefix reuse off. /metrics: sureserve_prefix_cache_*.",
    )
    max_schema_bytes: int = Field(
        default=65_536, ge=256,
        description="Largest JSON schema a request may constrain its output with "
        "(response_format, or all of its tools' parameters together), in bytes of JSON; "
        "larger is refused with 413 before any work (a huge schema would hold the "
        "generation worker while its grammar is built).",
    )
    direct_decode: bool = Field(
        default=True,
        description="Decode steps of Llama-family models (llama, mistral, qwen2) run the "
        "model's layers directly instead of through its forward: the same operations, "
        "bit-identical logits, less per-token overhead (BENCHMARKS.md). Off: every step "
        "through transformers' forward. /info's decode_path says which runs and why.",
    )
    decode_script: bool = Field(
        default=True,
        description="With direct_decode: run the decoder layers of a decode step in one "
        "TorchScript function (the same operations, bit-identical logits, less interpreter "
        "overhead per token; BENCHMARKS.md). Falls back to the Python loop, said in /info's "
        "decode_path, where a layer is quantized or TorchScript is unavailable.",
    )
    decode_kernel: bool = Field(
        default=True,
        description="With direct_decode, on a CPU: decode steps of up to 32 rows run as "
        "one call of sureserve's own kernel (compiled here once with the C compiler, cc or "
        "$CC; float32 and int8 weight-only layers) up to the row count where whole steps "
        "measured faster than torch's path on this machine and model (timed once, cached; "
        "/info's decode_path gives the figures and the row count it serves). Its sums run "
        "in another order than torch's: logits can differ in the last bits (greedy outputs "
        "are checked against transformers in the tests and the benchmark). Off: torch's "
        "kernels, bit-identical to the forward.",
    )
    decode_panels_mb: float = Field(
        default=1024.0, ge=0,
        description="With decode_kernel: most MiB of the kernel's panel copies of a "
        "generation model's float32 weights (each linear weight repacked once, at load, so "
        "that a decode step of any row count streams it once and every loaded vector "
        "serves up to 8 rows; measured on a 2-core AMD EPYC: a 32-row step's matmuls 1.3x "
        "faster than oneDNN's packed linears, 8 rows 2.2x faster than the row-major "
        "kernel, BENCHMARKS.md). Shapes measured no faster keep the row-major weights; the "
        "ones that save the most go first. Each row's products are the same whatever the "
        "number of rows decoded with it. Prompts' prefill forwards read them too, for the "
        "shapes whose panels measured faster than torch's product at 32 and 128 rows. "
        "/info's decode_path gives the figures. 0: none.",
    )
    decode_weight_layout: bool = Field(
        default=False,
        description="On a CPU, store each decoder weight shape in the memory order this "
        "machine's GEMM streams fastest for decoding (measured once per machine and shape; "
        "/info says which). Off by default: no end-to-end decode gain was established yet "
        "(BENCHMARKS.md); off keeps the checkpoint's row-major order.",
    )

    # --- server --------------------------------------------------------------------------
    host: str = Field(default="127.0.0.1", description="Address the server binds to "
                      "(loopback only by default; 0.0.0.0 exposes it to the network).")
    port: int = Field(default=8080, ge=0, le=65535, description="Port the server listens on.")
    api_key: str | None = Field(
        default=None,
        description="If set, every request must carry 'Authorization: Bearer <key>' "
        "(compared in constant time).",
    )
    open_health: bool = Field(
        default=True, description="Leave /health and /metrics open when an API key is set."
    )
    max_wait_ms: float = Field(
        default=2.0, ge=0,
        description="Longest a request waits for others to share its forward pass.",
    )
    max_queue_inputs: int = Field(
        default=1024, ge=1,
        description="Most inputs waiting for a model: for embed/classify/rerank the pieces "
        "queued for a forward (a text run as chunks counts once per chunk), for generation the "
        "sequences waiting for admission; a request beyond it gets 429 with Retry-After at "
        "once.",
    )
    max_client_batch: int = Field(
        default=256, ge=1, description="Most inputs one request may carry (413 beyond)."
    )
    max_payload_bytes: int = Field(
        default=2_000_000, ge=1, description="Largest request body accepted, in bytes (413)."
    )
    v1_rerank_truncation: Truncation | None = Field(
        default=None,
        description="Server: what /v1/rerank (the Cohere shape RAG frameworks send whole "
        "passages through) does with a (query, document) pair over the model's limit: error "
        "(413), truncate, or chunk (scored as its best chunk, the faithful one). Unset: the "
        "truncation setting. Every cut is listed in the answer's meta.warnings.",
    )
    packing: bool = Field(
        default=True,
        description="Server: lay short texts end to end in the rows of a forward pass "
        "(positions restarted and attention blocked per text) instead of padding each to "
        "the longest. Used only for embedding models whose packed outputs match padded ones "
        "on probe texts at warm-up (within the batch-invariance tolerance); logged either way.",
    )
    tokenizer_workers: int = Field(
        default=1, ge=1,
        description="Threads that tokenize requests and render chat templates in the server, "
        "off the event loop (Rust tokenizers release the GIL, so one long request does not "
        "hold up the others).",
    )
    forward_workers: int | None = Field(
        default=None, ge=1,
        description="Forward passes of one embedding or classification model that run at "
        "once (server and offline runs), each with an equal share of torch's threads. "
        "Default: 2 on a "
        "CPU with at least 2 cores (two single-threaded passes beat one two-threaded pass "
        "on small batches), 1 on a GPU or when a generation model is served too (torch's "
        "thread count is per process).",
    )

    # --- Ray (embed/classify --ray: Ray Data; serve --ray: Ray Serve) ----------------------
    ray: bool = Field(
        default=False,
        description="Run on Ray: embed/classify as a Ray Data job (one actor per replica, "
        "each with the model and its gate; the local job's formats, reader and writers); "
        "serve as Ray Serve replicas of the same app (Ray's proxy on host/port).",
    )
    replicas: int = Field(
        default=2, ge=1,
        description="With ray: Ray Data actors or Ray Serve replicas (each gets an equal "
        "share of the cluster's CPUs).",
    )
    ray_address: str | None = Field(
        default=None,
        description="With ray: a running Ray cluster (ray start --head ...); default: a local "
        "one started for the job, bound to 127.0.0.1.",
    )

    # --- Ray Serve (serve --ray) ------------------------------------------------------------
    ray_min_replicas: int | None = Field(
        default=None, ge=1,
        description="serve --ray: autoscale between this many replicas and ray_max_replicas "
        "(both needed; they replace --replicas). Ray Serve adds a replica when replicas "
        "carry more than ray_target_ongoing_requests each.",
    )
    ray_max_replicas: int | None = Field(
        default=None, ge=1, description="serve --ray: the most replicas autoscaling starts.",
    )
    ray_target_ongoing_requests: float = Field(
        default=2.0, gt=0,
        description="serve --ray with autoscaling: requests in flight per replica that "
        "Ray Serve aims for (more: it adds replicas; fewer: it removes them).",
    )
    ray_upscale_delay_s: float = Field(
        default=30.0, ge=0,
        description="serve --ray with autoscaling: how long the load must stay above target "
        "before a replica is added.",
    )
    ray_downscale_delay_s: float = Field(
        default=600.0, ge=0,
        description="serve --ray with autoscaling: how long the load must stay below target "
        "before a replica is removed.",
    )
    ray_max_queued_requests: int = Field(
        default=64, ge=1,
        description="serve --ray: requests Ray's proxy holds while every replica is full "
        "(each replica takes max_queue_inputs requests at once); beyond that it answers 429 "
        "with Retry-After.",
    )
    ray_health_check_period_s: float = Field(
        default=2.0, gt=0,
        description="serve --ray: how often Ray Serve checks each replica; a replica whose "
        "process died is replaced within about this long (Ray Serve's own default: 10 s).",
    )

    # --- drift watch ---------------------------------------------------------------------
    drift_watch: bool = Field(
        default=True,
        description="Watch each model's traffic and answers for drift (unreadable text, "
        "label mix, collapse, loops...); see README 'Drift watch'. A few numbers per input on "
        "the request path; the signals are computed off it.",
    )
    drift_window: int = Field(
        default=1000, ge=20,
        description="Inputs in the drift watch's rolling window (and in the baseline taken "
        "from the first traffic). An alert starts and clears within one window of traffic; "
        "signals wait for a fifth of a window (at least 10 inputs).",
    )
    drift_reference: Path | None = Field(
        default=None,
        description="File of typical inputs (.txt, .jsonl or .csv; its first ten windows) run "
        "through each model at load as the drift baseline. Without it the first window of "
        "traffic is the baseline (/info says which).",
    )
    drift_unhealthy: bool = Field(
        default=False,
        description="Answer /health with 503 (not 200 'degraded') while a drift alert is on, "
        "for orchestrators that should take the replica out of rotation.",
    )
    drift_unknown_tokens: float = Field(
        default=0.02, gt=0, le=1,
        description="Drift alert: share of tokens mapped to the unknown token, above the "
        "baseline's (the gate's probe texts until the baseline is complete).",
    )
    drift_cut_share: float = Field(
        default=0.05, gt=0, le=1,
        description="Drift alert: share of inputs over the usable maximum (truncated, chunked "
        "or refused), above the baseline's.",
    )
    drift_empty_inputs: float = Field(
        default=0.05, gt=0, le=1,
        description="Drift alert: share of empty or whitespace-only inputs, above the "
        "baseline's.",
    )
    drift_length_psi: float = Field(
        default=0.25, gt=0,
        description="Drift alert: population stability index of input lengths vs the "
        "baseline (0.25: the usual 'significant shift').",
    )
    drift_label_js: float = Field(
        default=0.03, gt=0, le=1,
        description="Drift alert (classify): Jensen-Shannon divergence in bits of the "
        "predicted label mix vs the baseline's.",
    )
    drift_label_share: float = Field(
        default=0.95, gt=0, le=1,
        description="Drift alert (classify): share of one label in the window (the 'every "
        "answer is positive' incident), unless the baseline already had that share.",
    )
    drift_top_score_drop: float = Field(
        default=0.05, gt=0, le=1,
        description="Drift alert (classify): drop of the mean top-label probability from "
        "the baseline's.",
    )
    drift_collapse: float = Field(
        default=0.30, gt=0, le=1,
        description="Drift alert (embed): share of the distance from the baseline's mean "
        "pairwise cosine to 1 (all embeddings identical) that the window has closed.",
    )
    drift_mean_shift: float = Field(
        default=0.15, gt=0, le=2,
        description="Drift alert (embed): 1 - cosine between the window's mean embedding "
        "and the baseline's.",
    )
    drift_active_terms: float = Field(
        default=1.0, gt=0, le=10,
        description="Drift alert (sparse): |log2| of the window's mean non-zero terms per "
        "text over the baseline's (1: halved or doubled).",
    )
    drift_finish_js: float = Field(
        default=0.10, gt=0, le=1,
        description="Drift alert (generate): Jensen-Shannon divergence in bits of finish "
        "reasons (stop, length, error) vs the baseline's.",
    )
    drift_empty_outputs: float = Field(
        default=0.10, gt=0, le=1,
        description="Drift alert (generate): share of completions with no visible text, "
        "above the baseline's.",
    )
    drift_loops: float = Field(
        default=0.20, gt=0, le=1,
        description="Drift alert (generate): share of completions that end in a short "
        "block of tokens repeated 3+ times, above the baseline's.",
    )

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                                 for e in exc.errors())
            raise SettingsError(f"invalid setting: {problems}", "check the flag or the "
                                "SURESERVE_* environment variable of that name") from exc

    @field_validator("quantization")
    @classmethod
    def _known_method(cls, value: str | None) -> str | None:
        from sureserve.loading.precision import METHODS

        if value is not None and value not in METHODS:
            raise ValueError(f"unknown method {value!r}; use one of {', '.join(METHODS)}")
        return value

    @classmethod
    def help(cls, name: str) -> str:
        """Help text of one field plus its environment variable, for CLI flags."""
        field = cls.model_fields[name]
        return f"{field.description} [env: SURESERVE_{name.upper()}]"

    @classmethod
    def build(cls, **overrides: Any) -> Settings:
        """Settings from env + the overrides that are not None (None: "not given")."""
        return cls(**{k: v for k, v in overrides.items() if v is not None})

    @classmethod
    def table(cls) -> str:
        """The README's settings table, generated from the fields."""
        rows = ["| env var | default | meaning |", "|---|---|---|"]
        for name, f in cls.model_fields.items():
            default = "none" if f.default is None else str(f.default).lower() \
                if isinstance(f.default, bool) else str(f.default)
            rows.append(f"| `SURESERVE_{name.upper()}` | `{default}` | {f.description} |")
        return "\n".join(rows)

    def home_dir(self) -> Path:
        return self.home.expanduser()


#: which commands get which flags: each command names the groups it takes
GROUPS: dict[str, tuple[str, ...]] = {
    "source": ("home", "allow_download", "allow_pickle", "trust_remote_code"),
    "plan": ("device", "dtype", "attn_implementation", "quantization", "allow_offload",
             "onednn_cache_capacity", "packed_linear", "packed_linear_mb",
             "accept_gate_failure"),
    "batching": ("truncation", "chunk_stride", "max_batch_tokens", "min_batch_tokens",
                 "max_padding_share", "max_batch_size", "planner_window", "skip_bad_lines",
                 "forward_workers", "sparse_top_k"),
    "generation": ("kv_cache_mb", "max_running_seqs", "max_new_tokens", "prefill_tokens",
                   "prefill_group_tokens",
                   "prefix_cache_mb", "max_schema_bytes", "direct_decode", "decode_script",
                   "decode_kernel", "decode_panels_mb",
                   "decode_weight_layout"),
    "drift": ("drift_watch", "drift_window", "drift_reference", "drift_unhealthy",
              "drift_unknown_tokens", "drift_cut_share", "drift_empty_inputs",
              "drift_length_psi", "drift_label_js", "drift_label_share", "drift_top_score_drop",
              "drift_collapse", "drift_mean_shift", "drift_active_terms", "drift_finish_js",
              "drift_empty_outputs", "drift_loops"),
    "ray": ("ray", "replicas", "ray_address"),
    "ray_serve": ("ray_min_replicas", "ray_max_replicas", "ray_target_ongoing_requests",
                  "ray_upscale_delay_s", "ray_downscale_delay_s", "ray_max_queued_requests",
                  "ray_health_check_period_s"),
    "server": ("host", "port", "api_key", "open_health", "max_wait_ms", "max_queue_inputs",
               "max_client_batch", "max_payload_bytes", "packing", "tokenizer_workers",
               "v1_rerank_truncation"),
}
