"""Attention backends: `full` (dense, paged KV) and `wave` (the three-zone wave index)."""
from .base import AttentionBackend, KVCapacityError, make_backend

__all__ = ["AttentionBackend", "KVCapacityError", "make_backend"]
