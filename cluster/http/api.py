"""The HTTP ingress: OpenAI-compatible completions and chat (SSE streaming or whole), jobs for long
contexts, models, vLLM's /tokenize, /detokenize and /version, health, Prometheus metrics (every
engine replica's latest report, `serve/prometheus.py`), and the replicas' KV state.

A request is tokenised and checked here (`frontend.py`), then sent to the engine deployment with its
KV footprint, which the router (`serve/router.py`) places. The replica answers accepted or rejected
first: a rejection for lack of room is retried on the other replicas; when none has room the
request is sent once more to wait at the least loaded one (FCFS, at most `max_waiting_requests`
per replica), and only if that queue is full is it a 429 with Retry-After; a request larger than
any replica can hold is a 400 (decided here from the replicas' reported capacity when known, else
by the replica). Responses carry `x-retroinfer-replica`.
If the client disconnects, Serve cancels this handler; the engine call is cancelled with it and
the replica aborts the request, freeing its KV.
"""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from ray import serve
from ray.serve.exceptions import BackPressureError

from ..serve import prometheus
from ..serve.routing import replica_stats
from . import guard as G
from . import protocol as P
from .frontend import Frontend, Prepared
from .jobs import PHASES, JobManager
from .jobs_store import JobsStore

log = logging.getLogger("ray.serve")
HEALTH_PING_S = 2.0     # how long /health waits for an engine replica to answer


def _version() -> str:
    try:
        return version("retroinfer")
    except PackageNotFoundError:      # a source tree that was not installed
        return "unknown"


async def engine_ready(known_replicas: list | None, ping, timeout_s: float) -> bool:
    """Whether an engine replica can take work. A replica that the router lists has finished
    starting (model loaded, warm-up run); its latest report says whether its engine loop is
    healthy (a replica that has not reported yet counts as healthy). If the router lists
    replicas and every one reports a failed engine, none can (Serve is replacing them). If it
    lists none (no router in this process yet, or Serve starting them), whether one answers
    ``ping()`` True within timeout_s: Serve holds a call while no replica runs, so a slow answer
    means starting, and a replica whose engine failed answers False."""
    if known_replicas:
        return any(r.get("healthy", True) is not False for r in known_replicas)
    try:
        return bool(await asyncio.wait_for(ping(), timeout_s))
    except Exception as e:   # noqa: BLE001 - timed out, or no replica yet: starting, not an error
        log.debug("engine not ready: %r", e)
        return False


app = FastAPI(title="RetroInfer", description="Long-context LLM serving (KV cache as a vector store)")
app.add_middleware(G.Guard)     # API keys, body size and read time, queued jobs: before a body is parsed


@app.exception_handler(P.APIError)
async def _api_error(request: Request, e: P.APIError):
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, e: StarletteHTTPException):
    status = e.status_code
    return JSONResponse(P.APIError(status, str(e.detail), code={404: "not_found", 405: "method_not_allowed"}.get(
        status, "http_error")).body(), status_code=status, headers=getattr(e, "headers", None))


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, e: RequestValidationError):
    return JSONResponse(P.validation_error(e.errors()).body(), status_code=400)


@app.exception_handler(Exception)
async def _internal_error(request: Request, e: Exception):
    log.exception("unhandled error in %s %s", request.method, request.url.path)
    return JSONResponse(P.APIError(500, "internal server error", code="internal_error").body(), status_code=500)


class EngineStream:
    """The engine messages of one accepted request; cancels the engine call unless it finished."""

    def __init__(self, gen, pending: list[dict]):
        self.gen, self.pending, self.finished = gen, pending, False

    def __aiter__(self):
        return self._iter()

    async def _iter(self):
        try:
            for m in self.pending:
                self.finished |= m["type"] == "output" and m["finished"]
                yield m
            async for batch in self.gen:
                for m in batch:
                    self.finished |= m["type"] == "output" and m["finished"]
                    yield m
        finally:
            self.cancel()

    def cancel(self) -> None:
        if not self.finished:
            self.finished = True
            self.gen.cancel()


def job_owner(request: Request) -> str | None:
    """Whose jobs a request may see and make (a route dependency): `request.state.owner`, the hash
    of the caller's API key (`jobs_store.owner_of`) that authentication sets when a key is
    configured, else None. Module-level, not a method: Serve pickles the ingress class by value,
    and the string annotation `Request` of a method would not resolve there."""
    return getattr(request.state, "owner", None)


def _sse(obj) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


@serve.ingress(app)
class Ingress:
    def __init__(self, engine, opts: dict):
        self.engine = engine
        self.request_timeout_s = opts.get("request_timeout_s")    # completions and chats: then 408
        G.configure(G.settings_from(opts, lambda: sum(j.phase == "queued" for j in self.jobs.jobs.values())))
        self.front = Frontend(opts["model"], opts.get("served_model_name"), opts.get("dtype"),
                              opts.get("max_model_len"), opts.get("default_max_tokens", 256))
        self.retry_after_s = float(opts.get("retry_after_s", 1.0))
        self.engine_name = opts.get("engine_deployment", "LLMReplica")
        try:
            self.app_name = serve.get_replica_context().replica_id.deployment_id.app_name
        except Exception:
            self.app_name = ""
        self.jobs = JobManager(JobsStore(opts.get("jobs_db")), self.open_stream, self.abort_engine,
                               ttl_s=opts.get("job_ttl_s", 3600.0), max_attempts=opts.get("job_max_attempts", 3),
                               retry_after_s=self.retry_after_s, retry_max_s=opts.get("job_retry_max_s", 30.0))
        self.jobs.start()     # the jobs a previous ingress left queued or running

    # -- talking to the engine deployment ---------------------------------------------------------
    def replicas(self) -> list[dict]:
        return replica_stats(self.app_name, self.engine_name) or []

    async def open_stream(self, prep: Prepared, exclude: list[str] | None = None) -> tuple[EngineStream, str]:
        known = [r for r in self.replicas() if "capacity_bytes" in r]
        if known and prep.kv_bytes > max(r["capacity_bytes"] for r in known):
            cap = max(r["capacity_bytes"] for r in known)
            raise P.APIError(400, f"the request needs {prep.kv_bytes} bytes of KV cache "
                             f"({prep.prompt_tokens} prompt + {prep.params.max_tokens} max_tokens tokens); the "
                             f"largest replica holds {cap} bytes ({cap // self.front.bytes_per_token} tokens)",
                             code="kv_capacity_exceeded")
        keep_out = list(exclude or [])      # the caller's (a job's replica that died), and failed ones
        exclude, last, tries = list(keep_out), None, max(1, len(known))
        for attempt in range(tries + 1):
            wait = attempt == tries     # no replica has room now: queue at the least loaded one
            gen = self.engine.options(stream=True).generate.remote(
                prep.request_id, prep.prompt_ids, asdict(prep.params), kv_bytes=prep.kv_bytes,
                exclude=keep_out if wait else exclude, wait=wait)
            try:
                first = await gen.__anext__()
            except asyncio.CancelledError:   # the client went away, or the request timed out
                gen.cancel()
                raise
            except BackPressureError:
                raise P.APIError(429, "the server's request queue is full; retry later", code="queue_full",
                                 retry_after_s=self.retry_after_s) from None
            except StopAsyncIteration:
                raise P.APIError(500, "the engine closed the request", code="internal_error") from None
            head = first[0]
            if head["type"] == "accepted":
                return EngineStream(gen, first[1:]), head["replica"]
            if head["status"] != 429:
                raise P.APIError(head["status"], head["message"], code=head["code"])
            exclude.append(head["replica"])
            if head["code"] == "replica_unhealthy":
                keep_out.append(head["replica"])
            last = head
        if last["code"] == "replica_unhealthy":      # every replica tried is being replaced
            raise P.APIError(429, f"no engine replica can take requests now: {last['message']}",
                             code="replica_unhealthy", retry_after_s=last["retry_after_s"])
        raise P.APIError(429, f"no replica has room for this request now: {last['message']}",
                         code="kv_cache_full", retry_after_s=last["retry_after_s"])

    async def _replica_info(self, report: dict) -> dict:
        """A replica's own account of itself, or its latest report and why it did not answer (a
        replica being replaced, say): one replica's trouble is not the whole answer's."""
        try:
            return await asyncio.wait_for(self.engine.info.remote(target=report["replica"]), 30)
        except Exception as e:   # noqa: BLE001 - reported in the answer
            return {**{k: v for k, v in report.items() if k != "metrics"}, "error": f"{type(e).__name__}: {e}"[:300]}

    async def abort_engine(self, replica: str, request_id: str) -> bool:
        """Aborts an engine request that a previous ingress left running: its caller is gone, so
        Serve will not cancel it. -> False if the replica is gone (and the request with it)."""
        await asyncio.wait_for(self.engine.ping.remote(), 60)   # the router knows the replicas after a call
        if replica not in {r["replica"] for r in self.replicas()}:
            return False
        await asyncio.wait_for(self.engine.abort.remote(request_id, target=replica), 10)
        return True

    async def _run(self, prep: Prepared, stream: bool, render):
        """render(kind, text, finish_reason, usage) -> body dict; kind: "first" | "delta" | "final"."""
        until = G.deadline(self.request_timeout_s)
        es, replica = await G.within(self.open_stream(prep), until)
        headers = {"x-retroinfer-replica": replica, "x-retroinfer-request-id": prep.request_id}
        if stream:
            return StreamingResponse(self._sse_body(es, prep, render, until), media_type="text/event-stream",
                                     headers=headers)
        parts, last = [], None
        try:
            async for m in G.timed(es, until):
                if m["type"] == "output":
                    parts.append(m["text"])
                    last = m
        finally:
            es.cancel()
        if last is None or last["error"] or last["finish_reason"] in ("error", "abort"):
            raise self._engine_error(last, produced=bool(last and last["completion_tokens"]))
        return JSONResponse(render("final", "".join(parts), last["finish_reason"],
                                   P.usage(prep.prompt_tokens, last["completion_tokens"])), headers=headers)

    @staticmethod
    def _engine_error(last: dict | None, produced: bool) -> P.APIError:
        msg = (last or {}).get("error") or "the request was aborted"
        if not produced and (last or {}).get("error_code") == "kv_capacity_exceeded":
            return P.APIError(400, msg, code="kv_capacity_exceeded")
        return P.APIError(500, msg, code="engine_error")

    async def _sse_body(self, es: EngineStream, prep: Prepared, render, until: float | None = None):
        try:
            first = render("first", "", None, None)
            if first is not None:
                yield _sse(first)
            async for m in G.timed(es, until):
                if m["type"] != "output":
                    continue
                if m["error"] or m["finish_reason"] in ("error", "abort"):
                    err = self._engine_error(m, produced=bool(m["completion_tokens"]))
                    yield _sse(err.body())
                    break
                if m["text"] or m["finished"]:
                    yield _sse(render("delta", m["text"], m["finish_reason"] if m["finished"] else None, None))
                if m["finished"]:
                    use = P.usage(prep.prompt_tokens, m["completion_tokens"])
                    tail = render("usage", "", None, use)
                    if tail is not None:
                        yield _sse(tail)
            yield _sse("[DONE]")
        except P.APIError as e:      # request_timeout_s ran out mid-stream
            yield _sse(e.body())
            yield _sse("[DONE]")
        finally:
            es.cancel()

    # -- OpenAI-compatible routes ---------------------------------------------------------------
    @app.get("/health")
    async def health(self):
        """200 while an engine replica can take requests (model loaded, warm-up run, engine loop
        running), else 503: "starting" while Serve runs no engine replica (the HTTP proxy and this
        ingress are up long before a large model is), "unhealthy" while every one it runs
        reports a failed engine (Serve replaces them)."""
        reps = self.replicas()
        ready = await engine_ready(reps, self.engine.ping.remote, HEALTH_PING_S)
        reps = self.replicas() or reps
        healthy = sum(r.get("healthy", True) is not False for r in reps)
        status = "ok" if ready else ("unhealthy" if reps else "starting")
        body = {"status": status, "model": self.front.model_name, "replicas": len(reps), "healthy_replicas": healthy}
        return body if ready else JSONResponse(body, status_code=503)

    @app.get("/metrics")
    async def metrics(self):
        """Prometheus text: every engine replica's latest report (at most one routing-stats period
        old), a series per replica. Open, like /health: scrapers send no API key."""
        if replica_stats(self.app_name, self.engine_name) is None:   # one call creates this process's router
            try:
                await asyncio.wait_for(self.engine.ping.remote(), HEALTH_PING_S)
            except Exception as e:   # noqa: BLE001 - no replica yet: the families, without series
                log.debug("metrics: no engine replica answered: %r", e)
        return PlainTextResponse(prometheus.render(self.front.model_name, self.replicas()),
                                 media_type=prometheus.CONTENT_TYPE)

    @app.get("/version")
    async def version(self):
        return {"version": _version()}

    @app.post("/tokenize")
    async def tokenize(self, body: P.TokenizeRequest):
        return self.front.tokenize(body)

    @app.post("/detokenize")
    async def detokenize(self, body: P.DetokenizeRequest):
        return self.front.detokenize(body)

    @app.get("/v1/models")
    async def models(self):
        return {"object": "list", "data": [{"id": self.front.model_name, "object": "model", "created": 0,
                                            "owned_by": "retroinfer", "max_model_len": self.front.max_model_len}]}

    @app.post("/v1/completions")
    async def completions(self, body: P.CompletionRequest):
        prep = self.front.completion(body)
        name, usage_on = self.front.model_name, bool(body.stream_options and body.stream_options.include_usage)

        def render(kind, text, finish, use):
            if kind == "first":
                return None
            if kind == "usage":
                return P.usage_chunk(prep.request_id, name, "text_completion", use) if usage_on else None
            return P.completion_body(prep.request_id, name, text, finish, use, chunk=kind == "delta")
        return await self._run(prep, body.stream, render)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: P.ChatCompletionRequest):
        prep = self.front.chat(body)
        name, usage_on = self.front.model_name, bool(body.stream_options and body.stream_options.include_usage)

        def render(kind, text, finish, use):
            if kind == "first":
                return P.chat_chunk(prep.request_id, name, {"role": "assistant", "content": ""}, None)
            if kind == "usage":
                return P.usage_chunk(prep.request_id, name, "chat.completion.chunk", use) if usage_on else None
            if kind == "delta":
                return P.chat_chunk(prep.request_id, name, {"content": text} if text else {}, finish)
            return P.chat_body(prep.request_id, name, text, finish, use)
        return await self._run(prep, body.stream, render)

    # -- jobs ----------------------------------------------------------------------------------
    @app.post("/v1/jobs")
    async def submit_job(self, body: P.JobRequest, owner: str | None = Depends(job_owner)):
        job = self.jobs.submit(self.front.job(body), owner=owner)
        return JSONResponse(job.view(), status_code=202)

    @app.get("/v1/jobs")
    async def list_jobs(self, limit: int = Query(100, ge=1, le=1000), phase: str | None = None,
                        owner: str | None = Depends(job_owner)):
        """The caller's own jobs, newest first."""
        if phase is not None and phase not in PHASES:
            raise P.APIError(400, f"phase must be one of {', '.join(PHASES)}", code="invalid_request", param="phase")
        jobs = self.jobs.list(owner, limit + 1, phase)
        return {"object": "list", "data": [j.view() for j in jobs[:limit]], "has_more": len(jobs) > limit}

    @app.get("/v1/jobs/{job_id}")
    async def get_job(self, job_id: str, owner: str | None = Depends(job_owner)):
        return self.jobs.get(job_id, owner).view()

    @app.delete("/v1/jobs/{job_id}")
    async def cancel_job(self, job_id: str, owner: str | None = Depends(job_owner)):
        return (await self.jobs.cancel(job_id, owner)).view()

    @app.get("/v1/jobs/{job_id}/events")
    async def job_events(self, job_id: str, owner: str | None = Depends(job_owner)):
        self.jobs.get(job_id, owner)    # 404 before the stream starts

        async def body():
            async for ev in self.jobs.events(job_id, owner):
                yield f"event: {ev['type']}\n{_sse(ev)}"
            yield _sse("[DONE]")
        return StreamingResponse(body(), media_type="text/event-stream")

    # -- cluster state -------------------------------------------------------------------------------
    @app.get("/v1/cluster")
    async def cluster(self, detail: bool = False):
        """The engine replicas' latest KV reports; `detail=true` asks each replica directly."""
        reps = self.replicas()
        if not reps:   # no call routed yet from this process: one call creates the router
            await asyncio.wait_for(self.engine.ping.remote(), 30)
            reps = self.replicas()
        if detail:   # one call at a time: concurrent calls under one request context hang (see jobs.py)
            reps = [await self._replica_info(r) for r in reps]
        else:        # their request metrics are /metrics's
            reps = [{k: v for k, v in r.items() if k != "metrics"} for r in reps]
        return {"model": self.front.model_name, "bytes_per_token": self.front.bytes_per_token, "replicas": reps}
