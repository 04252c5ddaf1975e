import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sureserve.batching.truncation import apply_policy, chunk_spans
from sureserve.errors import InputError, InputTooLongError, SettingsError

CLS, SEP = 101, 102


def wrap(n: int, start: int = 1000) -> list[int]:
    return [CLS, *range(start, start + n), SEP]


def test_error_names_index_length_limit_and_setting() -> None:
    ids = [wrap(3), wrap(20)]
    with pytest.raises(InputTooLongError) as exc:
        apply_policy(ids, 10, "error", prefix=1, suffix=1, bound_by="tokenizer limit",
                     first_index=5)
    e = exc.value
    assert (e.index, e.length, e.limit) == (6, 22, 10)
    assert "text 6" in e.message and "22 tokens" in e.message and "10" in e.message
    assert "tokenizer limit" in e.message
    assert "--truncation" in e.fix and "SURESERVE_TRUNCATION" in e.fix
    assert e.http_status == 413


def test_truncate_keeps_special_tokens_and_reports() -> None:
    res = apply_policy([wrap(3), wrap(20)], 10, "truncate", prefix=1, suffix=1)
    assert res.truncated == [1]
    short, cut = res.pieces
    assert short.ids == wrap(3)
    assert cut.ids == [CLS, *range(1000, 1008), SEP]
    assert len(cut.ids) == 10


def test_left_truncation_keeps_the_end_and_the_special_tokens() -> None:
    res = apply_policy([wrap(3), wrap(20)], 10, "truncate", prefix=1, suffix=1,
                       direction="left")
    assert res.truncated == [1]
    assert res.pieces[0].ids == wrap(3)
    assert res.pieces[1].ids == [CLS, *range(1012, 1020), SEP]
    with pytest.raises(InputError, match="truncation_direction 'up'"):
        apply_policy([wrap(3)], 10, "truncate", prefix=1, suffix=1, direction="up")


def test_chunk_windows_overlap_and_cover_everything() -> None:
    res = apply_policy([wrap(20)], 10, "chunk", prefix=1, suffix=1, stride=3)
    windows = [p.ids for p in res.pieces]
    assert all(w[0] == CLS and w[-1] == SEP and len(w) <= 10 for w in windows)
    content = set()
    for w in windows:
        content.update(w[1:-1])
    assert content == set(range(1000, 1020))
    assert res.chunked == {0: len(windows)}
    # consecutive windows share `stride` tokens (the last one is end-aligned: at least that)
    assert len(set(windows[0][1:-1]) & set(windows[1][1:-1])) == 3


@given(n=st.integers(1, 2000), room=st.integers(2, 300), data=st.data())
def test_chunk_spans_property(n: int, room: int, data: st.DataObject) -> None:
    stride = data.draw(st.integers(0, room - 1))
    spans = chunk_spans(n, room, stride)
    assert spans[0][0] == 0 and spans[-1][1] == n
    for (_a, b), (c, _) in itertools.pairwise(spans):
        assert c <= b  # no gap
    assert all(0 < e - s <= room for s, e in spans)


def test_stride_too_large_is_a_settings_error() -> None:
    with pytest.raises(SettingsError) as exc:
        apply_policy([wrap(30)], 10, "chunk", prefix=1, suffix=1, stride=8)
    assert "SURESERVE_CHUNK_STRIDE" in exc.value.fix


def test_unknown_mode() -> None:
    with pytest.raises(SettingsError):
        apply_policy([wrap(1)], 10, "drop", prefix=1, suffix=1)
