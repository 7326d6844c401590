"""A two-stage replica under Serve (CPU, tiny) whose stage process dies: the request it was serving
ends with an error that says so, the replica turns unhealthy, and Serve replaces it with one that
serves again (its stages new)."""
import os
import signal
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
httpx = pytest.importorskip("httpx")

from tests.serve_util import cluster, serve_tiny, wait_for  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def base_url():
    yield from serve_tiny(REPO, gpus_per_replica=2, cpus_per_stage=0.5, num_cpus_per_replica=0.5,
                          routing_stats_period_s=0.2)


def test_a_dead_stage_fails_its_request_clearly_and_the_replica_is_replaced(base_url):
    body = {"prompt": "pipeline", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    with httpx.Client(base_url=base_url, timeout=60) as c:
        first = c.post("/v1/completions", json=body)
        assert first.status_code == 200, first.text
        info, = cluster(c, detail=True)
        pids = [s["pid"] for s in info["stages"]]
        os.kill(pids[1], signal.SIGKILL)
        time.sleep(0.5)
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 500, r.text
        err = r.json()["error"]
        assert err["code"] == "engine_error" and "pipeline stage of this replica is gone" in err["message"]
        r = c.post("/v1/completions", json=body)      # before Serve replaces it: refused, and said why
        if r.status_code != 200:                      # (Serve may already route to a replacement)
            assert r.status_code == 429 and r.json()["error"]["code"] == "replica_unhealthy", r.text
            assert "retry-after" in r.headers
        t0 = time.time()
        wait_for(lambda: [i for i in cluster(c, detail=True) if i["replica"] != info["replica"] and "error" not in i],
                 90, interval=0.5, what="Serve to replace the replica")
        again = wait_for(lambda: (x := c.post("/v1/completions", json=body)).status_code == 200 and x, 60,
                         interval=0.5, what="the new replica to serve")
        assert again.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]
        new = wait_for(lambda: (i := cluster(c, detail=True)) and len(i) == 1 and "error" not in i[0] and i[0], 30,
                       interval=0.5, what="only the new replica")
        assert new["replica"] != info["replica"] and not {s["pid"] for s in new["stages"]} & set(pids)
        print(f"\nreplaced and serving {time.time() - t0:.1f} s after the failed request")
