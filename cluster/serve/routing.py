"""Routing policy and the per-process router registry (pure functions; see router.py).

Kept apart from the router class because Serve pickles the router's module *by value* for its
handles: module state there (the registry) would be copied, not shared, so it lives here.
"""
from __future__ import annotations

import time
import weakref
from typing import Any

from retroinfer.engine.protocol import EngineStats

ROUTERS: "weakref.WeakValueDictionary[tuple[str, str], Any]" = weakref.WeakValueDictionary()


def replica_stats(app_name: str, deployment: str) -> list[dict] | None:
    """Latest routing stats of the deployment's replicas as seen by this process's router (None
    until a handle in this process has routed a first call)."""
    router = ROUTERS.get((app_name, deployment))
    if router is None:
        return None
    return [{"replica": r.replica_id.unique_id, "node_id": r.node_id, **(r.routing_stats or {})}
            for r in list(router.curr_replicas.values())]


def report(stats: EngineStats, *, healthy: bool, requests: int) -> dict:
    """A replica's routing figures (`LLMReplica.record_routing_stats`): its KV capacity, what
    sequences hold, what admitted requests were promised (waiting ones too), the room left, its
    queues and health, from the engine's typed stats."""
    used, outstanding = stats.used_bytes, stats.outstanding_bytes
    return {"ts": time.time(), "capacity_bytes": stats.capacity_bytes, "used_bytes": used,
            "outstanding_bytes": outstanding, "free_bytes": max(0, stats.capacity_bytes - max(used, outstanding)),
            "num_requests": requests, "waiting": stats.waiting, "prefilling": stats.prefilling,
            "running": stats.running, "healthy": healthy}


def request_footprint(pr) -> tuple[int, set[str], str | None]:
    """(kv_bytes, exclude, target) from a PendingRequest's keyword arguments."""
    kw: dict[str, Any] = (pr.kwargs or {}) if pr is not None else {}
    return int(kw.get("kv_bytes") or 0), set(kw.get("exclude") or ()), kw.get("target")


def rank_replicas(replicas: list, kv_bytes: int, exclude: set[str], sent_since: dict[str, int]) -> list[list]:
    """Ranks (best first) of replicas for a request of `kv_bytes`. `sent_since[id]`: bytes this
    router sent to the replica after its last report. Replicas that have not reported yet rank
    after those known to fit and before those known not to; replicas with equal room share a rank
    (Serve then picks the shorter queue)."""
    pool = [r for r in replicas if r.replica_id.unique_id not in exclude] or list(replicas)
    fit: dict[float, list] = {}
    unknown, full = [], []
    for r in pool:
        stats = r.routing_stats or {}
        if "free_bytes" not in stats or not stats.get("healthy", True):
            unknown.append(r)
            continue
        room = stats["free_bytes"] - sent_since.get(r.replica_id.unique_id, 0) - kv_bytes
        (fit.setdefault(room, []) if room >= 0 else full).append((room, r))
    ranks = [[r for _, r in fit[room]] for room in sorted(fit, reverse=True)]
    if unknown:
        ranks.append(unknown)
    if full:
        ranks.append([r for _, r in sorted(full, key=lambda x: -x[0])][:1])
    return ranks
