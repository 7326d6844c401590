"""The attention backend contract: what every backend (full.py, wave.py, quest.py) implements."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Hashable

import torch

from ..config import ModelConfig
from ..kernels import next_pow2


class KVCapacityError(RuntimeError):
    """A sequence's KV does not fit now. `ever`: it could fit once other sequences free theirs
    (False: it is larger than the whole cache, and never fits)."""

    def __init__(self, msg: str, ever: bool):
        super().__init__(msg)
        self.ever = ever


class AttentionBackend(ABC):
    """Owns the KV cache of a range of layers for every sequence on one device.

    Life of a sequence: `reserve` its whole footprint (prompt + max new tokens) before any work, so
    a running sequence never meets an out-of-memory; `write_prefill` once per layer with the
    prompt's K/V (attention over the prompt itself is dense and done by the model); each decode
    step calls `plan_decode` once, then `decode` for every layer, which appends the step's K/V and
    returns the attention output; `free` returns everything.

    A backend whose `decode` never synchronises with the host may offer CUDA-graph replay by
    defining `graph_key(plan)` (plans with equal keys share a graph), `static_plan(batch, plan)`
    (buffers for a padded batch) and `load_static_plan(static, plan)`; `graph_batch(n)` is the
    padded batch that n sequences are captured at: a power of two, capped at `max_rows` where the
    backend holds a fixed number of sequences (wave: one slot each).
    """
    max_rows: int | None = None

    def __init__(self, cfg: ModelConfig, layer_ids: range, device: torch.device, dtype: torch.dtype):
        self.cfg, self.layer_ids, self.device, self.dtype = cfg, layer_ids, torch.device(device), dtype
        self.scale = cfg.head_dim ** -0.5

    @property
    def bytes_per_token(self) -> int:
        """KV bytes of one token over this backend's layers."""
        return self.cfg.kv_bytes_per_token(self.dtype, len(self.layer_ids))

    @abstractmethod
    def reserve(self, seq_id: Hashable, num_tokens: int) -> None: ...

    @abstractmethod
    def write_prefill(self, layer: int, seq_id: Hashable, k: torch.Tensor, v: torch.Tensor,
                      start: int) -> None: ...

    @abstractmethod
    def plan_decode(self, seq_ids: list[Hashable]) -> Any: ...

    @abstractmethod
    def decode(self, layer: int, plan: Any, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> torch.Tensor: ...

    def graph_batch(self, n: int) -> int:
        return next_pow2(n) if self.max_rows is None else min(next_pow2(n), self.max_rows)

    def finish_step(self, plan: Any) -> None:
        """Host-side maintenance once every layer has run the step (outside any CUDA graph)."""

    @abstractmethod
    def free(self, seq_id: Hashable) -> None: ...

    @abstractmethod
    def stats(self) -> dict: ...

    def reset_metrics(self) -> None:
        """Restart the per-step counters that `stats` reports (PCIe bytes, cache hits)."""
