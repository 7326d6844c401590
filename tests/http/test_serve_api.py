"""The Serve application end to end on CPU: two replicas of the tiny preset behind the HTTP
ingress. KV per replica is 16 pages of 64 tokens (1024 tokens, 4 MiB), small enough to fill."""
from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")
httpx = pytest.importorskip("httpx")

from tests.serve_util import PAGE_BYTES, PAGE_TOKENS, cluster, free_port, start_app, wait_for, wait_idle  # noqa: E402

PAGES = 16
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def base_url():
    from ray import serve
    ray.init(address="local", num_cpus=8, include_dashboard=False, logging_level="error", log_to_driver=False)
    port = free_port()
    args = yaml.safe_load((REPO / "deployments/tiny.yaml").read_text())["applications"][0]["args"]
    args.update(num_replicas=2, kv_pool_gb=PAGES * PAGE_BYTES / 2**30, max_model_len=4096,
                routing_stats_period_s=0.2, retry_after_s=2, max_batch=4, max_waiting_requests=1)
    start_app(args, port)
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def client(base_url):
    with httpx.Client(base_url=base_url, timeout=60) as c:
        wait_for(lambda: len(cluster(c)) == 2 and all("capacity_bytes" in r for r in cluster(c)), 60,
                 what="both replicas to report")
        yield c


def greedy(n, **kw):
    return {"max_tokens": n, "temperature": 0, "ignore_eos": True, **kw}


def test_models_health_and_capacity(client):
    r = client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    models = client.get("/v1/models").json()
    assert models["data"][0]["id"] == "tiny" and models["data"][0]["max_model_len"] == 4096
    reps = cluster(client)
    assert len({r["replica"] for r in reps}) == 2
    assert all(r["capacity_bytes"] == PAGES * PAGE_BYTES and r["free_bytes"] == r["capacity_bytes"] for r in reps)
    detail = cluster(client, detail=True)
    assert {d["replica"] for d in detail} == {r["replica"] for r in reps}
    assert all(d["metrics"] and d["stats"]["capacity_bytes"] == PAGES * PAGE_BYTES for d in detail)


def test_completion_whole_and_streamed_agree(client):
    body = {"prompt": "The KV cache is a vector store.", **greedy(12)}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    whole = r.json()
    assert r.headers["x-retroinfer-replica"]
    assert whole["object"] == "text_completion" and whole["choices"][0]["finish_reason"] == "length"
    assert whole["usage"] == {"prompt_tokens": 32, "completion_tokens": 12, "total_tokens": 44}  # BOS + 31 bytes
    with client.stream("POST", "/v1/completions", json={**body, "stream": True,
                                                          "stream_options": {"include_usage": True}}) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        events = [line for line in s.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == whole["choices"][0]["text"]
    assert chunks[-1]["usage"]["completion_tokens"] == 12 and chunks[-1]["choices"] == []
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"


def test_stop_string_and_seed(client):
    full = client.post("/v1/completions", json={"prompt": [256, 72, 105], **greedy(24)}).json()
    text = full["choices"][0]["text"]
    stop = next((ch for ch in text[2:] if ch.isprintable() and ch != "\ufffd" and ch not in text[:2]), None)
    if stop is not None:
        r = client.post("/v1/completions", json={"prompt": [256, 72, 105], **greedy(24), "stop": [stop]}).json()
        assert r["choices"][0]["finish_reason"] == "stop"
        assert r["choices"][0]["text"] == text[:text.index(stop)]
    sampled = [client.post("/v1/completions", json={"prompt": "seeded", "max_tokens": 10, "temperature": 0.9,
                                                    "top_p": 0.9, "top_k": 50, "seed": 7}).json() for _ in range(2)]
    assert sampled[0]["choices"][0]["text"] == sampled[1]["choices"][0]["text"]


@pytest.mark.parametrize("body, status, needle", [
    ({"prompt": "x", "n": 2}, 400, "n=2 is not supported"),
    ({"max_tokens": 3}, 400, "prompt"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "does not exist"),
    ({"prompt": "x", "max_tokens": 5000}, 400, "exceeds the model's context"),
    ({"prompt": [999999]}, 400, "outside the vocabulary"),
    ({"prompt": "x", "logprobs": 2}, 400, "logprobs is not supported"),
])
def test_bad_requests_get_openai_errors(client, body, status, needle):
    r = client.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["type"] and "Traceback" not in r.text


def test_malformed_json_and_chat_errors(client):
    r = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    r = client.get("/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = client.get("/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"
    r = client.post("/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]})
    assert r.status_code == 400 and "text" in r.json()["error"]["message"]


def test_openai_client(base_url):
    openai = pytest.importorskip("openai")
    oc = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in oc.models.list()] == ["tiny"]
    chat = oc.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                      max_tokens=6, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 6
    parts = list(oc.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=6, temperature=0, stream=True))
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == chat.choices[0].message.content
    comp = oc.completions.create(model="tiny", prompt="hello", max_tokens=5, temperature=0)
    assert comp.choices[0].finish_reason in ("length", "stop")
    streamed = "".join(c.choices[0].text for c in oc.completions.create(
        model="tiny", prompt="hello", max_tokens=5, temperature=0, stream=True) if c.choices)
    assert streamed == comp.choices[0].text
    with pytest.raises(openai.BadRequestError):
        oc.completions.create(model="tiny", prompt="hello", n=3)


def _job(client, prompt_len, max_tokens):
    r = client.post("/v1/jobs", json={"prompt": [65] * prompt_len, **greedy(max_tokens)})
    assert r.status_code == 202, r.text
    assert r.json()["phase"] == "queued"
    return r.json()["id"]


def _job_state(client, jid):
    return client.get(f"/v1/jobs/{jid}").json()


def test_routing_by_kv_footprint_queueing_429_and_400(client):
    """A (13 of 16 pages) makes one replica busy; B (3 pages) fits on both and must go to the
    emptier one; so must A2 (13 pages) once B is gone. C and C2 (14 pages) fit nowhere now: each
    waits at a replica (one request may wait per replica here), C3 finds both queues full: 429 +
    Retry-After. D can never fit: 400. Cancelling A and A2 lets the waiting ones start."""
    wait_idle(client, 2)
    long = 13 * PAGE_TOKENS - 200           # 632 tokens: several seconds of decoding
    a = _job(client, 200, long)
    sa = wait_for(lambda: (s := _job_state(client, a))["phase"] == "decode" and s, what="A decoding")
    b = _job(client, 2, 3 * PAGE_TOKENS - 2)
    sb = wait_for(lambda: (s := _job_state(client, b))["replica"] and s, what="B placed")
    assert sb["replica"] != sa["replica"], "B went to the busier replica"
    client.delete(f"/v1/jobs/{b}")
    time.sleep(0.6)                                          # the replicas report B's KV freed
    a2 = _job(client, 201, long)
    sa2 = wait_for(lambda: (s := _job_state(client, a2))["phase"] == "decode" and s, what="A2 decoding")
    assert sa2["replica"] == sb["replica"]

    big = 14 * PAGE_TOKENS - 40
    waiting = []
    for n in (40, 41):
        j = _job(client, n, big - n + 40)
        waiting.append(wait_for(lambda: (s := _job_state(client, j))["replica"] and s, what="C waiting"))
        time.sleep(0.6)                                      # the replicas report its promise
    assert {s["replica"] for s in waiting} == {sa["replica"], sa2["replica"]}
    assert all(s["phase"] == "queued" for s in waiting)

    r = client.post("/v1/completions", json={"prompt": [65] * 40, **greedy(big)})
    assert r.status_code == 429, r.text
    assert r.headers["retry-after"] == "2" and r.json()["error"]["code"] == "kv_cache_full"
    assert "already wait" in r.json()["error"]["message"]

    r = client.post("/v1/completions", json={"prompt": [65] * 100, **greedy(1000)})
    assert r.status_code == 400 and r.json()["error"]["code"] == "kv_capacity_exceeded"
    assert "largest replica holds" in r.json()["error"]["message"]

    # A and A2 are still decoding: cancel them; their KV goes to the waiting jobs.
    for j in (a, a2):
        assert _job_state(client, j)["phase"] == "decode"
        cancelled = client.delete(f"/v1/jobs/{j}").json()
        assert cancelled["phase"] == "cancelled" and 0 < cancelled["tokens_generated"] < long
    for s in waiting:
        wait_for(lambda: _job_state(client, s["id"])["phase"] in ("prefill", "decode"), what="a waiting job started")
        client.delete(f"/v1/jobs/{s['id']}")
    wait_idle(client, 2)


def test_job_lifecycle_and_events(client):
    jid = _job(client, 300, 20)
    done = wait_for(lambda: (s := _job_state(client, jid))["phase"] in ("done", "failed") and s, what="job done")
    assert done["phase"] == "done" and done["prefill_progress"] == 1.0 and done["tokens_generated"] == 20
    assert done["result"]["finish_reason"] == "length"
    assert done["result"]["usage"] == {"prompt_tokens": 300, "completion_tokens": 20, "total_tokens": 320}
    with client.stream("GET", f"/v1/jobs/{jid}/events") as s:
        lines = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    phases = [e["phase"] for e in events if e["type"] == "phase"]
    assert phases == ["prefill", "decode", "done"]
    progress = [e["prefill_progress"] for e in events if e["type"] == "progress"]
    assert progress == [0.0, 0.25, 0.5, 0.75, 1.0]                 # started, then per layer (tiny: 4)
    assert "".join(e["text"] for e in events if e["type"] == "token") == done["result"]["text"]
    assert client.get("/v1/jobs/job-nope").status_code == 404
    assert client.delete("/v1/jobs/job-nope").json()["error"]["code"] == "job_not_found"


def test_job_cancel_during_decode_frees_kv(client):
    wait_idle(client, 2)
    jid = _job(client, 50, 900)
    wait_for(lambda: _job_state(client, jid)["tokens_generated"] > 5, what="job decoding")
    wait_for(lambda: max(r["used_bytes"] for r in cluster(client)) > 0, what="KV in use")
    assert client.delete(f"/v1/jobs/{jid}").json()["phase"] == "cancelled"
    t0 = time.time()
    wait_idle(client, 2, timeout=5)
    assert time.time() - t0 < 5


def test_disconnect_frees_kv(client, base_url):
    """Streaming and non-streaming clients that go away: their KV returns long before the
    900-token generations would have finished."""
    wait_idle(client, 2)
    body = {"prompt": "disconnect me", **greedy(900)}
    with httpx.Client(base_url=base_url, timeout=60) as c2:
        with c2.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
            assert s.status_code == 200
            lines = s.iter_lines()          # keep the iterator: dropping it closes the response
            data = [line for line, _ in zip(lines, range(10)) if line.startswith("data: ")]
            assert data
            wait_for(lambda: max(r["used_bytes"] for r in cluster(client)) > 0, what="KV in use")
            t0 = time.time()
    wait_idle(client, 2, timeout=6)     # the response is closed when the `with` exits
    streamed_s = time.time() - t0

    # a non-streaming client that hangs up once its request holds KV (a raw socket: the close is
    # ours, not a timeout's, so the test does not depend on how fast the machine decodes)
    host, port = base_url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
        wait_for(lambda: max(r["used_bytes"] for r in cluster(client)) > 0, what="KV in use")
    t0 = time.time()
    wait_idle(client, 2, timeout=6)
    print(f"\nKV freed {streamed_s:.2f}s after the stream closed, {time.time() - t0:.2f}s after the hang-up")
    assert streamed_s < 3 and time.time() - t0 < 3


def test_engine_ready_waits_for_a_replica():
    """/health's readiness: a replica that has reported, or one that answers in time; a call
    Serve holds (no replica started yet) or one that fails means starting."""
    import asyncio
    from retroinfer.cluster.http.api import engine_ready

    async def answers():
        return True

    async def held():
        await asyncio.sleep(5)
        return True

    async def fails():
        raise RuntimeError("no replica")
    assert asyncio.run(engine_ready([{"replica": "a"}], held, 0.05))
    assert asyncio.run(engine_ready([], answers, 0.05))
    assert not asyncio.run(engine_ready([], held, 0.05))
    assert not asyncio.run(engine_ready([], fails, 0.05))
