"""KV-footprint request routing for the engine deployment.

Replicas report `{"capacity_bytes", "used_bytes", "outstanding_bytes", "free_bytes", "ts", ...}`
through `record_routing_stats` (polled every `request_routing_stats_period_s`). A request carries
its KV footprint ((prompt + max_tokens) x bytes per token) in the call's keyword argument
`kv_bytes`. The router ranks replicas by the room left after the request, discounting what it has
itself sent since the replica's last report, and prefers replicas where the request fits.

A Ray Serve router that returns no replica makes the request wait (it backs off and asks again), so
when nothing fits the router still returns the replicas with the most room: the replica then
decides exactly (it knows its own admitted footprints) and answers "rejected, 429", and the ingress
retries on another replica (`exclude=[...]`) or returns 429 with Retry-After.

`target=<replica id>` in the keyword arguments sends a call to that replica (ops and tests).
Each router registers itself per deployment in this process (`routing.ROUTERS`) so the ingress can
read the replicas' latest stats (`routing.replica_stats`), e.g. to answer 400 for a request no
replica can ever hold. The policy itself is `routing.rank_replicas`.
"""
from __future__ import annotations

import math
import threading
import time

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

import retroinfer.cluster.serve.routing as routing   # by reference: shared with the ingress


class KVCapacityRouter(RequestRouter):
    def initialize_state(self, **kwargs):
        self._lock = threading.Lock()
        self._sent: dict[str, dict[str, tuple[int, float]]] = {}   # replica -> request -> (bytes, t)
        routing.ROUTERS[(self._deployment_id.app_name, self._deployment_id.name)] = self

    def _sent_since_report(self) -> dict[str, int]:
        out = {}
        with self._lock:
            for r in list(self.curr_replicas.values()):
                rid = r.replica_id.unique_id
                ts = (r.routing_stats or {}).get("ts", -math.inf)
                entries = self._sent.get(rid, {})
                out[rid] = sum(b for b, t in entries.values() if t >= ts)
        return out

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True   # back off between full passes
        kv_bytes, exclude, target = routing.request_footprint(pending_request)
        if target is not None:
            return [[r for r in candidate_replicas if r.replica_id.unique_id == target]]
        return routing.rank_replicas(candidate_replicas, kv_bytes, exclude, self._sent_since_report())

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        kv_bytes, _, _ = routing.request_footprint(pending_request)
        if kv_bytes:
            with self._lock:
                self._sent.setdefault(replica_id.unique_id, {})[
                    pending_request.metadata.internal_request_id] = (kv_bytes, time.time())

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        with self._lock:
            self._sent.get(replica_id.unique_id, {}).pop(internal_request_id, None)
