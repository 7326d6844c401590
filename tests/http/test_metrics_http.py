"""Health and metrics that tell the truth (issue 17, item 5) and the routes a vLLM user looks for
(issue 21): `/metrics` in Prometheus text with vLLM's metric set, summed over the engine replicas
and labelled by replica, counting exactly what was served; gauges that keep their idle values;
`/health` 503 while no engine replica can take work (their engines failed) and 200 again once
Serve has replaced them; `/tokenize`, `/detokenize` and `/version` with vLLM's shapes. On CPU:
the tiny preset, two engine replicas."""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time
from importlib.metadata import version
from pathlib import Path

import pytest

from retroinfer.cluster.serve import prometheus as prom
from retroinfer.cluster.serve.engine_loop import EngineLoop
from retroinfer.cluster.serve.monitor import ReplicaMonitor
from retroinfer.engine.protocol import EngineStats

parser = pytest.importorskip("prometheus_client.parser")
REPO = Path(__file__).resolve().parents[2]
KEY = "metrics-key-0123456789"
GREEDY = {"temperature": 0, "ignore_eos": True}


def parse(text: str) -> dict[str, list[tuple[dict, float]]]:
    """Prometheus text -> {sample name: [(labels, value)]}, by prometheus_client's own parser."""
    out: dict[str, list] = {}
    for fam in parser.text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def by_replica(samples: dict, name: str, **match) -> dict[str, float]:
    return {lab["replica"]: v for lab, v in samples.get(name, [])
            if all(lab.get(k) == str(w) for k, w in match.items())}


# -- the replica's bookkeeping, without Ray -------------------------------------------------------
def test_request_metrics_time_every_token_and_render_as_prometheus_text():
    now = [0.0]
    m = prom.RequestMetrics(clock=lambda: now[0])
    m.admitted("a", 7)
    now[0] = 1.0
    m.scheduled("a")
    for t, n, fin in ((2.0, 1, False), (2.5, 2, False), (2.5, 2, False), (3.5, 3, True)):
        done = m.output("a", n, fin, "length" if fin else None, t)
    assert done == ("length", 3, 2.0)
    m.admitted("b", 4)
    assert m.output("b", 0, True, "abort", 4.0) == ("abort", 0, None)     # aborted before its first token
    m.rejected("kv_cache_full")
    snap = m.snapshot()
    assert snap["prompt_tokens"] == 7 and snap["generation_tokens"] == 3      # b never prefilled
    assert snap["finished"] == {"stop": 0, "length": 1, "abort": 1, "error": 0}
    h = snap["histograms"]
    assert (h["time_to_first_token_seconds"]["count"], h["time_to_first_token_seconds"]["sum"]) == (1, 2.0)
    assert (h["inter_token_latency_seconds"]["count"], h["inter_token_latency_seconds"]["sum"]) == (2, 1.5)
    assert h["e2e_request_latency_seconds"]["sum"] == 3.5 + 3.0 and h["request_queue_time_seconds"]["sum"] == 1 + 3
    assert h["request_prefill_time_seconds"]["sum"] == 1.0 and h["request_decode_time_seconds"]["sum"] == 1.5

    rep = {"replica": 'r"1', "ts": 100.0, "capacity_bytes": 1000, "used_bytes": 250, "outstanding_bytes": 300,
           "waiting": 2, "prefilling": 1, "running": 3, "healthy": True,
           "metrics": {**snap, "engine": {"cache_hit_ratio": 0.9, "pcie_bytes_total": 123}}}
    s = parse(prom.render("tiny", [rep, {"replica": "new"}], now=101.5))    # "new" has not reported
    lab = {"model_name": "tiny", "replica": 'r"1'}
    assert s["retroinfer:kv_cache_usage_perc"] == [(lab, 0.25)]
    assert s["retroinfer:num_requests_running"] == [(lab, 4.0)] and s["retroinfer:num_requests_waiting"] == [(lab, 2.0)]
    assert s["retroinfer:replica_report_age_seconds"] == [(lab, 1.5)]
    assert s["retroinfer:num_preemptions_total"] == [(lab, 0.0)]
    assert s["retroinfer:wave_cache_hit_ratio"] == [(lab, 0.9)] and s["retroinfer:wave_pcie_bytes_total"] == [(lab, 123)]
    assert by_replica(s, "retroinfer:request_success_total", finished_reason="length") == {'r"1': 1.0}
    buckets = {float(lab["le"]): v for lab, v in s["retroinfer:inter_token_latency_seconds_bucket"]}
    assert buckets[0.5] == 1 and buckets[0.75] == 1 and buckets[1.0] == 2 and buckets[float("inf")] == 2
    assert s["retroinfer:time_to_first_token_seconds_count"] == [(lab, 1.0)]


class IdleEngine:
    on_prefill_progress = None
    reject_when_full = True

    def __init__(self):
        self.calls = 0

    def engine_stats(self):
        self.calls += 1
        return EngineStats(capacity_bytes=1 << 20)

    def has_work(self):
        return False


def test_an_idle_loop_keeps_setting_its_gauges():
    """The Ray gauges (`metrics.ReplicaMetrics.on_step`) are set again about once a second while
    the replica idles; they were set only while it stepped, and Ray stopped exporting them."""
    class Gauges:               # stands in for ReplicaMetrics (no Ray metrics agent here)
        def __init__(self):
            self.seen = []

        def on_step(self, s):
            self.seen.append(s)
    gauges = Gauges()
    loop = EngineLoop(IdleEngine(), observer=ReplicaMonitor(gauges))
    try:
        time.sleep(2.6)
    finally:
        loop.shutdown()
    assert len(gauges.seen) >= 2 and all(s.used_bytes == 0 and s.capacity_bytes == 1 << 20 for s in gauges.seen)


def test_engine_ready_is_the_replicas_health():
    from retroinfer.cluster.http.api import engine_ready

    async def must_not_ping():
        raise AssertionError("pinged")

    async def answers(value):
        return value
    assert asyncio.run(engine_ready([{"replica": "a", "healthy": False}, {"replica": "b"}], must_not_ping, 0.1))
    assert not asyncio.run(engine_ready([{"replica": "a", "healthy": False}], must_not_ping, 0.1))
    assert not asyncio.run(engine_ready([], lambda: answers(False), 0.1))    # its engine failed
    assert asyncio.run(engine_ready(None, lambda: answers(True), 0.1))


# -- the application over HTTP ------------------------------------------------------------------
ray = pytest.importorskip("ray")
httpx = pytest.importorskip("httpx")

from tests.serve_util import PAGE_BYTES, cluster, serve_tiny, wait_for  # noqa: E402


@pytest.fixture(scope="module")
def base_url():
    yield from serve_tiny(REPO, num_replicas=2, kv_pool_gb=16 * PAGE_BYTES / 2**30, max_model_len=4096,
                          routing_stats_period_s=0.2, max_batch=4, warmup_tokens=[16], api_key=[KEY],
                          jobs_db=":memory:")


@pytest.fixture(scope="module")
def client(base_url):
    with httpx.Client(base_url=base_url, timeout=60, headers={"authorization": f"Bearer {KEY}"}) as c:
        wait_for(lambda: len(cluster(c)) == 2 and all("capacity_bytes" in r for r in cluster(c)), 60,
                 what="both replicas to report")
        yield c


def scrape(base_url) -> dict:
    r = httpx.get(base_url + "/metrics", timeout=30)      # no API key: Prometheus sends none
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text
    return parse(r.text)


def test_metrics_count_exactly_what_was_served(client, base_url):
    reps = {r["replica"] for r in cluster(client)}
    before = scrape(base_url)
    assert set(by_replica(before, "retroinfer:kv_cache_capacity_bytes")) == reps
    jobs = [(list(range(1, 1 + p)), m) for p, m in ((5, 3), (17, 6), (33, 9), (64, 12), (9, 1))]

    def complete(job):
        ids, m = job
        t0 = time.perf_counter()
        r = client.post("/v1/completions", json={"prompt": ids, "max_tokens": m, **GREEDY})
        assert r.status_code == 200, r.text
        assert r.json()["usage"] == {"prompt_tokens": len(ids), "completion_tokens": m, "total_tokens": len(ids) + m}
        return r.headers["x-retroinfer-replica"], time.perf_counter() - t0
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        served = list(pool.map(complete, jobs))
    want_gen = sum(m for _, m in jobs)

    def delta(s, name, **match):
        new, old = by_replica(s, name, **match), by_replica(before, name, **match)
        return {r: new.get(r, 0) - old.get(r, 0) for r in new}

    after = wait_for(lambda: (s := scrape(base_url)) and sum(delta(s, "retroinfer:generation_tokens_total").values())
                     == want_gen and s, 10, what="the replicas' reports to count every token")
    per_replica = {r: sum(1 for rr, _ in served if rr == r) for r in reps}
    assert delta(after, "retroinfer:request_success_total", finished_reason="length") == per_replica
    assert sum(delta(after, "retroinfer:prompt_tokens_total").values()) == sum(len(ids) for ids, _ in jobs)
    for name, count in (("time_to_first_token_seconds", len(jobs)), ("e2e_request_latency_seconds", len(jobs)),
                        ("inter_token_latency_seconds", want_gen - len(jobs)),
                        ("request_prefill_time_seconds", len(jobs))):
        assert sum(delta(after, f"retroinfer:{name}_count").values()) == count, name
    assert sum(delta(after, "retroinfer:request_generation_tokens_sum").values()) == want_gen
    ttft = sum(delta(after, "retroinfer:time_to_first_token_seconds_sum").values())
    e2e = sum(delta(after, "retroinfer:e2e_request_latency_seconds_sum").values())
    itl = sum(delta(after, "retroinfer:inter_token_latency_seconds_sum").values())
    decode = sum(delta(after, "retroinfer:request_decode_time_seconds_sum").values())
    client_s = sum(s for _, s in served)
    assert 0 < ttft < e2e <= client_s and abs(itl - decode) < 1e-6        # a request's gaps add up to its decode
    print(f"\n{len(jobs)} completions: TTFT {ttft / len(jobs) * 1e3:.0f} ms, ITL {itl / (want_gen - len(jobs)) * 1e3:.1f} ms,"
          f" e2e {e2e / len(jobs) * 1e3:.0f} ms (client {client_s / len(jobs) * 1e3:.0f} ms), per replica {per_replica}")


def test_gauges_follow_a_running_request_and_keep_their_idle_values(client, base_url):
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(client.post, "/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 400, **GREEDY})
        busy = wait_for(lambda: (s := scrape(base_url)) and sum(by_replica(s, "retroinfer:num_requests_running").values())
                        == 1 and s, 20, interval=0.05, what="the request to run")
        assert sum(by_replica(busy, "retroinfer:kv_cache_used_bytes").values()) > 0
        assert max(by_replica(busy, "retroinfer:kv_cache_usage_perc").values()) > 0
        assert fut.result().status_code == 200
    wait_for(lambda: not any(by_replica(scrape(base_url), "retroinfer:kv_cache_used_bytes").values()), 10,
             what="the KV to be freed")
    time.sleep(3.0)       # idle: 15 routing-stats periods, 12 engine-loop stats periods
    idle = scrape(base_url)
    reps = {r["replica"] for r in cluster(client)}
    for name in ("kv_cache_used_bytes", "kv_cache_usage_perc", "num_requests_running", "num_requests_waiting",
                 "kv_cache_outstanding_bytes"):
        assert by_replica(idle, f"retroinfer:{name}") == dict.fromkeys(reps, 0.0), name
    assert all(v == 1 for v in by_replica(idle, "retroinfer:replica_healthy").values())
    assert max(by_replica(idle, "retroinfer:replica_report_age_seconds").values()) < 2.0    # still reporting


def test_tokenize_and_detokenize_round_trip_as_the_engine_encodes(client, base_url):
    from retroinfer.engine.tokenizer import load_tokenizer
    tok = load_tokenizer("tiny")
    text = "Hello, wörld ✓"
    r = client.post("/tokenize", json={"model": "tiny", "prompt": text})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body == {"count": len(tok.encode(text)), "max_model_len": 4096, "tokens": tok.encode(text), "token_strs": None}
    done = client.post("/v1/completions", json={"prompt": text, "max_tokens": 1, **GREEDY}).json()
    assert done["usage"]["prompt_tokens"] == body["count"]
    assert client.post("/detokenize", json={"tokens": body["tokens"]}).json() == {"prompt": text}
    bare = client.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]
    assert bare == body["tokens"][1:]                           # without the BOS
    msgs = [{"role": "user", "content": "hi there"}]
    chat = client.post("/tokenize", json={"messages": msgs}).json()
    assert chat["tokens"] == tok.apply_chat_template(msgs)
    used = client.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 1, **GREEDY}).json()["usage"]
    assert used["prompt_tokens"] == chat["count"]
    no_gen = client.post("/tokenize", json={"messages": msgs, "add_generation_prompt": False}).json()
    assert no_gen["tokens"] == tok.apply_chat_template(msgs, add_generation_prompt=False) and no_gen["count"] < chat["count"]
    strs = client.post("/tokenize", json={"prompt": "ab", "return_token_strs": True}).json()["token_strs"]
    assert strs == [tok.decode([i]) for i in tok.encode("ab")]
    assert httpx.get(base_url + "/version").json() == {"version": version("retroinfer")}


@pytest.mark.parametrize("route,body,status,param", [
    ("/detokenize", {"tokens": [72, -1]}, 400, "tokens"),
    ("/detokenize", {"tokens": [72, 10**9]}, 400, "tokens"),
    ("/detokenize", {"tokens": ["a"]}, 400, "tokens.0"),
    ("/detokenize", {"tokens": [1.5]}, 400, "tokens.0"),
    ("/detokenize", {}, 400, "tokens"),
    ("/tokenize", {}, 400, None),
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, 400, None),
    ("/tokenize", {"prompt": "\ud800"}, 400, "prompt"),
    ("/tokenize", {"model": "gpt-4", "prompt": "a"}, 404, "model"),
    ("/detokenize", {"model": "gpt-4", "tokens": [1]}, 404, "model"),
])
def test_tokenizer_routes_refuse_like_the_others(client, route, body, status, param):
    r = client.post(route, content=json.dumps(body), headers={"content-type": "application/json"})   # "\ud800" too
    assert r.status_code == status and "Traceback" not in r.text, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "code", "param"} and err["message"] and err["param"] == param, err


def test_what_needs_the_api_key(base_url):
    with httpx.Client(base_url=base_url, timeout=30) as anon:
        for path in ("/tokenize", "/detokenize"):
            r = anon.post(path, json={"prompt": "a", "tokens": [1]})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, r.text)
        for path in ("/health", "/metrics", "/version"):
            assert anon.get(path).status_code == 200, path


def _break_engines(replica_ids: set[str]) -> None:
    """Makes the engine loop of each replica fail as a failed engine step does (the loop's own
    exception path: its requests end with an error, `healthy` turns False)."""
    def fail(actor):
        llm = actor._replica_impl._user_callable_wrapper._callable       # Ray 2.60's ReplicaActor
        eng = llm.loop.engine

        def step():
            raise RuntimeError("injected device failure")
        eng.has_work, eng.step = (lambda: True), step
        llm.loop._wake.set()
        return llm.replica_id
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if "LLMReplica" in a["name"] and any(a["name"].endswith(i) for i in replica_ids)]
    assert len(names) == len(replica_ids), names
    got = ray.get([ray.get_actor(n, namespace="serve").__ray_call__.remote(fail) for n in names])
    assert set(got) == replica_ids


def test_health_is_503_while_no_engine_can_take_work_and_200_once_replaced(client, base_url):
    """Last: it replaces both replicas."""
    first, second = sorted(r["replica"] for r in cluster(client))
    anon = httpx.Client(base_url=base_url, timeout=30)
    _break_engines({first})
    wait_for(lambda: by_replica(scrape(base_url), "retroinfer:replica_healthy").get(first) == 0, 10,
             what="the failed replica's report")
    r = anon.get("/health")
    assert r.status_code == 200 and r.json()["healthy_replicas"] == 1, r.text     # the other one can
    _break_engines({second})
    t0 = time.monotonic()
    wait_for(lambda: anon.get("/health").status_code == 503, 10, interval=0.1, what="/health 503")
    t503, seen = time.monotonic(), []
    while time.monotonic() - t0 < 90:
        r = anon.get("/health")
        seen.append(r.status_code)
        if r.status_code == 200:
            break
        assert r.status_code == 503 and r.json()["status"] in ("unhealthy", "starting"), r.text
        time.sleep(0.25)
    assert seen[-1] == 200, seen
    t200 = time.monotonic()
    now = {r["replica"] for r in cluster(client)}
    assert now - {first, second}                                 # a new replica serves
    wait_for(lambda: any("capacity_bytes" in r and r["replica"] not in (first, second) for r in cluster(client)), 10,
             what="the new replica's report")
    r = client.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 2, **GREEDY})
    assert r.status_code == 200 and r.headers["x-retroinfer-replica"] not in (first, second), r.text
    print(f"\n/health: 503 {t503 - t0:.1f} s after the second engine failed, for {t200 - t503:.1f} s "
          f"({len(seen) - 1} polls), then 200 with replica(s) {sorted(now - {first, second})}")
    anon.close()
