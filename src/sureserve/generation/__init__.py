"""Text generation: continuous batching over one KV cache (see engine.py)."""
