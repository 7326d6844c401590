"""Durable jobs end to end on CPU (the tiny preset, one engine replica): a job outlives its
ingress being killed, its engine replica being killed, and the application being redeployed
(`serve run` restarted) on the same jobs store; finished results stay readable throughout."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")
httpx = pytest.importorskip("httpx")

from tests.serve_util import cluster, free_port, start_app, wait_for  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
LONG = 1500          # decode tokens: long enough to kill something mid-job (~150 tokens/s here)
OUTLIVES = 3000      # ... and to outlive a restart of the ingress (~13 s here) if nothing stopped it


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from ray import serve
    ray.init(address="local", num_cpus=8, include_dashboard=False, logging_level="error", log_to_driver=False)
    port = free_port()
    args = yaml.safe_load((REPO / "deployments/tiny.yaml").read_text())["applications"][0]["args"]
    args.update(jobs_db=str(tmp_path_factory.mktemp("jobs") / "jobs.sqlite"), routing_stats_period_s=0.2,
                warmup_tokens=[64], max_model_len=4096)
    start_app(args, port)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
        wait_for(lambda: c.get("/health").status_code == 200, 120, interval=0.5, what="the app to be ready")
        yield c, args
    serve.shutdown()
    ray.shutdown()


def submit(c, max_tokens, prompt_len=100):
    r = c.post("/v1/jobs", json={"prompt": [65] * prompt_len, "max_tokens": max_tokens, "temperature": 0,
                                 "ignore_eos": True})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def state(c, jid):
    try:
        r = c.get(f"/v1/jobs/{jid}", timeout=5)
    except httpx.HTTPError:           # the ingress is down: the proxy refuses or times out
        return None
    return r.json() if r.status_code == 200 else None


def done(c, jid, timeout=180):
    s = wait_for(lambda: (s := state(c, jid)) and s["phase"] in ("done", "failed", "cancelled") and s,
                 timeout, interval=0.25, what=f"{jid} to finish")
    assert s["phase"] == "done", s
    return s


def decoding(c, jid, min_tokens=20):
    return wait_for(lambda: (s := state(c, jid)) and s["phase"] == "decode" and s["tokens_generated"] >= min_tokens
                    and s, 120, interval=0.1, what=f"{jid} decoding")


def actor(part: str):
    from ray.util import list_named_actors
    (name,) = [a["name"] for a in list_named_actors(all_namespaces=True) if part in a["name"]]
    return ray.get_actor(name, namespace="serve")


def engine_requests(c) -> int:
    return sum(r.get("num_requests", 0) for r in cluster(c))


def test_a_job_survives_its_ingress_being_killed(app):
    c, _ = app
    short = done(c, submit(c, 8))
    jid = submit(c, OUTLIVES)
    before = decoding(c, jid)
    ray.kill(actor("Ingress"), no_restart=True)       # Serve starts a new ingress replica
    t0 = time.time()
    back = wait_for(lambda: state(c, jid), 120, interval=0.1, what="the job readable again")
    readable_s = time.time() - t0
    again = decoding(c, jid, min_tokens=1)
    resumed_s = time.time() - t0
    # The previous attempt kept decoding after its caller died (Serve does not cancel it); the new
    # ingress aborted it, so the engine holds one request (the new attempt), not two.
    time.sleep(0.5)                                    # a fresh routing report (every 0.2 s)
    for _ in range(5):
        assert engine_requests(c) == 1
        time.sleep(0.3)
    final = done(c, jid)
    print(f"\ningress killed at {before['tokens_generated']} tokens: job readable after {readable_s:.1f}s, "
          f"decoding again after {resumed_s:.1f}s, done after {time.time() - t0:.1f}s")
    assert back["id"] == jid and again["attempts"] == 2 and final["attempts"] == 2
    assert final["tokens_generated"] == OUTLIVES and final["result"]["usage"]["completion_tokens"] == OUTLIVES
    assert state(c, short["id"]) == short                  # a finished result, read back from the store
    listed = c.get("/v1/jobs").json()
    assert {short["id"], jid} <= {j["id"] for j in listed["data"]} and listed["object"] == "list"
    assert c.get("/v1/jobs", params={"phase": "done", "limit": 1}).json()["has_more"] is True


def test_a_job_whose_engine_replica_dies_is_retried(app):
    c, _ = app
    jid = submit(c, LONG)
    first = decoding(c, jid)
    ray.kill(actor("LLMReplica"), no_restart=True)     # Serve replaces the engine replica
    t0 = time.time()
    again = wait_for(lambda: (s := state(c, jid)) and s["attempts"] == 2 and s["phase"] == "decode" and s,
                     120, interval=0.1, what="the job decoding on the new replica")
    retried_s = time.time() - t0
    final = done(c, jid)
    print(f"\nengine replica killed at {first['tokens_generated']} tokens: decoding on the new replica "
          f"after {retried_s:.1f}s, done after {time.time() - t0:.1f}s")
    assert again["replica"] != first["replica"] and final["tokens_generated"] == LONG


def test_jobs_survive_a_redeploy_on_the_same_store(app):
    """`serve run` stopped and started again: the application deleted and deployed anew."""
    from ray import serve
    from retroinfer.deployments.app import build_app
    c, args = app
    finished = done(c, submit(c, 8))
    jid = submit(c, LONG)
    decoding(c, jid)
    serve.delete("retroinfer")
    t0 = time.time()
    serve.run(build_app(args), blocking=False, name="retroinfer", route_prefix="/")
    wait_for(lambda: state(c, jid), 120, interval=0.2, what="the job readable again")
    final = done(c, jid)
    print(f"\nredeployed: job done {time.time() - t0:.1f}s after the redeploy began")
    assert final["attempts"] == 2 and final["tokens_generated"] == LONG
    assert state(c, finished["id"]) == finished
