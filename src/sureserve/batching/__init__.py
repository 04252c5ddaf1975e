"""Truncation policy and batch planning: pure Python, no torch, no I/O."""

from sureserve.batching.planner import Batch, BatchPlanner, cut, plan_batches
from sureserve.batching.truncation import Piece, PolicyResult, apply_policy, chunk_spans

__all__ = ["Batch", "BatchPlanner", "Piece", "PolicyResult", "apply_policy", "chunk_spans",
           "cut", "plan_batches"]
