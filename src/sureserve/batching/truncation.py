"""The truncation policy: what happens to a text longer than the usable maximum.

Pure functions over token ids; nothing is ever cut silently.

* ``error``: refuse, naming the text's index, its length, the limit and the setting.
* ``truncate``: keep the first tokens that fit; each truncated text is reported.
* ``chunk``: split the text's content tokens into overlapping chunks (``stride`` tokens
  of overlap), each wrapped in the model's own special tokens; the task combines the
  chunks' outputs weighted by their token counts.

A text is tokenized once, with its special tokens; ``prefix``/``suffix`` say how many of
those special tokens stand before and after the content (BERT: [CLS] … [SEP] → 1 and 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from sureserve.errors import InputError, InputTooLongError, SettingsError

MODES = ("error", "truncate", "chunk")
DIRECTIONS = ("right", "left")


@dataclass(frozen=True)
class Piece:
    """One unit of model input: a whole text, a truncated text or one chunk of a text."""

    text_index: int
    ids: list[int]
    #: where the second segment of a pair starts (a reranker's text after its query), for
    #: models with token types; 0: one segment
    segment_at: int = 0

    @property
    def weight(self) -> int:
        return len(self.ids)


@dataclass
class PolicyResult:
    pieces: list[Piece]
    truncated: list[int]  # indices of texts cut by "truncate"
    chunked: dict[int, int]  # text index -> number of chunks, for texts split by "chunk"
    lengths: list[int] = field(default_factory=list)  # each text's tokens before any cut


def too_long_error(index: int, length: int, limit: int, bound_by: str) -> InputTooLongError:
    return InputTooLongError(
        f"text {index} is {length} tokens long; the usable maximum is {limit} "
        f"(set by the {bound_by})",
        "shorten it, or choose a truncation policy: --truncation truncate (cut and report) "
        "or --truncation chunk (split into chunks), also SURESERVE_TRUNCATION",
        index=index, length=length, limit=limit,
    )


def apply_policy(
    ids: Sequence[list[int]],
    limit: int,
    mode: str,
    *,
    prefix: int,
    suffix: int,
    stride: int = 32,
    bound_by: str = "model",
    first_index: int = 0,
    direction: str = "right",
) -> PolicyResult:
    """Turn tokenized texts into pieces that each fit ``limit`` tokens. ``direction``
    (TEI's ``truncation_direction``): which end ``truncate`` cuts, "right" (keep the start)
    or "left" (keep the end: the latest turns of a conversation, a log's last lines); the
    special tokens stay either way."""
    if mode not in MODES:
        raise SettingsError(f"unknown truncation policy {mode!r}", f"use one of {', '.join(MODES)}")
    if direction not in DIRECTIONS:
        raise InputError(f"truncation_direction {direction!r} is not one of "
                         f"{', '.join(DIRECTIONS)}", '"right" keeps the start of a text, '
                         '"left" its end')
    room = limit - prefix - suffix  # content tokens one piece can carry
    if room < 1:
        raise SettingsError(f"the usable maximum {limit} leaves no room for text after "
                            f"{prefix + suffix} special tokens", "raise the model's limit")
    if mode == "chunk" and stride >= room:
        raise SettingsError(f"chunk stride {stride} must be below the chunk's {room} content "
                            "tokens", "lower --chunk-stride (SURESERVE_CHUNK_STRIDE)")
    result = PolicyResult([], [], {})
    for offset, seq in enumerate(ids):
        i = first_index + offset
        result.lengths.append(len(seq))
        if len(seq) <= limit:
            result.pieces.append(Piece(i, seq))
            continue
        if mode == "error":
            raise too_long_error(i, len(seq), limit, bound_by)
        head, body, tail = seq[:prefix], seq[prefix:len(seq) - suffix], seq[len(seq) - suffix:]
        if mode == "truncate":
            kept = body[:room] if direction == "right" else body[len(body) - room:]
            result.pieces.append(Piece(i, head + kept + tail))
            result.truncated.append(i)
            continue
        spans = chunk_spans(len(body), room, stride)
        result.chunked[i] = len(spans)
        for start, end in spans:
            result.pieces.append(Piece(i, head + body[start:end] + tail))
    return result


def chunk_spans(n: int, room: int, stride: int) -> list[tuple[int, int]]:
    """[start, end) chunks of ``room`` tokens over ``n`` tokens, overlapping by ``stride``.

    The last chunk is aligned to the end so that it is full length (more context for the
    text's last tokens) rather than a short remainder.
    """
    if n <= room:
        return [(0, n)]
    step = room - stride
    spans = []
    start = 0
    while start + room < n:
        spans.append((start, start + room))
        start += step
    spans.append((n - room, n))
    return spans
