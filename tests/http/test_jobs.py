"""The job runner (cluster/http/jobs.py) against a scripted engine: retries when a replica dies, backoff
while waiting for KV, resumption by a new ingress (same store), owners, cancellation. No Ray
cluster: the engine's streams are fakes, and a replica death is the error Ray raises for one."""
from __future__ import annotations

import asyncio
import time

import pytest

pytest.importorskip("ray")
from ray.exceptions import ActorDiedError  # noqa: E402

from retroinfer.cluster.http.frontend import Prepared  # noqa: E402
from retroinfer.cluster.http.jobs import JobManager  # noqa: E402
from retroinfer.cluster.http.jobs_store import JobsStore  # noqa: E402
from retroinfer.cluster.http.protocol import APIError  # noqa: E402
from retroinfer.engine.sampling import SamplingParams  # noqa: E402


def out(text, n, finished=False, reason=None, error=None):
    return {"type": "output", "token_ids": [1] if text else [], "text": text, "finished": finished,
            "finish_reason": reason, "error": error, "prompt_tokens": 3, "completion_tokens": n}


def progress(done, total=2):
    return {"type": "progress", "layers_done": done, "num_layers": total}


WHOLE = [progress(0), progress(1), progress(2), out("a", 1), out("b", 2), out("c", 3, True, "length")]


class Stream:
    """One accepted engine call: its messages, then (optionally) the replica dies, or it hangs."""

    def __init__(self, msgs, die_after: int | None = None, hang: bool = False, pause: float = 0.0):
        self.msgs, self.die_after, self.hang, self.pause, self.cancelled = msgs, die_after, hang, pause, False

    def __aiter__(self):
        return self._iter()

    async def _iter(self):
        for i, m in enumerate(self.msgs):
            if i == self.die_after:
                raise ActorDiedError()
            await asyncio.sleep(self.pause)
            yield m
        if self.hang:
            await asyncio.sleep(3600)

    def cancel(self):
        self.cancelled = True


class Engine:
    """`script`: per call, a Stream, an APIError or an exception; then WHOLE streams."""

    def __init__(self, script=()):
        self.script, self.calls, self.aborted = list(script), [], []

    async def open_stream(self, prep, exclude):
        self.calls.append((prep.request_id, list(exclude), time.monotonic()))
        step = self.script.pop(0) if self.script else Stream(WHOLE)
        if isinstance(step, BaseException):
            raise step
        return step, f"r{len(self.calls)}"

    async def abort(self, replica, request_id):
        self.aborted.append((replica, request_id))


def prep(rid="job-req"):
    return Prepared(rid, [5, 6, 7], SamplingParams(max_tokens=3), 4096)


def manager(store, engine, **kw):
    kw = {"retry_after_s": 0.01, "retry_max_s": 0.05, **kw}
    return JobManager(store, engine.open_stream, engine.abort, **kw)


async def finished(m, job_id, owner=None, timeout=5.0):
    deadline = time.monotonic() + timeout
    while m.get(job_id, owner).phase not in ("done", "failed", "cancelled"):
        assert time.monotonic() < deadline, m.get(job_id, owner).view()
        await asyncio.sleep(0.01)
    return m.get(job_id, owner)


def test_a_job_whose_replica_dies_is_retried_on_another(tmp_path):
    store = JobsStore(tmp_path / "jobs.sqlite")
    eng = Engine([Stream(WHOLE, die_after=4)])        # dies after prefill and one token

    async def run():
        m = manager(store, eng)
        job = m.submit(prep())
        return await finished(m, job.id)
    job = asyncio.run(run())
    assert job.phase == "done" and job.attempts == 2 and job.error is None
    assert job.view()["result"]["text"] == "abc"          # the lost attempt's token is not kept
    (rid1, ex1, _), (rid2, ex2, _) = eng.calls
    assert (rid1, rid2) == ("job-req-1", "job-req-2")     # a fresh engine request id per attempt
    assert ex1 == [] and ex2 == ["r1"]                    # not the replica that died
    reasons = [e.get("reason", "") for e in job.events if e["type"] == "phase" and e["phase"] == "queued"]
    assert any("r1 died (ActorDiedError); retrying" in r for r in reasons)
    row = store.get(job.id)
    assert row["phase"] == "done" and row["attempts"] == 2 and row["result_text"] == "abc"
    assert row["replica"] == "r2" and row["engine_request_id"] == "job-req-2"


def test_replica_deaths_are_bounded(tmp_path):
    store = JobsStore(tmp_path / "jobs.sqlite")
    eng = Engine([Stream(WHOLE, die_after=1), ActorDiedError(), Stream(WHOLE, die_after=0), Stream(WHOLE)])

    async def run():
        m = manager(store, eng, max_attempts=3)
        return await finished(m, m.submit(prep()).id)
    job = asyncio.run(run())
    assert job.phase == "failed" and job.attempts == 3 and len(eng.calls) == 3
    assert job.error.startswith("gave up after 3 attempt(s): the engine replica r3 died")
    assert store.get(job.id)["error"] == job.error


def test_request_errors_are_not_retried(tmp_path):
    eng = Engine([Stream([out("", 0, True, "error", "top_p too small")]), APIError(400, "bad")])

    async def run():
        m = manager(JobsStore(tmp_path / "jobs.sqlite"), eng)
        a = await finished(m, m.submit(prep()).id)
        b = await finished(m, m.submit(prep()).id)
        return a, b
    a, b = asyncio.run(run())
    assert (a.phase, a.error, a.attempts) == ("failed", "top_p too small", 1)
    assert (b.phase, b.error, b.attempts) == ("failed", "bad", 0)
    assert len(eng.calls) == 2


def test_waiting_for_kv_backs_off_exponentially_up_to_a_bound(tmp_path):
    full = [APIError(429, "full", retry_after_s=0.02) for _ in range(6)]
    eng = Engine(full)

    async def run():
        m = manager(JobsStore(tmp_path / "jobs.sqlite"), eng, retry_max_s=0.2)
        return await finished(m, m.submit(prep()).id)
    job = asyncio.run(run())
    assert job.phase == "done" and job.attempts == 1     # waits for KV are not attempts
    t = [c[2] for c in eng.calls]
    gaps = [b - a for a, b in zip(t, t[1:])]
    # 0.02 * 2^n (times 0.75..1), at most 0.2: 0.02, 0.04, 0.08, 0.16, 0.2, 0.2
    for n, gap in enumerate(gaps):
        want = min(0.2, 0.02 * 2 ** n)
        assert 0.75 * want - 0.005 <= gap <= want + 0.05, (n, gaps)


def test_a_finished_job_wakes_the_oldest_waiting_one(tmp_path):
    """KV freed by a job that ends: the longest-waiting job asks at once, not at its backoff."""
    eng = Engine([Stream(WHOLE, pause=0.05), APIError(429, "full", retry_after_s=30)])

    async def run():
        m = manager(JobsStore(tmp_path / "jobs.sqlite"), eng, retry_max_s=30)
        first = m.submit(prep("job-a"))
        await asyncio.sleep(0.01)
        second = m.submit(prep("job-b"))
        t0 = time.monotonic()
        await finished(m, first.id)
        await finished(m, second.id)
        return time.monotonic() - t0
    took = asyncio.run(run())
    assert took < 2, took


def test_a_new_ingress_resumes_unfinished_jobs_and_aborts_their_orphans(tmp_path):
    path = tmp_path / "jobs.sqlite"
    eng1 = Engine([Stream(WHOLE[:4], hang=True)])        # decoding when the ingress goes away

    async def first_ingress():
        m = manager(JobsStore(path), eng1)
        running = m.submit(prep("job-a"), owner="o1")
        done = m.submit(prep("job-b"), owner="o1")
        await finished(m, done.id, "o1")
        while m.get(running.id, "o1").phase != "decode":
            await asyncio.sleep(0.01)
        return running.id, done.id
    running_id, done_id = asyncio.run(first_ingress())  # asyncio.run cancels the job's task on exit
    row = JobsStore(path).get(running_id)
    assert row["phase"] == "decode" and row["attempts"] == 1     # not "cancelled": the ingress just went away

    eng2 = Engine()

    async def second_ingress():
        m = manager(JobsStore(path), eng2)
        assert m.start() == 1
        job = await finished(m, running_id, "o1")
        old = m.get(done_id, "o1")
        events = [e async for e in m.events(done_id, "o1")]
        listed = [j.id for j in m.list("o1")]
        return job, old, events, listed
    job, old, events, listed = asyncio.run(second_ingress())
    assert eng2.aborted == [("r1", "job-a-1")]              # the orphaned engine request
    assert job.phase == "done" and job.attempts == 2 and job.view()["result"]["text"] == "abc"
    assert eng2.calls[0][0] == "job-a-2"
    assert old.phase == "done" and old.view()["result"]["text"] == "abc"     # read back from the store
    assert [e["type"] for e in events] == ["phase", "done"] and events[1]["text"] == "abc"
    assert set(listed) == {running_id, done_id}


def test_a_job_interrupted_too_often_fails_on_resume(tmp_path):
    path = tmp_path / "jobs.sqlite"
    store = JobsStore(path)

    async def run(eng):
        m = manager(store, eng, max_attempts=2)
        m.start()
        return m
    for _ in range(2):                                      # two ingresses die mid-job
        eng = Engine([Stream(WHOLE[:2], hang=True)])

        async def once():
            m = await run(eng)
            if not m.jobs:
                m.submit(prep())
            while not eng.calls or store.unfinished()[0]["attempts"] < len(eng.calls):
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
        asyncio.run(once())
    (row,) = store.unfinished()
    assert row["attempts"] == 2

    async def last():
        m = await run(Engine())
        return await finished(m, row["id"])
    job = asyncio.run(last())
    assert job.phase == "failed" and job.error.startswith("gave up after 2 attempt(s)")


def test_owners_see_only_their_jobs(tmp_path):
    async def run():
        m = manager(JobsStore(tmp_path / "jobs.sqlite"), Engine())
        a = m.submit(prep(), owner="alice")
        b = m.submit(prep(), owner=None)
        await finished(m, a.id, "alice")
        for who in ("mallory", None):
            with pytest.raises(APIError) as e:
                m.get(a.id, who)
            assert e.value.status == 404
            with pytest.raises(APIError):
                await m.cancel(a.id, who)
        return [j.id for j in m.list("alice")], [j.id for j in m.list(None)], a.id, b.id
    alice, anon, a, b = asyncio.run(run())
    assert alice == [a] and anon == [b]


def test_cancel_stops_the_engine_call_and_is_recorded(tmp_path):
    store = JobsStore(tmp_path / "jobs.sqlite")
    stream = Stream(WHOLE[:4], hang=True)

    async def run():
        m = manager(store, Engine([stream]))
        job = m.submit(prep())
        while m.get(job.id).tokens_generated < 1:
            await asyncio.sleep(0.01)
        return await m.cancel(job.id)
    job = asyncio.run(run())
    assert job.phase == "cancelled" and stream.cancelled
    assert store.get(job.id)["phase"] == "cancelled" and store.unfinished() == []


def test_expired_results_are_gone(tmp_path):
    async def run():
        m = manager(JobsStore(tmp_path / "jobs.sqlite"), Engine(), ttl_s=0.05)
        job = await finished(m, m.submit(prep()).id)
        await asyncio.sleep(0.1)
        with pytest.raises(APIError):
            m.get(job.id)
        assert m.list() == []
    asyncio.run(run())
