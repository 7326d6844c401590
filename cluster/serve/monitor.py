"""What a replica tells the world about itself, apart from tokens: per-request timings (vLLM's
metric set, `prometheus.RequestMetrics`), the Ray gauges and counters (`metrics.ReplicaMetrics`,
optional) and the engine's wave-buffer numbers. The engine loop feeds it (`LoopObserver`): requests
as they are admitted, scheduled and answered, on the loop's thread with one timestamp per engine
step, and the engine's typed stats (`EngineStats`) about every `stats_interval_s`, busy or idle.
The routing figures the router polls are `routing.report`'s, from the same stats."""
from __future__ import annotations

from typing import Protocol

from retroinfer.engine.protocol import EngineStats

from .metrics import ReplicaMetrics
from .prometheus import ENGINE_KEYS, RequestMetrics


class LoopObserver(Protocol):
    """What the engine loop reports as it runs (`engine_loop.EngineLoop`)."""

    def admitted(self, request_id: str, prompt_tokens: int) -> None: ...

    def scheduled(self, request_id: str) -> None: ...

    def output(self, request_id: str, completion_tokens: int, finished: bool, reason, t: float) -> None: ...

    def forget(self, request_id: str) -> None: ...

    def engine_stats(self, stats: EngineStats) -> None: ...


class ReplicaMonitor:
    """A `LoopObserver` that keeps the request metrics and, when Ray's metrics agent is there,
    sets the Ray gauges from each stats refresh and counts each request's outcome."""

    def __init__(self, ray_metrics: ReplicaMetrics | None = None):
        self.requests = RequestMetrics()
        self.ray = ray_metrics

    # -- LoopObserver --------------------------------------------------------------------------
    def admitted(self, request_id: str, prompt_tokens: int) -> None:
        self.requests.admitted(request_id, prompt_tokens)

    def scheduled(self, request_id: str) -> None:
        self.requests.scheduled(request_id)

    def output(self, request_id: str, completion_tokens: int, finished: bool, reason, t: float) -> None:
        done = self.requests.output(request_id, completion_tokens, finished, reason, t)
        if done is not None and self.ray is not None:
            self.ray.on_finish(*done)

    def forget(self, request_id: str) -> None:
        self.requests.forget(request_id)

    def engine_stats(self, stats: EngineStats) -> None:
        if self.ray is not None:
            self.ray.on_step(stats)

    # -- the replica's own ---------------------------------------------------------------------
    def rejected(self, code: str, status: int) -> None:
        """A request the replica refused (counted here, not as an outcome of the engine's)."""
        self.requests.rejected(code)
        if self.ray is not None:
            self.ray.on_finish("rejected_%d" % status, 0, None)

    def report(self, stats: EngineStats) -> dict:
        """The request metrics' snapshot and the engine's wave-buffer numbers (`engine`), which the
        ingress renders at /metrics."""
        flat = stats.as_dict()
        return {**self.requests.snapshot(), "engine": {k: flat[k] for k in ENGINE_KEYS if flat.get(k) is not None}}
