"""Attention backends: `full` (dense, paged KV), `wave` (the three-zone wave index) and `quest`
(page top-k by a min/max key bound over full's paged KV: the baseline of the accuracy benchmarks)."""
from .base import AttentionBackend, KVCapacityError, make_backend

__all__ = ["AttentionBackend", "KVCapacityError", "make_backend"]
