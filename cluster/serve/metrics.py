"""Replica metrics through `ray.util.metrics` (exported by Ray's Prometheus endpoint, prefixed
`ray_`): queue depth, KV bytes, prefill / decode throughput, cache hit ratio, request outcomes.
The replica's monitor (`monitor.py`) calls `on_step` with each stats refresh of the engine loop
(also about once a second while idle, so the gauges stay exported) and `on_finish` (with the TTFT
it measured). The serving port's own `/metrics`, vLLM's metric set,
is `prometheus.py`'s."""
from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

from retroinfer.engine.protocol import EngineStats


class ReplicaMetrics:
    def __init__(self, replica: str, model: str):
        self.tags = {"replica": replica, "model": model}
        keys = ("replica", "model")

        def gauge(name, desc):
            g = Gauge(name, desc, tag_keys=keys)
            g.set_default_tags(self.tags)
            return g

        self.waiting = gauge("retroinfer_queue_depth", "Requests admitted and waiting for prefill")
        self.running = gauge("retroinfer_running_requests", "Requests in the decode batch")
        self.kv_used = gauge("retroinfer_kv_used_bytes", "KV cache bytes held by sequences")
        self.kv_capacity = gauge("retroinfer_kv_capacity_bytes", "KV cache capacity of the replica")
        self.kv_outstanding = gauge("retroinfer_kv_outstanding_bytes", "KV bytes promised to admitted requests")
        self.prefill_tps = gauge("retroinfer_prefill_tokens_per_s", "Prefill throughput of the last prefill")
        self.decode_tps = gauge("retroinfer_decode_tokens_per_s", "Decode throughput of the last step")
        self.hit_ratio = gauge("retroinfer_cache_hit_ratio",
                               "Share of retrieved clusters found in the GPU cluster cache since start (wave buffer)")
        self.requests = Counter("retroinfer_requests_total", "Requests by outcome",
                                tag_keys=keys + ("outcome",))
        self.requests.set_default_tags(self.tags)
        self.tokens = Counter("retroinfer_generated_tokens_total", "Tokens generated", tag_keys=keys)
        self.tokens.set_default_tags(self.tags)
        self.ttft = Histogram("retroinfer_time_to_first_token_s", "Time to first token",
                              boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800], tag_keys=keys)
        self.ttft.set_default_tags(self.tags)

    def on_step(self, s: EngineStats) -> None:
        self.waiting.set(s.waiting)
        self.running.set(s.running)
        self.kv_used.set(s.used_bytes)
        self.kv_capacity.set(s.capacity_bytes)
        self.kv_outstanding.set(s.outstanding_bytes)
        if s.prefill_s:
            self.prefill_tps.set(s.prefill_tokens / s.prefill_s)
        if s.decode_s:
            self.decode_tps.set(s.decode_batch / s.decode_s)
        if s.cache_hit_ratio is not None:
            self.hit_ratio.set(float(s.cache_hit_ratio))

    def on_finish(self, outcome: str, completion_tokens: int, ttft_s: float | None) -> None:
        self.requests.inc(1, tags={"outcome": outcome})
        if completion_tokens:
            self.tokens.inc(completion_tokens)
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
