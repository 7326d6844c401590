"""A hostile client against the Serve application on CPU (the tiny preset, one engine replica):
every failure stays the request's own, every refusal is an OpenAI-style 4xx JSON error (never a
5xx, never a traceback), the limits hold (body size 413, body read time 408, request time 408,
queued jobs 429), API keys guard /v1/* and jobs, and a fixed-seed fuzzer of a few hundred
requests leaves a greedy completion unchanged. The engine-level isolation is tested on the
engine itself (a request that fails in its sampling or prefill frees its KV; the others go on)."""
from __future__ import annotations

import asyncio
import json
import random
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from retroinfer.config import EngineConfig
from retroinfer.engine.llm_engine import LLMEngine
from retroinfer.engine.protocol import EngineStats
from retroinfer.engine.sampling import SamplingParams

REPO = Path(__file__).resolve().parents[2]
KEY_A, KEY_B = "key-a-0123456789", "key-b-9876543210"
PAGES = 16                   # KV per replica: 16 pages of 64 tokens (1024 tokens)
MAX_BODY = 64 << 10
REQUEST_TIMEOUT_S = 1.0      # completions here take < 0.3 s but the long one (1000 tokens) > 3 s
GREEDY = {"temperature": 0, "ignore_eos": True}


# -- the engine: a request's failure is its own ---------------------------------------------------
def _engine():
    return LLMEngine(EngineConfig(model="tiny", device="cpu", kv_budget_bytes=1 << 24, prefill_chunk=128))


def _run_all(eng):
    outs = {}
    while eng.has_work():
        for o in eng.step():
            outs.setdefault(o.request_id, []).append(o)
    return outs


def _tokens(outs):
    return [t for o in outs for t in o.token_ids]


def test_sampling_params_are_bounded_and_clamped():
    for bad in (dict(seed=2**64), dict(seed=-2**63 - 1), dict(top_p=0.0), dict(top_p=-1.0), dict(top_p=1.5),
                dict(temperature=float("nan")), dict(temperature=float("inf")), dict(temperature=-1.0),
                dict(top_k=-1), dict(max_tokens=0), dict(stop_token_ids=["x"])):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    assert SamplingParams(temperature=1e-40).temperature == 0.0 and SamplingParams(temperature=1e-40).greedy
    assert SamplingParams(temperature=1e-4).temperature == 1e-2     # vLLM's floor: logits / t stay finite
    assert SamplingParams(seed=2**63 - 1).seed == 2**63 - 1 and SamplingParams(top_p=1e-300).top_p == 1e-300


def test_a_request_that_fails_frees_its_kv_and_the_others_go_on():
    """Parameters that slip past validation (set after it) make one request fail in the engine:
    a seed torch refuses (before its KV is reserved), a temperature that makes its logits inf (in
    the batched sampling), a prefill that raises. Each ends with an error and frees its KV; the
    request decoding beside them gets the same tokens as alone."""
    prompt = list(range(1, 40))
    alone = _tokens(_run_all_one(prompt, 30))
    eng = _engine()
    eng.add_request("ok", prompt, SamplingParams(max_tokens=30, **GREEDY))
    eng.add_request("late", [3, 4], SamplingParams(max_tokens=20, temperature=1.0, seed=3))
    early: dict[str, list] = {}
    while "late" not in early:                              # until both are prefilled and decoding
        for o in eng.step():
            early.setdefault(o.request_id, []).append(o)
    eng.seqs["late"].params.temperature = 1e-40             # fails in the batched decode's sampling
    used = eng.stats()["used_bytes"]
    seed = SamplingParams(max_tokens=5)
    seed.seed = 2**64                                       # torch.Generator.manual_seed: overflow
    hot = SamplingParams(max_tokens=5, temperature=1.0)
    hot.temperature = 1e-40                                 # row / 1e-40 = inf: multinomial raises
    eng.add_request("seed", [5, 6, 7], seed)
    eng.add_request("hot", [5, 6, 7], hot)
    eng.add_request("prefill", [8, 9, 10], SamplingParams(max_tokens=5, **GREEDY))
    real = eng.executor.prefill_steps

    def prefill_steps(seq_id, ids, progress=None):
        if seq_id == "prefill":
            raise RuntimeError("injected prefill failure")
        return (yield from real(seq_id, ids, progress))
    eng.executor.prefill_steps = prefill_steps
    outs = _run_all(eng)
    for rid in ("late", "seed", "hot", "prefill"):
        last = outs[rid][-1]
        assert last.finished and last.finish_reason == "error" and last.error, (rid, last)
    assert "Overflow" in outs["seed"][-1].error or "seed" in outs["seed"][-1].error
    assert len(outs["late"]) == 1                           # its first decode step
    assert _tokens(early["ok"] + outs["ok"]) == alone and outs["ok"][-1].finish_reason == "length"
    assert eng.stats()["used_bytes"] == 0 and not eng.seqs and used > 0


def _run_all_one(prompt, n):
    eng = _engine()
    eng.add_request("ok", prompt, SamplingParams(max_tokens=n, **GREEDY))
    return _run_all(eng)["ok"]


class _BrokenEngine:
    """Takes requests; its step() raises: a failure that is not any request's."""
    on_prefill_progress = None

    def __init__(self):
        self.ids = []

    def engine_stats(self):
        return EngineStats(capacity_bytes=1 << 20)

    def validate(self, ids, params):
        pass

    def add_request(self, rid, ids, params, wait=None):
        self.ids.append(rid)

    def has_work(self):
        return bool(self.ids)

    def step(self):
        raise RuntimeError("device lost")

    def abort(self, rid):
        if rid in self.ids:
            self.ids.remove(rid)


def test_an_engine_failure_marks_the_replica_unhealthy():
    from retroinfer.cluster.serve.engine_loop import EngineLoop, Rejected
    from retroinfer.cluster.serve.replica import LLMReplica
    loop = EngineLoop(_BrokenEngine())
    try:
        async def run():
            q = loop.submit("r1", [1], SamplingParams(max_tokens=3), 100)
            return await asyncio.wait_for(q.get(), 5)
        out = asyncio.run(run())
        assert out["finished"] and out["finish_reason"] == "error" and "internal error" in out["error"]
        replica = LLMReplica.func_or_class.__new__(LLMReplica.func_or_class)
        replica.loop, replica.monitor, replica.replica_id = loop, loop.observer, "r"
        assert not loop.healthy and loop.outstanding_bytes == 0
        assert replica.record_routing_stats()["healthy"] is False     # what Serve's router polls

        async def again():
            return loop.submit("r2", [1], SamplingParams(max_tokens=3), 100)
        with pytest.raises(Rejected) as e:
            asyncio.run(again())
        assert e.value.status == 429 and e.value.code == "replica_unhealthy"   # the ingress tries another
        with pytest.raises(RuntimeError):
            replica.check_health()                       # Serve replaces the replica
    finally:
        loop.shutdown()


# -- the application over HTTP ------------------------------------------------------------------
ray = pytest.importorskip("ray")
httpx = pytest.importorskip("httpx")

from tests.fuzz import fuzz_body  # noqa: E402
from tests.serve_util import PAGE_BYTES, PAGE_TOKENS, cluster, serve_tiny, wait_for, wait_idle  # noqa: E402


@pytest.fixture(scope="module")
def base_url():
    yield from serve_tiny(REPO, kv_pool_gb=PAGES * PAGE_BYTES / 2**30, max_model_len=4096, routing_stats_period_s=0.2,
                          retry_after_s=1, max_batch=4, warmup_tokens=[64], api_key=[KEY_A, KEY_B],
                          max_body_bytes=MAX_BODY, body_timeout_s=1.0, max_queued_jobs=2,
                          request_timeout_s=REQUEST_TIMEOUT_S, jobs_db=":memory:")


@pytest.fixture(scope="module")
def client(base_url):
    with httpx.Client(base_url=base_url, timeout=60, headers={"authorization": f"Bearer {KEY_A}"}) as c:
        wait_for(lambda: cluster(c) and all("capacity_bytes" in r for r in cluster(c)), 60, what="the replica")
        yield c


def _openai_error(r, status, code=None, param=...):
    assert r.status_code == status, (r.status_code, r.text)
    assert "Traceback" not in r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "code", "param"} and err["message"] and err["type"]
    if code is not None:
        assert err["code"] == code, err
    if param is not ...:
        assert err["param"] == param, err
    return err


def _raw(client, path, text: str):
    """A body sent as written (JSON escapes such as a lone \\ud800 or NaN included)."""
    return client.post(path, content=text.encode(), headers={"content-type": "application/json"})


def _greedy_text(client, n=12):
    r = client.post("/v1/completions", json={"prompt": "The KV cache is a vector store.", "max_tokens": n, **GREEDY})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


@pytest.mark.parametrize("fields, param", [
    ({"seed": 2**64}, "seed"), ({"seed": -2**63 - 1}, "seed"), ({"top_p": 0}, "top_p"), ({"top_p": -0.5}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"temperature": -1}, "temperature"), ({"temperature": 3}, "temperature"),
    ({"top_k": -2}, "top_k"), ({"max_tokens": 0}, "max_tokens"), ({"stop": [""]}, "stop"),
])
def test_sampling_fields_out_of_range_are_400_with_their_name(client, fields, param):
    _openai_error(client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, **fields}), 400, param=param)


def test_edge_values_are_served_and_leak_nothing(client):
    """The issue's outage: a 2^64 seed on four requests leaked their KV. Now every edge value is
    answered (400 or 200), the replica holds no KV after, and tiny temperatures are greedy."""
    greedy = _greedy_text(client)
    for _ in range(4):
        _openai_error(client.post("/v1/completions", json={"prompt": [65] * 200, "max_tokens": 500,
                                                           "seed": 2**64}), 400, param="seed")
    body = {"prompt": "The KV cache is a vector store.", "max_tokens": 12, "ignore_eos": True}
    for extra in ({"temperature": 1e-40}, {"temperature": 1e-40, "top_p": 1e-300}, {"temperature": 0.0, "seed": -2**63}):
        r = client.post("/v1/completions", json={**body, **extra})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy, (extra, r.text)
    for extra in ({"temperature": 0.003, "seed": 2**63 - 1}, {"top_p": 1e-300, "seed": 1}, {"temperature": 2, "top_k": 10**12}):
        r = client.post("/v1/completions", json={**body, **extra})
        assert r.status_code == 200, (extra, r.text)
    for text in ('{"prompt": "x", "temperature": NaN}', '{"prompt": "x", "top_p": Infinity}',
                 '{"prompt": "x", "temperature": -Infinity}'):
        _openai_error(_raw(client, "/v1/completions", text), 400)
    wait_idle(client, 1)
    assert client.get("/health").status_code == 200


def test_text_that_cannot_be_encoded_is_400_everywhere(client):
    for path, text in (("/v1/completions", '{"prompt": "a\\ud800b", "max_tokens": 2}'),
                       ("/v1/completions", '{"prompt": ["\\udfff"], "max_tokens": 2}'),
                       ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}'),
                       ("/v1/jobs", '{"prompt": "\\ud800", "max_tokens": 2}'),
                       ("/v1/jobs", '{"messages": [{"role": "user", "content": "x\\ud800"}], "max_tokens": 2}')):
        err = _openai_error(_raw(client, path, text), 400)
        assert err["param"] in ("prompt", "messages"), (path, err)


def test_malformed_json_and_wrong_types_name_the_field(client):
    err = _openai_error(_raw(client, "/v1/completions", "{not json"), 400, code="invalid_json", param=None)
    assert "JSON" in err["message"]
    _openai_error(_raw(client, "/v1/completions", '{"prompt": 5}'), 400, param="prompt")
    _openai_error(_raw(client, "/v1/completions", '{"prompt": "x", "max_tokens": "many"}'), 400, param="max_tokens")
    _openai_error(_raw(client, "/v1/chat/completions", '{"messages": [{"role": "user", "content": 5}]}'), 400,
                  param="messages.0.content")
    _openai_error(_raw(client, "/v1/completions", "[]"), 400)
    _openai_error(_raw(client, "/v1/completions", '"\\ud800"'), 400)
    _openai_error(client.post("/v1/completions", content=b"\xff\xfe{", headers={"content-type": "application/json"}), 400)


def test_body_size_limit_is_413(client, base_url):
    hidden = {"prompt": "x", "max_tokens": 2, "ignored": "y" * (MAX_BODY + 10)}
    _openai_error(client.post("/v1/completions", json=hidden), 413, code="body_too_large")

    def chunks():                       # no Content-Length: counted as it arrives
        yield b'{"prompt": "x", "ignored": "'
        for _ in range(MAX_BODY // 4096 + 2):
            yield b"y" * 4096
        yield b'"}'
    _openai_error(client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"}),
                  413, code="body_too_large")
    ids = {"prompt": [65] * 900, "max_tokens": 2, **GREEDY}   # under the limit: served
    assert client.post("/v1/completions", json=ids).status_code == 200


def _http_raw(base_url, request: bytes, timeout=10.0) -> tuple[int, bytes, float]:
    u = urlparse(base_url)
    t0 = time.monotonic()
    with socket.create_connection((u.hostname, u.port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _content_length(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1]), data.split(b"\r\n\r\n", 1)[1], time.monotonic() - t0


def _content_length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def test_a_body_that_never_arrives_is_408(base_url):
    """Content-Length 1000, 20 bytes sent, the connection held open: 408 after body_timeout_s."""
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY_A}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n").encode()
    status, body, took = _http_raw(base_url, head + b'{"prompt": "hello", ')
    assert status == 408 and json.loads(body)["error"]["code"] == "body_timeout", body
    assert took < 8


def test_deadline_helpers_do_not_depend_on_speed():
    from retroinfer.cluster.http import guard as G

    async def endless():
        while True:
            await asyncio.sleep(0.01)
            yield 1

    async def go():
        t0 = time.monotonic()
        with pytest.raises(G.APIError) as e:
            async for _ in G.timed(endless(), G.deadline(0.2)):
                pass
        assert e.value.status == 408 and 0.15 < time.monotonic() - t0 < 1.5
        with pytest.raises(G.APIError):
            await G.within(asyncio.sleep(10), G.deadline(0.1))
        assert await G.within(asyncio.sleep(0, "ok"), None) == "ok"
        assert [x async for x in G.timed(_items(3), G.deadline(5))] == [0, 1, 2]
    asyncio.run(go())


async def _items(n):
    for i in range(n):
        yield i


def test_request_timeout_is_408_and_frees_the_kv(client):
    long_ = {"prompt": "slow", "max_tokens": 1000, **GREEDY}    # 1000 of the pool's 1024 tokens: > 3 s on 2 cores
    t0 = time.monotonic()
    _openai_error(client.post("/v1/completions", json=long_), 408, code="request_timeout")
    assert time.monotonic() - t0 < REQUEST_TIMEOUT_S + 3
    with client.stream("POST", "/v1/completions", json={**long_, "stream": True}) as s:
        assert s.status_code == 200
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "request_timeout"
    wait_idle(client, 1, timeout=5)


def _job(client, prompt_len, max_tokens, c=None):
    return (c or client).post("/v1/jobs", json={"prompt": [65] * prompt_len, "max_tokens": max_tokens, **GREEDY})


def test_queued_jobs_are_bounded_429(client):
    wait_idle(client, 1)
    a = _job(client, 200, 13 * PAGE_TOKENS - 200).json()["id"]    # 13 of 16 pages, decoding a while
    wait_for(lambda: client.get(f"/v1/jobs/{a}").json()["phase"] == "decode", what="A decoding")
    waiting = [_job(client, 100, 5 * PAGE_TOKENS - 100) for _ in range(2)]   # cannot fit beside A
    assert all(r.status_code == 202 for r in waiting), [r.text for r in waiting]
    r = _job(client, 100, 5 * PAGE_TOKENS - 100)
    _openai_error(r, 429, code="too_many_jobs")
    assert r.headers["retry-after"] == "1"
    for jid in [a] + [w.json()["id"] for w in waiting]:
        client.delete(f"/v1/jobs/{jid}")
    wait_idle(client, 1)


def test_api_keys_guard_v1_and_jobs_belong_to_their_key(client, base_url):
    with httpx.Client(base_url=base_url, timeout=30) as anon:
        assert anon.get("/health").status_code == 200                  # open
        for r in (anon.get("/v1/models"), anon.post("/v1/completions", json={"prompt": "x"}),
                  anon.get("/v1/jobs/job-x"), anon.get("/v1/models", headers={"authorization": "Bearer nope"}),
                  anon.get("/v1/models", headers={"authorization": f"Basic {KEY_A}"})):
            _openai_error(r, 401, code="invalid_api_key")
            assert r.headers["www-authenticate"] == "Bearer"
        b = {"authorization": f"Bearer {KEY_B}"}
        assert anon.get("/v1/models", headers=b).status_code == 200
        jid = _job(client, 20, 4).json()["id"]
        wait_for(lambda: client.get(f"/v1/jobs/{jid}").json()["phase"] == "done", what="the job done")
        _openai_error(anon.get(f"/v1/jobs/{jid}", headers=b), 404)      # another key's job does not exist
        _openai_error(anon.delete(f"/v1/jobs/{jid}", headers=b), 404)
        _openai_error(anon.get(f"/v1/jobs/{jid}/events", headers=b), 404)
        assert client.get(f"/v1/jobs/{jid}").json()["phase"] == "done"


# -- the fuzzer ---------------------------------------------------------------------------------------
FUZZ_REQUESTS = 300


def test_fuzzer_gets_no_5xx_and_changes_nothing(client, base_url):
    before = _greedy_text(client, 16)
    rng = random.Random(17)
    paths = ["/v1/completions", "/v1/chat/completions", "/v1/jobs"]
    statuses: dict[int, int] = {}
    jobs = []
    with httpx.Client(base_url=base_url, timeout=60) as c:
        for i in range(FUZZ_REQUESTS):
            path = rng.choice(paths)
            headers = {"content-type": rng.choice(["application/json"] * 9 + ["text/plain", ""])}
            if rng.random() < 0.95:
                headers["authorization"] = f"Bearer {rng.choice([KEY_A] * 9 + ['wrong'])}"
            r = c.post(path, content=fuzz_body(rng, path), headers=headers)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code < 500, (i, path, r.status_code, r.text)
            assert "Traceback" not in r.text
            if r.status_code >= 400:
                err = r.json()["error"]
                assert err["message"] and err["type"], r.text
            elif path == "/v1/jobs":
                jobs.append((r.json()["id"], headers["authorization"]))
    print("\nfuzzer statuses:", dict(sorted(statuses.items())))
    assert statuses.get(200, 0) + statuses.get(202, 0) > 30 and statuses.get(400, 0) > 50
    for jid, auth in jobs:
        wait_for(lambda: client.get(f"/v1/jobs/{jid}", headers={"authorization": auth}).json()["phase"]
                 in ("done", "failed", "cancelled"), 60, what=f"fuzzed job {jid}")
    wait_idle(client, 1, timeout=30)
    assert _greedy_text(client, 16) == before
    assert client.get("/health").status_code == 200
