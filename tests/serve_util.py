"""Shared helpers for the Serve tests: a free port, an app on a local Ray, KV polling."""
from __future__ import annotations

import socket
import time

import httpx

PAGE_TOKENS = 64            # the full-attention backend's page
TINY_KV_PER_TOKEN = 4096    # tiny preset, fp32
PAGE_BYTES = PAGE_TOKENS * TINY_KV_PER_TOKEN


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(args: dict, port: int):
    from ray import serve
    from retroinfer.deployments.app import build_app
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), blocking=False, name="retroinfer", route_prefix="/")


def cluster(client: httpx.Client, detail: bool = False) -> list[dict]:
    r = client.get("/v1/cluster", params={"detail": detail})
    r.raise_for_status()
    return r.json()["replicas"]


def wait_for(pred, timeout: float = 20.0, interval: float = 0.1, what: str = "condition"):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def wait_idle(client: httpx.Client, n_replicas: int, timeout: float = 20.0) -> list[dict]:
    """Until every replica reports no KV held or promised (via the routing stats)."""
    def idle():
        reps = cluster(client)
        ok = len(reps) == n_replicas and all(
            r.get("used_bytes") == 0 and r.get("outstanding_bytes") == 0 for r in reps)
        return reps if ok else None
    return wait_for(idle, timeout, what="all replicas to hold no KV")


def serve_tiny(repo, **overrides):
    """A generator fixture body: the tiny preset's app (deployments/tiny.yaml args, updated by
    `overrides`) on a fresh local Ray; yields its URL once /health is 200, then shuts it down."""
    import ray
    import yaml
    from ray import serve
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="error", log_to_driver=False)
    port = free_port()
    args = yaml.safe_load((repo / "deployments/tiny.yaml").read_text())["applications"][0]["args"]
    args.update(overrides)
    start_app(args, port)
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, timeout=60) as c:
        wait_for(lambda: c.get("/health").status_code == 200, 120, interval=0.5, what="the app to be ready")
    yield url
    serve.shutdown()
    ray.shutdown()
