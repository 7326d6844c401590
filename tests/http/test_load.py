"""64 well-behaved clients at once, alone and beside the hostile fuzzer (tests/fuzz.py), on the
Serve application on CPU (the tiny preset, one engine replica): every well-behaved request is
served (a 429 is retried after its Retry-After, as the openai client does), each completion is
token for token the one the same prompt gets alone, the fuzzer gets no 5xx, and the KV is free
afterwards. The throughput of both runs is printed (`pytest -s`)."""
from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
httpx = pytest.importorskip("httpx")

from tests.fuzz import fuzz_body  # noqa: E402
from tests.serve_util import PAGE_BYTES, serve_tiny, wait_idle  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CLIENTS = 64
PER_CLIENT = 3
MAX_TOKENS = 8
PROMPTS = 16                 # distinct prompts, cycled over the clients
FUZZ_REQUESTS = 300
FUZZERS = 8                  # fuzzing clients beside the 64
PAGES = 96                   # every client's request fits at once (one 64-token page each)


@pytest.fixture(scope="module")
def base_url():
    yield from serve_tiny(REPO, kv_pool_gb=PAGES * PAGE_BYTES / 2**30, max_model_len=4096,
                          routing_stats_period_s=0.2, retry_after_s=1, warmup_tokens=[64], jobs_db=":memory:")


def _prompts() -> list[list[int]]:
    rng = random.Random(5)
    return [[rng.randrange(3, 200) for _ in range(rng.randint(5, 40))] for _ in range(PROMPTS)]


def _body(prompt):
    return {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}


async def _client(c: httpx.AsyncClient, k: int, prompts, out: list, retries: list):
    for j in range(PER_CLIENT):
        i = (k + j * CLIENTS) % len(prompts)
        for _ in range(60):
            r = await c.post("/v1/completions", json=_body(prompts[i]))
            if r.status_code != 429:
                break
            retries.append(r.json()["error"]["code"])
            await asyncio.sleep(float(r.headers.get("retry-after", 1)))
        out.append((i, r.status_code, r.json()))


async def _fuzzer(c: httpx.AsyncClient, bodies: list, statuses: dict):
    while bodies:
        path, content = bodies.pop()
        r = await c.post(path, content=content, headers={"content-type": "application/json"})
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        if r.status_code == 202:
            await c.delete(f"/v1/jobs/{r.json()['id']}")


def _fuzz_bodies() -> list[tuple[str, bytes]]:
    rng = random.Random(23)
    paths = ["/v1/completions", "/v1/chat/completions", "/v1/jobs"]
    return [(path, fuzz_body(rng, path)) for path in (rng.choice(paths) for _ in range(FUZZ_REQUESTS))]


def _load(url: str, prompts, fuzz_statuses: dict | None = None) -> tuple[list, list, float]:
    """The clients' requests (and FUZZ_REQUESTS fuzzed ones from FUZZERS more clients, if asked)."""
    async def go():
        out, retries = [], []
        limits = httpx.Limits(max_connections=CLIENTS + FUZZERS)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
            t0 = time.monotonic()
            fuzz = []
            if fuzz_statuses is not None:
                bodies = _fuzz_bodies()
                fuzz = [asyncio.create_task(_fuzzer(c, bodies, fuzz_statuses)) for _ in range(FUZZERS)]
            clients = asyncio.gather(*(_client(c, k, prompts, out, retries) for k in range(CLIENTS)))
            await clients
            wall = time.monotonic() - t0
            if fuzz_statuses is not None:
                fuzz_statuses["during"] = sum(fuzz_statuses.values())   # fuzzed while the clients ran
            await asyncio.gather(*fuzz)
            return out, retries, wall
    return asyncio.run(go())


def _check(out, alone):
    assert len(out) == CLIENTS * PER_CLIENT
    bad = [(i, s, b) for i, s, b in out if s != 200]
    assert not bad, bad[:3]
    for i, _, body in out:
        assert body["usage"]["completion_tokens"] == MAX_TOKENS
        assert body["choices"][0]["text"] == alone[i], (i, body["choices"][0]["text"], alone[i])


def test_64_clients_are_served_alone_and_beside_the_fuzzer(base_url):
    prompts = _prompts()
    with httpx.Client(base_url=base_url, timeout=60) as c:
        alone = [c.post("/v1/completions", json=_body(p)).json()["choices"][0]["text"] for p in prompts]

    out, retries, wall = _load(base_url, prompts)
    _check(out, alone)
    tokens = CLIENTS * PER_CLIENT * MAX_TOKENS
    print(f"\n{CLIENTS} clients x {PER_CLIENT} requests alone: {wall:.2f} s, {tokens / wall:.0f} tok/s, "
          f"{len(retries)} retried 429s")

    statuses: dict[int, int] = {}
    out2, retries2, wall2 = _load(base_url, prompts, statuses)
    _check(out2, alone)
    during = statuses.pop("during")
    print(f"the same beside the fuzzer: {wall2:.2f} s, {tokens / wall2:.0f} tok/s, {len(retries2)} retried 429s; "
          f"fuzzer statuses {dict(sorted(statuses.items()))}, {during} of them during the load")
    assert sum(statuses.values()) == FUZZ_REQUESTS and max(statuses) < 500, statuses
    assert during >= FUZZ_REQUESTS // 3, f"only {during} fuzzed requests overlapped the load"  # a real overlap

    with httpx.Client(base_url=base_url, timeout=60) as c:
        wait_idle(c, 1, timeout=60)
        assert c.get("/health").status_code == 200
