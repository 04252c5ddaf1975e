"""Truncation policy and batch planning: pure Python, no torch, no I/O."""

from sureserve.batching.planner import (
    Batch,
    PassCost,
    cut,
    oldest_batch,
    partition,
    plan_batches,
)
from sureserve.batching.truncation import Piece, PolicyResult, apply_policy, chunk_spans

__all__ = ["Batch", "PassCost", "Piece", "PolicyResult", "apply_policy",
           "chunk_spans", "cut", "oldest_batch", "partition", "plan_batches"]
