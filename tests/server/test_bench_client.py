"""The serve benchmark's raw keep-alive HTTP client, against the real server."""

from __future__ import annotations

import asyncio

import pytest

from sureserve.bench.serve import _load
from tests.server.conftest import Server

pytestmark = pytest.mark.e2e


def test_load_generator_counts_answers_and_errors(server: Server) -> None:
    row = asyncio.run(_load(server.url, ["hello there", "a second text"], 3, 1.0, 12))
    assert row["requests"] == 12 and row["errors"] == 0
    assert row["p50_ms"] > 0 and row["clients"] == 3
    bad = asyncio.run(_load(server.url, [""], 1, 1.0, 2))  # empty input: 422, counted
    assert bad["requests"] == 0 and bad["errors"] == 2
