"""Serving metrics in Prometheus's text format, vLLM's metric set under the prefix `retroinfer:`.

Each engine replica keeps a `RequestMetrics` (in its `monitor.ReplicaMonitor`): counters and
histograms that its engine loop feeds as it admits requests and delivers their outputs, with one timestamp per engine step (when that
step's tokens became available), so inter-token latency is measured, not derived from averages.
The replica publishes `snapshot()` with its routing stats (`record_routing_stats`, polled by Serve
every `routing_stats_period_s`, busy or idle), and the ingress renders every replica's latest
report at `GET /metrics` with `render` (a series per replica, labelled `replica`). So a scrape
never waits on a busy replica, and a report is at most one routing-stats period old.
"""
from __future__ import annotations

import bisect
import math
import threading
import time
from dataclasses import dataclass

PREFIX = "retroinfer:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _1_2_5(limit: int) -> tuple[float, ...]:
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > limit:
                return tuple(out)
            out.append(float(m * scale))
        scale *= 10


# vLLM's buckets (v1 metrics), with finer ITL buckets below 10 ms (a small model decodes faster)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
               5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)
TOKEN_BUCKETS = _1_2_5(10_000_000)

HISTOGRAMS = {   # name: (help, buckets)
    "time_to_first_token_seconds": ("Time from admission by the engine replica to the request's first token",
                                    TTFT_BUCKETS),
    "inter_token_latency_seconds": ("Time between a request's successive tokens (vLLM v1's name; formerly "
                                    "time_per_output_token_seconds)", ITL_BUCKETS),
    "e2e_request_latency_seconds": ("Time from admission by the engine replica to the request's end",
                                    REQUEST_BUCKETS),
    "request_queue_time_seconds": ("Time a request waited for its KV before its prefill began", REQUEST_BUCKETS),
    "request_prefill_time_seconds": ("Time from the start of a request's prefill to its first token",
                                     REQUEST_BUCKETS),
    "request_decode_time_seconds": ("Time from a request's first token to its last", REQUEST_BUCKETS),
    "request_prompt_tokens": ("Prompt tokens of finished requests", TOKEN_BUCKETS),
    "request_generation_tokens": ("Generated tokens of finished requests", TOKEN_BUCKETS),
}
FINISH_REASONS = ("stop", "length", "abort", "error")


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets, self.counts = buckets, [0] * (len(buckets) + 1)     # the last: above every bound
        self.sum, self.count = 0.0, 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1     # bucket i holds v <= buckets[i]
        self.sum += v
        self.count += 1

    def snapshot(self) -> dict:
        return {"buckets": list(self.buckets), "counts": list(self.counts), "sum": self.sum, "count": self.count}


@dataclass
class _Times:
    arrival: float
    prompt_tokens: int
    scheduled: float | None = None
    first: float | None = None
    last: float | None = None
    tokens: int = 0


class RequestMetrics:
    """One replica's request counters and latency histograms. Fed on the engine thread (`output`,
    `scheduled`) and the event loop (`admitted`, `rejected`), read by `snapshot`: hence the lock."""

    def __init__(self, clock=time.perf_counter):
        self.clock, self._lock = clock, threading.Lock()
        self.prompt_tokens = self.generation_tokens = 0
        self.finished = dict.fromkeys(FINISH_REASONS, 0)
        self.rejections: dict[str, int] = {}
        self.hist = {name: Histogram(b) for name, (_, b) in HISTOGRAMS.items()}
        self._live: dict[str, _Times] = {}

    def admitted(self, request_id: str, prompt_tokens: int) -> None:
        with self._lock:
            self._live[request_id] = _Times(self.clock(), prompt_tokens)

    def forget(self, request_id: str) -> None:
        """The request was not admitted after all (it counts as a rejection, if at all)."""
        with self._lock:
            self._live.pop(request_id, None)

    def rejected(self, code: str) -> None:
        with self._lock:
            self.rejections[code] = self.rejections.get(code, 0) + 1

    def scheduled(self, request_id: str, t: float | None = None) -> None:
        with self._lock:
            st = self._live.get(request_id)
            if st is not None and st.scheduled is None:
                st.scheduled = self.clock() if t is None else t

    def output(self, request_id: str, completion_tokens: int, finished: bool, reason: str | None,
               t: float) -> tuple[str, int, float | None] | None:
        """One delivered output (`completion_tokens`: the request's total so far), at time t (the
        end of the engine step that made it). -> (finish reason, tokens, TTFT) when it finished."""
        with self._lock:
            st = self._live.get(request_id)
            if st is None:
                return None
            new = max(0, completion_tokens - st.tokens)
            if new:
                if st.first is None:
                    st.first = t
                    self.hist["time_to_first_token_seconds"].observe(t - st.arrival)
                    self.prompt_tokens += st.prompt_tokens      # counted when its prefill is done, as vLLM
                else:
                    self.hist["inter_token_latency_seconds"].observe(t - st.last)
                st.last, st.tokens = t, st.tokens + new
                self.generation_tokens += new
            if not finished:
                return None
            del self._live[request_id]
            reason = str(reason or "stop")
            self.finished[reason] = self.finished.get(reason, 0) + 1
            h = self.hist
            h["e2e_request_latency_seconds"].observe(t - st.arrival)
            h["request_queue_time_seconds"].observe((st.scheduled or st.first or t) - st.arrival)
            if st.first is not None:
                h["request_prefill_time_seconds"].observe(st.first - (st.scheduled or st.arrival))
                h["request_decode_time_seconds"].observe(st.last - st.first)
            h["request_prompt_tokens"].observe(st.prompt_tokens)
            h["request_generation_tokens"].observe(st.tokens)
            return reason, st.tokens, None if st.first is None else st.first - st.arrival

    def snapshot(self) -> dict:
        with self._lock:
            return {"prompt_tokens": self.prompt_tokens, "generation_tokens": self.generation_tokens,
                    "finished": dict(self.finished), "rejected": dict(self.rejections),
                    "histograms": {k: h.snapshot() for k, h in self.hist.items()}}


# -- the text the ingress serves ----------------------------------------------------------------
WAVE = (   # engine stats key -> (metric, type, help); present with the wave buffer (offload)
    ("cache_hit_ratio", "wave_cache_hit_ratio", "gauge",
     "Share of retrieved clusters found in the GPU cluster cache since the replica started"),
    ("retrieved_clusters", "wave_cache_queries_total", "counter",
     "Clusters the retrieval zone asked the GPU cluster cache for"),
    ("cache_hits", "wave_cache_hits_total", "counter", "Clusters found in the GPU cluster cache"),
    ("pcie_bytes_total", "wave_pcie_bytes_total", "counter", "KV bytes gathered from host memory over PCIe"),
    ("pcie_bytes_per_step", "wave_pcie_bytes_per_step", "gauge", "KV bytes over PCIe per decode step, on average"),
    ("host_pool_bytes", "wave_host_pool_bytes", "gauge", "Capacity of the host (CPU) KV pool"),
    ("cache_bytes", "wave_gpu_cache_bytes", "gauge", "Size of the GPU cluster cache"),
)
ENGINE_KEYS = tuple(k for k, *_ in WAVE)   # what the replica adds to its snapshot as `engine`


def _num(v) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    v = float(v)
    return "NaN" if math.isnan(v) else ("+Inf" if v == math.inf else "-Inf" if v == -math.inf else repr(v))


def _labels(d: dict) -> str:
    esc = (lambda s: str(s).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"'))
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in d.items()) + "}"


class _Text:
    def __init__(self):
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_: str, samples: list[tuple[dict, object]]) -> None:
        self.lines += [f"# HELP {PREFIX}{name} {help_}", f"# TYPE {PREFIX}{name} {kind}"]
        self.lines += [f"{PREFIX}{name}{_labels(lab)} {_num(v)}" for lab, v in samples]

    def histogram(self, name: str, help_: str, samples: list[tuple[dict, dict]]) -> None:
        self.lines += [f"# HELP {PREFIX}{name} {help_}", f"# TYPE {PREFIX}{name} histogram"]
        for lab, h in samples:
            cum = 0
            for le, c in zip([*h["buckets"], math.inf], h["counts"]):
                cum += c
                self.lines.append(f"{PREFIX}{name}_bucket{_labels({**lab, 'le': _num(float(le))})} {cum}")
            self.lines += [f"{PREFIX}{name}_sum{_labels(lab)} {_num(h['sum'])}",
                           f"{PREFIX}{name}_count{_labels(lab)} {h['count']}"]


def render(model_name: str, replicas: list[dict], now: float | None = None) -> str:
    """The Prometheus text for the replicas' latest reports (`routing.replica_stats` rows: routing
    stats plus `metrics`, this module's snapshot with an `engine` part)."""
    now = time.time() if now is None else now
    reps = [r for r in replicas if "capacity_bytes" in r]       # those that have reported
    lab = {r["replica"]: {"model_name": model_name, "replica": r["replica"]} for r in reps}
    out = _Text()

    def each(fn):
        return [(lab[r["replica"]], v) for r in reps if (v := fn(r)) is not None]

    def met(r):
        return r.get("metrics") or {}

    def eng(r, key):
        return met(r).get("engine", {}).get(key)

    out.family("replica_healthy", "gauge", "1 while the replica's engine loop runs and can take requests",
               each(lambda r: bool(r.get("healthy", True))))
    out.family("replica_report_age_seconds", "gauge", "Age of the replica's report that these values come from",
               each(lambda r: max(0.0, now - r["ts"]) if "ts" in r else None))
    out.family("num_requests_running", "gauge", "Requests in prefill or in the decode batch",
               each(lambda r: r.get("running", 0) + r.get("prefilling", 0)))
    out.family("num_requests_waiting", "gauge", "Requests admitted and waiting for their prefill to start",
               each(lambda r: r.get("waiting", 0)))
    out.family("kv_cache_usage_perc", "gauge", "Share of the replica's KV cache held by requests (1 = full)",
               each(lambda r: r["used_bytes"] / r["capacity_bytes"] if r["capacity_bytes"] else 0.0))
    out.family("kv_cache_used_bytes", "gauge", "KV cache bytes held by requests", each(lambda r: r["used_bytes"]))
    out.family("kv_cache_capacity_bytes", "gauge", "KV cache capacity of the replica",
               each(lambda r: r["capacity_bytes"]))
    out.family("kv_cache_outstanding_bytes", "gauge",
               "KV bytes promised to admitted requests (a request reserves its whole footprint up front)",
               each(lambda r: r.get("outstanding_bytes", 0)))
    out.family("num_preemptions_total", "counter",
               "Preemptions: always 0, this engine never preempts (a request's whole KV is reserved when it "
               "is admitted, so a running request never runs out of it)", each(lambda r: 0))
    out.family("prompt_tokens_total", "counter", "Prompt tokens prefilled",
               each(lambda r: met(r).get("prompt_tokens")))
    out.family("generation_tokens_total", "counter", "Tokens generated",
               each(lambda r: met(r).get("generation_tokens")))
    out.family("request_success_total", "counter", "Finished requests by finish reason",
               [({**lab[r["replica"]], "finished_reason": k}, n) for r in reps
                for k, n in met(r).get("finished", {}).items()])
    out.family("request_rejected_total", "counter",
               "Requests the replica refused by code (kv_cache_full: the ingress then tries another replica)",
               [({**lab[r["replica"]], "code": k}, n) for r in reps for k, n in met(r).get("rejected", {}).items()])
    for name, (help_, _) in HISTOGRAMS.items():
        out.histogram(name, help_, each(lambda r: met(r).get("histograms", {}).get(name)))
    for key, name, kind, help_ in WAVE:
        samples = each(lambda r: eng(r, key))
        if samples:
            out.family(name, kind, help_, samples)
    return "\n".join(out.lines) + "\n"
