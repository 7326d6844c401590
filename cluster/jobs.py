"""Jobs: long-context requests run in the background of the ingress, polled or followed as events.

Phases: queued (waiting for a replica with room; a 429 from the cluster keeps a job queued and it
retries after Retry-After) -> prefill (with progress 0..1) -> decode -> done | failed | cancelled.
Events: {"type": "phase" | "progress" | "token" | "done" | "failed" | "cancelled", ...}.
Finished jobs are kept `ttl_s` seconds. Jobs live in the ingress replica (run the ingress with one
replica, the default, so every request for a job id reaches the replica that holds it).
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from .protocol import APIError, usage

log = logging.getLogger("ray.serve")
FINAL = ("done", "failed", "cancelled")


@dataclass
class Job:
    id: str
    prompt_tokens: int
    created: float = field(default_factory=time.time)
    phase: str = "queued"
    prefill_progress: float = 0.0
    tokens_generated: int = 0
    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    replica: str | None = None
    finished_at: float | None = None
    events: list[dict] = field(default_factory=list)
    task: asyncio.Task | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

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

    async def changed(self) -> None:
        await self._changed.wait()

    def view(self) -> dict:
        out = {"id": self.id, "object": "job", "created": int(self.created), "phase": self.phase,
               "prefill_progress": round(self.prefill_progress, 4), "tokens_generated": self.tokens_generated,
               "replica": self.replica}
        if self.phase == "done":
            out["result"] = {"text": "".join(self.text), "finish_reason": self.finish_reason,
                             "usage": usage(self.prompt_tokens, self.tokens_generated)}
        if self.error:
            out["error"] = self.error
        return out


class JobStore:
    """`open_stream(prepared)` -> (stream, replica) raises APIError (429 keeps the job queued)."""

    def __init__(self, open_stream: Callable[..., Awaitable], ttl_s: float = 3600.0):
        self.open_stream, self.ttl_s = open_stream, ttl_s
        self.jobs: dict[str, Job] = {}

    def _purge(self) -> None:
        now = time.time()
        for jid in [j.id for j in self.jobs.values() if j.finished_at and now - j.finished_at > self.ttl_s]:
            del self.jobs[jid]

    def submit(self, prep) -> Job:
        self._purge()
        job = Job(f"job-{uuid.uuid4().hex}", prep.prompt_tokens)
        self.jobs[job.id] = job
        # A fresh context: the task must not inherit the POST's Serve request context. Handle calls
        # made under one request context share its internal request id, and Ray Serve 2.60's
        # router indexes pending requests by that id, so two such calls in flight at once (this
        # job's and another's from the same context) would leave one of them never routed.
        job.task = contextvars.Context().run(asyncio.get_running_loop().create_task, self._run(job, prep))
        return job

    def get(self, job_id: str) -> Job:
        self._purge()
        job = self.jobs.get(job_id)
        if job is None:
            raise APIError(404, f"no job {job_id!r} (unknown, or its result expired)", code="job_not_found")
        return job

    async def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.phase not in FINAL and job.task is not None:
            job.task.cancel()
            try:
                await job.task
            except asyncio.CancelledError:
                pass
        return job

    async def events(self, job_id: str):
        job = self.get(job_id)
        i = 0
        while True:
            while i < len(job.events):
                yield job.events[i]
                i += 1
            if job.phase in FINAL:
                return
            await job.changed()

    async def _run(self, job: Job, prep) -> None:
        stream = None
        try:
            while stream is None:
                try:
                    stream, job.replica = await self.open_stream(prep)
                except APIError as e:
                    if e.status != 429:
                        job.error = e.message
                        job.set_phase("failed")
                        job.emit({"type": "failed", "error": e.message})
                        return
                    job.emit({"type": "phase", "phase": "queued", "reason": e.message})
                    await asyncio.sleep(e.retry_after_s or 1.0)
            async for m in stream:
                if m["type"] == "progress":
                    job.set_phase("prefill")
                    job.prefill_progress = m["layers_done"] / m["num_layers"]
                    job.emit({"type": "progress", "prefill_progress": round(job.prefill_progress, 4)})
                    continue
                if m["token_ids"]:
                    job.prefill_progress = 1.0
                    job.set_phase("decode")
                    job.tokens_generated = m["completion_tokens"]
                    job.text.append(m["text"])
                    job.emit({"type": "token", "text": m["text"], "tokens_generated": job.tokens_generated})
                if m["finished"]:
                    job.finish_reason = m["finish_reason"]
                    if m["error"] or m["finish_reason"] in ("error", "abort"):
                        job.error = m["error"] or "the request was aborted"
                        job.set_phase("failed")
                        job.emit({"type": "failed", "error": job.error})
                    else:
                        job.set_phase("done")
                        job.emit({"type": "done", **job.view()["result"]})
        except asyncio.CancelledError:
            if stream is not None:
                stream.cancel()
            job.set_phase("cancelled")
            job.emit({"type": "cancelled"})
        except Exception as e:
            log.exception("job %s failed", job.id)
            job.error = f"internal error: {type(e).__name__}"
            job.set_phase("failed")
            job.emit({"type": "failed", "error": job.error})
        finally:
            if stream is not None and job.phase not in ("done",):
                stream.cancel()
