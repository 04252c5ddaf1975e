"""Releasing generated text safely: stop strings across token boundaries, split UTF-8."""

from __future__ import annotations

from collections.abc import Sequence

from sureserve.generation.textstream import TextStream


class BytesTok:
    """Each id is a byte string; decoding joins them like a byte-level BPE does."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def _run(pieces: list[bytes], stops: Sequence[str]) -> tuple[list[str], str, bool]:
    ts = TextStream(BytesTok(pieces), stops)
    deltas, hit = [], False
    for n in range(1, len(pieces) + 1):
        d, hit = ts.push(range(n), final=n == len(pieces))
        deltas.append(d)
        if hit:
            break
    return deltas, ts.released, hit


def test_stop_string_spanning_three_tokens_is_never_half_streamed() -> None:
    deltas, text, hit = _run([b"The end", b" is ne", b"ar. ", b"EN", b"D", b" more"], ["near. END"])
    assert hit and text == "The end is "
    assert "".join(deltas) == text
    assert all("ne" not in d for d in deltas)  # the stop's start was held back


def test_held_back_text_is_released_when_it_turns_out_not_to_be_a_stop() -> None:
    deltas, text, hit = _run([b"a", b"<", b"b", b"<", b"/s"], ["</s>"])
    assert not hit and text == "a<b</s"  # final: everything held back is released
    assert deltas[:3] == ["a", "", "<b"]


def test_split_utf8_character_is_held_until_complete() -> None:
    e_acute = "é".encode()
    deltas, text, _ = _run([b"caf", e_acute[:1], e_acute[1:], b"!"], [])
    assert "\ufffd" not in "".join(deltas)
    assert deltas == ["caf", "", "é", "!"] and text == "café!"


def test_earliest_of_several_stops_wins() -> None:
    _, text, hit = _run([b"one, two. three"], [".", ","])
    assert hit and text == "one"
