"""Jobs: long-context requests run in the background of the ingress, polled or followed as events,
recorded in a durable store (`jobs_store.py`) so that they outlive the ingress.

Phases: queued (waiting for a replica with room) -> prefill (with progress 0..1) -> decode ->
done | failed | cancelled. Events: {"type": "phase" | "progress" | "token" | "done" | "failed" |
"cancelled", ...}.

- **Waiting for KV.** A job no replica has room for waits in a replica's queue like any request
  (phase queued, its replica known). When those queues are full, the 429 keeps the job queued
  here; it asks again after an exponential backoff (Retry-After, doubled each time, at most
  `retry_max_s`, with jitter), or sooner when another job finishes and frees KV (the oldest
  waiting job is woken first).
- **Replica death.** An engine call that raises an actor error (the replica died or is
  unreachable), or a stream that ends before the request did, is tried again on another replica
  from the start (the KV died with the replica), up to `max_attempts` sends in all; then the job
  fails with the reason.
- **Restarts.** `start()` resumes every job the store has as queued or running: it aborts the engine
  request the previous ingress left (`abort(replica, request_id)`, so that orphaned work stops
  holding KV) and sends the job again. Finished jobs are read back from the store until `ttl_s`.
- **Owners.** A job belongs to the `owner` it was submitted with (a hash of the API key, or None):
  another owner gets 404 for it, and `list(owner)` gives an owner's own jobs.
- **Cancel.** `cancel` (DELETE) cancels the engine call, so the replica aborts the request and frees
  its KV. A task cancelled for any other reason (the ingress shutting down) leaves the job's record
  as it was, for the next ingress to resume.

One ingress replica owns the store (the default: `num_replicas=1`).
"""
from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from ray.exceptions import RayActorError   # ActorDiedError, ActorUnavailableError

from retroinfer.engine.sampling import SamplingParams

from .frontend import Prepared
from .jobs_store import FINAL, JobsStore
from .protocol import APIError, usage

log = logging.getLogger("ray.serve")
PURGE_EVERY_S = 60.0
PHASES = ("queued", "prefill", "decode") + FINAL


def replica_lost(e: BaseException) -> bool:
    """Whether an engine call failed because its replica died or cannot be reached."""
    return isinstance(e, RayActorError)


@dataclass
class Job:
    id: str
    prompt_tokens: int
    owner: str | None = None
    created: float = field(default_factory=time.time)
    phase: str = "queued"
    prefill_progress: float = 0.0
    tokens_generated: int = 0
    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    replica: str | None = None
    engine_request_id: str | None = None
    attempts: int = 0
    finished_at: float | None = None
    events: list[dict] = field(default_factory=list)
    task: asyncio.Task | None = None
    cancel_requested: bool = False
    saved_at: float = 0.0
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    def from_row(cls, row: dict) -> "Job":
        text = row["result_text"]
        return cls(row["id"], row["prompt_tokens"], owner=row["owner"], created=row["created"], phase=row["phase"],
                   prefill_progress=row["prefill_progress"], tokens_generated=row["tokens_generated"],
                   text=[text] if text else [], finish_reason=row["finish_reason"], error=row["error"],
                   replica=row["replica"], engine_request_id=row["engine_request_id"], attempts=row["attempts"],
                   finished_at=row["finished_at"])

    def state(self) -> dict:
        """The store's columns that change while the job runs."""
        return {"phase": self.phase, "prefill_progress": self.prefill_progress,
                "tokens_generated": self.tokens_generated, "finish_reason": self.finish_reason,
                "error": self.error, "replica": self.replica, "engine_request_id": self.engine_request_id,
                "attempts": self.attempts, "finished_at": self.finished_at,
                "result_text": "".join(self.text) if self.phase == "done" else None}

    def emit(self, event: dict) -> None:
        self.events.append(event)
        self._changed.set()
        self._changed = asyncio.Event()

    def set_phase(self, phase: str, **extra) -> None:
        if phase != self.phase:
            self.phase = phase
            if phase in FINAL:
                self.finished_at = time.time()
            self.emit({"type": "phase", "phase": phase, **extra})

    def final_event(self) -> dict:
        if self.phase == "done":
            return {"type": "done", **self.view()["result"]}
        return {"type": "failed", "error": self.error} if self.phase == "failed" else {"type": "cancelled"}

    async def changed(self) -> None:
        await self._changed.wait()

    def view(self) -> dict:
        out = {"id": self.id, "object": "job", "created": int(self.created), "phase": self.phase,
               "prefill_progress": round(self.prefill_progress, 4), "tokens_generated": self.tokens_generated,
               "replica": self.replica, "attempts": self.attempts}
        if self.phase == "done":
            out["result"] = {"text": "".join(self.text), "finish_reason": self.finish_reason,
                             "usage": usage(self.prompt_tokens, self.tokens_generated)}
        if self.error:
            out["error"] = self.error
        return out


def _prepared(row: dict) -> Prepared:
    req = row["request"]
    return Prepared(req["request_id"], row["prompt_ids"], SamplingParams(**req["params"]), int(req["kv_bytes"]))


class JobManager:
    """`open_stream(prepared, exclude)` -> (stream, replica) raises APIError (429: no room now);
    `abort(replica, request_id)` aborts an engine request left by a previous ingress (best effort)."""

    def __init__(self, store: JobsStore, open_stream: Callable[..., Awaitable],
                 abort: Callable[[str, str], Awaitable] | None = None, *, ttl_s: float = 3600.0,
                 max_attempts: int = 3, retry_after_s: float = 1.0, retry_max_s: float = 30.0,
                 save_every_s: float = 1.0):
        self.store, self.open_stream, self.abort = store, open_stream, abort
        self.ttl_s, self.max_attempts, self.save_every_s = ttl_s, max_attempts, save_every_s
        self.retry_after_s, self.retry_max_s = retry_after_s, retry_max_s
        self.jobs: dict[str, Job] = {}       # this process's jobs: running, and finished ones until ttl_s
        self._waiting: dict[str, Job] = {}   # waiting for KV
        self._purged_at = 0.0

    # -- the API -------------------------------------------------------------------------------------
    def start(self) -> int:
        """Resumes the store's queued and running jobs (call on the event loop); -> how many."""
        rows = self.store.unfinished()
        for row in rows:
            job = Job.from_row(row)
            orphan = (job.replica, job.engine_request_id) if job.replica and job.engine_request_id else None
            job.phase, job.prefill_progress, job.tokens_generated = "queued", 0.0, 0
            job.emit({"type": "phase", "phase": "queued", "reason": "resumed after an ingress restart"})
            self.jobs[job.id] = job
            self._spawn(job, _prepared(row), orphan)
        if rows:
            log.info("jobs: resumed %d unfinished job(s) from %s", len(rows), self.store.path)
        return len(rows)

    def submit(self, prep: Prepared, owner: str | None = None) -> Job:
        self._purge()
        job = Job(f"job-{uuid.uuid4().hex}", prep.prompt_tokens, owner=owner)
        self.store.insert({"id": job.id, "owner": owner, "phase": job.phase, "prompt_ids": prep.prompt_ids,
                           "prompt_tokens": prep.prompt_tokens, "created": job.created,
                           "request": {"request_id": prep.request_id, "params": dataclasses.asdict(prep.params),
                                       "kv_bytes": prep.kv_bytes}})
        self.jobs[job.id] = job
        self._spawn(job, prep)
        return job

    def get(self, job_id: str, owner: str | None = None) -> Job:
        self._purge()
        job = self.jobs.get(job_id)
        if job is None:
            row = self.store.get(job_id)
            job = Job.from_row(row) if row is not None else None
        if job is None or job.owner != owner or self._expired(job, time.time()):
            raise APIError(404, f"no job {job_id!r} (unknown, or its result expired)", code="job_not_found")
        return job

    def list(self, owner: str | None = None, limit: int = 100, phase: str | None = None) -> list[Job]:
        """The owner's jobs, newest first."""
        self._purge()
        now = time.time()
        jobs = [self.jobs.get(r["id"]) or Job.from_row(r) for r in self.store.list(owner, limit, phase)]
        return [j for j in jobs if not self._expired(j, now)]

    async def cancel(self, job_id: str, owner: str | None = None) -> Job:
        job = self.get(job_id, owner)
        if job.phase not in FINAL and job.task is not None:
            job.cancel_requested = True
            job.task.cancel()
            try:
                await job.task
            except asyncio.CancelledError:
                pass
        return job

    async def events(self, job_id: str, owner: str | None = None):
        job = self.get(job_id, owner)
        if job.id not in self.jobs:      # finished before this ingress started: its end state only
            yield {"type": "phase", "phase": job.phase}
            yield job.final_event()
            return
        i = 0
        while True:
            while i < len(job.events):
                yield job.events[i]
                i += 1
            if job.phase in FINAL:
                return
            await job.changed()

    # -- bookkeeping ---------------------------------------------------------------------------------
    def _spawn(self, job: Job, prep: Prepared, orphan: tuple[str, str] | None = None) -> None:
        # A fresh context: the task must not inherit the POST's Serve request context. Handle calls
        # made under one request context share its internal request id, and Ray Serve 2.60's
        # router indexes pending requests by that id, so two such calls in flight at once (this
        # job's and another's from the same context) would leave one of them never routed.
        job.task = contextvars.Context().run(asyncio.get_running_loop().create_task,
                                             self._run(job, prep, orphan))

    def _expired(self, job: Job, now: float) -> bool:
        return job.finished_at is not None and now - job.finished_at > self.ttl_s

    def _purge(self) -> None:
        now = time.time()
        for jid in [j.id for j in self.jobs.values() if self._expired(j, now)]:
            del self.jobs[jid]
        if now - self._purged_at > PURGE_EVERY_S:
            self._purged_at = now
            self.store.purge(now - self.ttl_s)

    def _save(self, job: Job, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - job.saved_at >= self.save_every_s:
            job.saved_at = now
            self.store.update(job.id, **job.state())

    def _fail(self, job: Job, error: str) -> None:
        job.error = error
        job.set_phase("failed")
        job.emit({"type": "failed", "error": error})
        self._save(job, force=True)

    def _backoff(self, n: int, base: float | None) -> float:
        """The n-th wait in a row (0-based): base * 2^n, at most retry_max_s, times 0.75..1 (jitter)."""
        return min(self.retry_max_s, (base or self.retry_after_s) * 2 ** min(n, 30)) * random.uniform(0.75, 1.0)

    async def _wait_for_room(self, job: Job, delay: float) -> None:
        job._wake.clear()
        self._waiting[job.id] = job
        try:
            await asyncio.wait_for(job._wake.wait(), delay)
        except asyncio.TimeoutError:
            pass
        finally:
            self._waiting.pop(job.id, None)

    def _wake_oldest(self) -> None:
        """Some KV was freed: the job that has waited longest for it asks now."""
        if self._waiting:
            min(self._waiting.values(), key=lambda j: j.created)._wake.set()

    # -- one job -------------------------------------------------------------------------------------
    async def _run(self, job: Job, prep: Prepared, orphan: tuple[str, str] | None) -> None:
        stream = None
        try:
            if orphan is not None and self.abort is not None:
                await self._abort_orphan(*orphan)
            waits, exclude = 0, []
            while True:
                if job.attempts >= self.max_attempts:
                    self._fail(job, f"gave up after {job.attempts} attempt(s): "
                               f"{job.error or 'the job was interrupted each time'}")
                    return
                attempt = dataclasses.replace(prep, request_id=f"{prep.request_id}-{job.attempts + 1}")
                try:
                    stream, replica = await self.open_stream(attempt, exclude)
                except APIError as e:
                    if e.status != 429:
                        self._fail(job, e.message)
                        return
                    job.emit({"type": "phase", "phase": "queued", "reason": e.message})
                    await self._wait_for_room(job, self._backoff(waits, e.retry_after_s))
                    waits += 1
                    continue
                except Exception as e:
                    if not replica_lost(e):
                        raise
                    job.attempts += 1
                    lost = f"an engine replica died before it took the request ({type(e).__name__})"
                else:
                    waits = 0
                    job.attempts += 1
                    job.replica, job.engine_request_id = replica, attempt.request_id
                    self._save(job, force=True)
                    lost = await self._attempt(job, stream, replica)
                    if lost is None:
                        return
                    stream, exclude = None, [replica]
                log.warning("job %s: %s (attempt %d of %d)", job.id, lost, job.attempts, self.max_attempts)
                job.error = lost
                if job.attempts >= self.max_attempts:
                    continue      # fails at the top of the loop, with the reason
                job.prefill_progress, job.tokens_generated, job.text = 0.0, 0, []
                job.set_phase("queued", reason=f"{lost}; retrying")
                self._save(job, force=True)
                await asyncio.sleep(self._backoff(job.attempts - 1, self.retry_after_s))
        except asyncio.CancelledError:
            if stream is not None:
                stream.cancel()
            if not job.cancel_requested:
                raise            # the ingress is going away: the record stays for the next one to resume
            job.set_phase("cancelled")
            job.emit({"type": "cancelled"})
            self._save(job, force=True)
        except Exception as e:
            log.exception("job %s failed", job.id)
            self._fail(job, f"internal error: {type(e).__name__}")
        finally:
            if stream is not None and job.phase != "done":
                stream.cancel()
            if job.phase in FINAL:
                self._wake_oldest()

    async def _attempt(self, job: Job, stream, replica: str) -> str | None:
        """Follows one accepted attempt; -> None if the request finished, else why it was lost."""
        try:
            if await self._follow(job, stream):
                return None
            lost = f"the engine replica {replica} ended the request's stream early"
        except Exception as e:
            if not replica_lost(e):
                raise
            lost = f"the engine replica {replica} died ({type(e).__name__})"
        stream.cancel()
        return lost

    async def _follow(self, job: Job, stream) -> bool:
        """Reads one attempt's stream into the job; -> whether the request finished."""
        async for m in stream:
            if m["type"] == "progress":
                job.set_phase("prefill")
                job.prefill_progress = m["layers_done"] / m["num_layers"]
                job.emit({"type": "progress", "prefill_progress": round(job.prefill_progress, 4)})
                self._save(job, force=m["layers_done"] == 0)
                continue
            if m["token_ids"]:
                job.prefill_progress = 1.0
                if job.phase != "decode":
                    job.set_phase("decode")
                    self._save(job, force=True)
                job.tokens_generated = m["completion_tokens"]
                job.text.append(m["text"])
                job.emit({"type": "token", "text": m["text"], "tokens_generated": job.tokens_generated})
                self._save(job)
            if m["finished"]:
                job.finish_reason = m["finish_reason"]
                if m["error"] or m["finish_reason"] in ("error", "abort"):
                    self._fail(job, m["error"] or "the request was aborted")
                else:
                    job.error = None
                    job.set_phase("done")
                    job.emit({"type": "done", **job.view()["result"]})
                    self._save(job, force=True)
                return True
        return False

    async def _abort_orphan(self, replica: str, request_id: str) -> None:
        try:
            await self.abort(replica, request_id)
        except Exception as e:   # noqa: BLE001 - the replica may be gone, and its work with it
            log.info("jobs: could not abort %s on %s: %r", request_id, replica, e)
