"""Every error sureserve raises on purpose, in one place.

Each error carries three things a user needs: what went wrong (``message``), what to do
about it (``fix``), and the HTTP status the server answers with (``http_status``). Errors
from torch / transformers / tokenizers are converted into these at the boundary with
``raise ... from exc`` so the original traceback is kept.

    SureserveError                       500
    ├── SettingsError                    400  a setting has an invalid value
    ├── ModelSourceError                 404  an identifier that resolves to nothing usable
    │   └── UnsafeWeightsError           400  pickled weights refused (pickle runs code)
    ├── TaskMismatchError                400  asked task does not fit the model found
    ├── BuildError                       500  a zoo entry or corpus could not be built
    ├── InputError                       422  a request's input is unusable
    │   ├── InputTooLongError            413  a text exceeds the usable token maximum
    │   ├── TooManyInputsError           413  more inputs than a request may carry
    │   └── BadLineError                 422  a line of an input file cannot be read
    ├── OverloadedError                  429  the queue is full; retry later
    ├── AuthError                        401  missing or wrong API key
    ├── NotReadyError                    503  the model is still loading, or failed to load
    ├── ClientGoneError                  499  the client disconnected before the answer
    ├── GateError                        503  the model failed its preflight checks
    └── InferenceError                   500  the model raised while running an input
"""

from __future__ import annotations


class SureserveError(Exception):
    """Base class: a message, a fix hint and an HTTP status."""

    http_status: int = 500
    #: short machine-readable name used in JSON error bodies
    code: str = "internal_error"

    def __init__(self, message: str, fix: str = "", *, http_status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix
        if http_status is not None:
            self.http_status = http_status

    def __str__(self) -> str:
        if self.fix:
            return f"{self.message}\n  fix: {self.fix}"
        return self.message

    def to_dict(self) -> dict[str, object]:
        return {"error": self.message, "fix": self.fix, "code": self.code}

    def openai_body(self) -> dict[str, object]:
        """The error in OpenAI's shape (HTTP /v1 answers and server-sent events alike)."""
        message = f"{self.message}. Fix: {self.fix}" if self.fix else self.message
        return {"error": {"message": message, "type": self.code, "param": None,
                          "code": self.code}}


class SettingsError(SureserveError):
    http_status, code = 400, "invalid_setting"


class ModelSourceError(SureserveError):
    http_status, code = 404, "model_not_found"


class UnsafeWeightsError(ModelSourceError):
    http_status, code = 400, "unsafe_weights"


class TaskMismatchError(SureserveError):
    http_status, code = 400, "task_mismatch"


class BuildError(SureserveError):
    http_status, code = 500, "build_failed"


class InputError(SureserveError):
    http_status, code = 422, "invalid_input"


class InputTooLongError(InputError):
    http_status, code = 413, "input_too_long"

    def __init__(
        self, message: str, fix: str = "", *, index: int = -1, length: int = 0, limit: int = 0
    ) -> None:
        super().__init__(message, fix)
        self.index = index
        self.length = length
        self.limit = limit


class TooManyInputsError(InputError):
    http_status, code = 413, "too_many_inputs"


class BadLineError(InputError):
    code = "bad_line"

    def __init__(self, message: str, fix: str = "", *, line: int = 0) -> None:
        super().__init__(message, fix)
        self.line = line


class OverloadedError(SureserveError):
    http_status, code = 429, "overloaded"

    def __init__(self, message: str, fix: str = "", *, retry_after_s: float = 1.0) -> None:
        super().__init__(message, fix)
        self.retry_after_s = retry_after_s

    @classmethod
    def queue_full(cls, queued: int, adding: int, limit: int, what: str) -> OverloadedError:
        """The server's one backpressure refusal (429 + Retry-After), naming its setting."""
        return cls(f"the server is at capacity: {queued} {what} are queued and this request "
                   f"adds {adding} (limit {limit})",
                   "retry after the Retry-After delay; operators can raise --max-queue-inputs "
                   "(SURESERVE_MAX_QUEUE_INPUTS)", retry_after_s=1.0)


class AuthError(SureserveError):
    http_status, code = 401, "unauthorized"


class NotReadyError(SureserveError):
    http_status, code = 503, "model_not_ready"


class ClientGoneError(SureserveError):
    # nginx's "client closed request": nobody reads the answer; logs and metrics do
    http_status, code = 499, "client_disconnected"


class GateError(SureserveError):
    http_status, code = 503, "gate_failed"


class InferenceError(SureserveError):
    http_status, code = 500, "inference_failed"
