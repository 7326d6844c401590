"""An executor without a model (`protocol.Executor`), for scheduler and engine tests on any
machine: KV capacity counted in tokens, a prefill that yields exactly as the real one does (once
per chunk per layer), and a decode whose token for a sequence is a fixed function of its last
token and position. Every unit of work is logged in `events`, in order:

  ("reserve", seq_id)  ("prefill", seq_id, layer, chunk_start)  ("decode", (seq_id, ...))  ("free", seq_id)
"""
from __future__ import annotations

import time
from typing import Callable, Hashable

import torch

from ..attention import KVCapacityError
from ..config import ModelConfig
from .protocol import EngineStats


class FakeExecutor:
    def __init__(self, model_cfg: ModelConfig, prefill_chunk: int, capacity_tokens: int, *,
                 unit_s: float = 0.0, decode_s: float = 0.0):
        self.num_layers, self.chunk, self.capacity = model_cfg.num_layers, prefill_chunk, capacity_tokens
        self.vocab = model_cfg.vocab_size
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.bytes_per_token = model_cfg.kv_bytes_per_token(self.dtype)
        self.unit_s, self.decode_s = unit_s, decode_s     # simulated time of a prefill unit, a decode step
        self.held: dict[Hashable, int] = {}
        self.events: list[tuple] = []

    def reserve(self, seq_id: Hashable, num_tokens: int) -> None:
        if num_tokens > self.capacity:
            raise KVCapacityError(f"{num_tokens} tokens exceed the capacity of {self.capacity}", ever=False)
        if sum(self.held.values()) + num_tokens > self.capacity:
            raise KVCapacityError(f"{num_tokens} tokens: {self.capacity - sum(self.held.values())} free", ever=True)
        self.held[seq_id] = num_tokens
        self.events.append(("reserve", seq_id))

    def free(self, seq_id: Hashable) -> None:
        if self.held.pop(seq_id, None) is not None:
            self.events.append(("free", seq_id))

    def prefill_steps(self, seq_id: Hashable, ids: torch.Tensor, progress: Callable[[int], None] | None = None):
        T = len(ids)
        for layer in range(self.num_layers):
            for s in range(0, T, self.chunk):
                assert seq_id in self.held, f"prefill of {seq_id!r} without its KV"
                if self.unit_s:
                    time.sleep(self.unit_s)
                self.events.append(("prefill", seq_id, layer, s))
                yield
            if progress is not None:
                progress(layer)
        return self._logits([int(ids[-1])], [T - 1])

    def decode(self, seq_ids: list, ids: torch.Tensor, positions: torch.Tensor, sampled_rows=None) -> torch.Tensor:
        assert all(s in self.held for s in seq_ids)
        if self.decode_s:
            time.sleep(self.decode_s)
        self.events.append(("decode", tuple(seq_ids)))
        return self._logits(ids.tolist(), positions.tolist())

    def _logits(self, last: list[int], pos: list[int]) -> torch.Tensor:
        out = torch.zeros(len(last), self.vocab)
        for i, (t, p) in enumerate(zip(last, pos)):
            out[i, 32 + (31 * t + 7 * p + 1) % 95] = 1.0     # printable ASCII bytes
        return out

    def stats(self) -> EngineStats:
        return EngineStats(capacity_bytes=self.capacity * self.bytes_per_token,
                           used_bytes=sum(self.held.values()) * self.bytes_per_token)

    def shutdown(self) -> None:
        pass
