"""The engine on its own thread, for an asyncio server.

`EngineLoop` runs `LLMEngine.step()` while there is work and sleeps on an Event otherwise. A
request is admitted by `submit`, which hands it to the engine, whose scheduler checks its KV
footprint against the one KV ledger (the replica's capacity less the footprints of requests already
admitted; the replica knows these exactly, the router only approximately): no room now is a 429
(so the ingress can try another replica) unless the caller asks to wait (`wait=True`: the ingress,
once no replica has room), when the request joins the engine's queue, at most `max_waiting` of
them; never fits is a 400. It returns an asyncio.Queue that receives the request's messages:

  {"type": "progress", "layers_done", "num_layers"}       prefill progress
  {"type": "output", "token_ids", "text", "finished", "finish_reason", "error",
   "prompt_tokens", "completion_tokens", "error_code"}     one engine step's worth

Delivery crosses threads with `loop.call_soon_threadsafe`. `abort` is thread-safe; the engine frees
the request's KV at its next step. What the loop sees goes to its `observer` (`monitor.LoopObserver`):
each request as it is admitted, scheduled and answered (an output is timed at the end of the engine
step that made it), and the engine's typed stats (`EngineStats`, also kept as `stats`) every
`stats_interval_s` while busy and about once a second while idle, so gauges fed from them keep
reporting the idle values. The loop keeps no metrics or routing figures of its own.

A request that fails on its own account finishes with an error inside the engine (which frees its
KV) and the others go on. An exception out of `engine.step()` is the engine's: every admitted
request ends with an error, the loop becomes unhealthy (`healthy` False: the replica's
`check_health` raises and Serve replaces it) and `submit` refuses new requests with a 429, so the
ingress tries another replica.

A step that never returns (a hung kernel or collective, a deadlocked stage) is caught the same way:
once one engine step has run for `step_timeout_s`, `healthy` turns False and every admitted request
ends with an error, instead of their clients waiting on a replica that still looks healthy. Every
step is short by construction (prefill is sliced by the scheduler's budget, layer-wise prefill
yields per chunk and layer), so the default of 10 minutes only ever fires on a real stall.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time

from retroinfer.engine.llm_engine import LLMEngine
from retroinfer.engine.protocol import AdmissionError, EngineStats, ExecutorFailure
from retroinfer.engine.sampling import SamplingParams

from .monitor import LoopObserver, ReplicaMonitor

log = logging.getLogger("ray.serve.retroinfer")    # the replica's log under Serve


class Rejected(Exception):
    """The replica will not take the request: `status` 429 (no room now) or 400 (never fits)."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def to_message(self, retry_after_s: float) -> dict:
        return {"type": "rejected", "status": self.status, "code": self.code, "message": self.message,
                "retry_after_s": retry_after_s}


def _put_all(puts: list[tuple[asyncio.Queue, dict]]) -> None:
    for q, msg in puts:
        q.put_nowait(msg)


class EngineLoop:
    def __init__(self, engine: LLMEngine, *, observer: LoopObserver | None = None, stats_interval_s: float = 0.25,
                 log_interval_s: float = 30.0, step_timeout_s: float | None = 600.0,
                 max_waiting: int | None = 32):
        self.engine = engine
        self.step_timeout_s = step_timeout_s
        self._step_started: float | None = None    # monotonic start of the step in flight
        self.engine.on_prefill_progress = self._on_progress
        self.observer: LoopObserver = observer or ReplicaMonitor()
        self.stats_interval_s = stats_interval_s
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.engine.reject_when_full = True         # the engine's KV ledger answers 429 for no room now,
        self.engine.max_waiting = max_waiting       # unless asked to wait, up to this many
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self.failure: str | None = None             # why the engine failed (then unhealthy)
        self.stats: EngineStats = self._engine_stats()
        self._stats_at = time.monotonic()
        self.log_interval_s = log_interval_s
        self._timing = [0, 0.0, 0.0, time.monotonic()]    # steps, seconds in step(), seconds between, since
        self._step_end = time.perf_counter()
        self.thread = threading.Thread(target=self._run, name="retroinfer-engine", daemon=True)
        self.thread.start()

    # -- called from the server's event loop ---------------------------------------------------
    @property
    def outstanding_bytes(self) -> int:
        """KV promised to admitted requests: the engine's ledger (as of the last stats)."""
        return self.stats.outstanding_bytes

    @property
    def num_requests(self) -> int:
        """Requests admitted and not yet answered to the end."""
        return len(self._streams)

    @property
    def healthy(self) -> bool:
        self._check_stall()
        return self.thread.is_alive() and self.failure is None

    def _check_stall(self) -> None:
        """A step past `step_timeout_s` fails the replica (once): its requests end with an error."""
        started = self._step_started
        if self.failure is not None or started is None or self.step_timeout_s is None:
            return
        ran = time.monotonic() - started
        if ran < self.step_timeout_s:
            return
        self.failure = f"an engine step has not returned for {ran:.0f} s (step_timeout_s {self.step_timeout_s:g})"
        log.error("%s: the replica is unhealthy and will be replaced", self.failure)
        self._fail_all(f"internal error in the engine: {self.failure}")

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams, kv_bytes: int,
               wait: bool = False) -> asyncio.Queue:
        """Admit the request or raise `Rejected`. Must run on the event loop that reads the queue.
        `wait`: with no KV room now, queue for it (up to `max_waiting` requests) instead of a 429."""
        if not self.healthy:
            raise Rejected(429, "replica_unhealthy", f"this replica's engine failed ({self.failure or 'stopped'}) "
                           "and is being replaced")
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if request_id in self._streams:
                raise Rejected(400, "invalid_request", f"request id {request_id!r} is already in use")
            self._streams[request_id] = (asyncio.get_running_loop(), q)
        self.observer.admitted(request_id, len(prompt_ids))     # before the engine thread can see it
        try:   # validates once and admits through the engine's KV ledger (`kv_bytes`: the ingress's figure)
            self.engine.add_request(request_id, prompt_ids, params, wait=wait)
        except AdmissionError as e:   # NO_ROOM_NOW: 429 kv_cache_full; NEVER_FITS: 400 kv_capacity_exceeded
            self._forget(request_id)
            raise Rejected(e.admission.status, e.admission.code, str(e)) from None
        except Exception as e:   # noqa: BLE001 - the request's own: nothing of it is kept
            self._forget(request_id)
            raise Rejected(400, "invalid_request", str(e) if isinstance(e, ValueError) else
                           f"the request could not be added: {type(e).__name__}") from None
        self._wake.set()
        return q

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self._wake.set()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self.thread.join(timeout=10)

    # -- the engine thread ----------------------------------------------------------------------
    def _forget(self, request_id: str):
        """Drops the request's stream (-> it, or None) and its metrics."""
        with self._lock:
            entry = self._streams.pop(request_id, None)
        self.observer.forget(request_id)
        return entry

    def _record(self, request_id: str, completion_tokens: int, finished: bool, reason, t: float) -> None:
        try:
            self.observer.output(request_id, completion_tokens, finished, reason, t)
        except Exception:   # metrics must never take the loop down
            log.exception("recording metrics failed")

    def _send(self, request_id: str, msg: dict, last: bool = False) -> None:
        self._send_all([(request_id, msg, last)])

    def _send_all(self, items: list[tuple[str, dict, bool]]) -> None:
        """Hands (request_id, message, last) to their streams: one wake-up of each consumer loop for
        the whole step, not one per request (the loop thread and the server share the GIL)."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for rid, msg, last in items:
            if last:
                entry = self._forget(rid)
            else:
                with self._lock:
                    entry = self._streams.get(rid)
            if entry is not None:
                by_loop.setdefault(entry[0], []).append((entry[1], msg))
        for loop, puts in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, puts)
            except RuntimeError:      # the consumer's loop is closed
                pass

    def _on_progress(self, request_id: str, done: int, total: int) -> None:
        if done == 0:     # its KV is reserved: the prefill starts
            self.observer.scheduled(request_id)
        self._send(request_id, {"type": "progress", "layers_done": done, "num_layers": total})

    def _engine_stats(self) -> EngineStats:
        try:
            return self.engine.engine_stats()
        except Exception:   # stats must never take the loop down
            log.exception("engine.engine_stats() failed")
            return getattr(self, "stats", None) or EngineStats()

    def _refresh_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._stats_at >= self.stats_interval_s:
            self.stats, self._stats_at = self._engine_stats(), now
            try:
                self.observer.engine_stats(self.stats)
            except Exception:
                log.exception("the observer failed on the engine's stats")

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:   # the loop itself broke: the replica must be replaced
            self.failure = f"engine loop stopped: {type(e).__name__}"
            log.exception("engine loop stopped")
            self._fail_all(f"internal error in the engine: {type(e).__name__}")
            raise

    def _loop(self) -> None:
        idle = True
        while not self._stop:
            if not self.engine.has_work():
                self._refresh_stats(force=not idle)    # just idle: KV was freed, report it now; then
                idle = True                            # about once a second, so gauges stay set
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            t0 = time.perf_counter()
            if not idle:
                self._timing[2] += t0 - self._step_end
            idle = False
            self._step_started = time.monotonic()
            try:
                outputs = self.engine.step()
                self._step_end = time.perf_counter()
                self._timing[0] += 1
                self._timing[1] += self._step_end - t0
            except Exception as e:   # not a request's (the engine keeps those to the request)
                first = self.failure is None
                why = str(e) if isinstance(e, ExecutorFailure) else type(e).__name__   # ours to show, or a type
                self.failure = self.failure or f"engine step failed: {why}"
                if first:
                    log.exception("engine step failed: the replica is unhealthy and will be replaced")
                self._fail_all(f"internal error in the engine: {why}")
                time.sleep(0.5)      # the step that frees the aborted requests' KV may fail again
                continue
            finally:
                self._step_started = None
            t = time.perf_counter()          # when this step's tokens became available
            for out in outputs:
                self._record(out.request_id, out.completion_tokens, out.finished, out.finish_reason, t)
            self._send_all([(out.request_id, {"type": "output", **vars(out)}, out.finished) for out in outputs])
            self._refresh_stats()
            self._log_timing()

    def _log_timing(self) -> None:
        """Now and then, where the loop's time goes: in engine steps (prefill chunks and decode
        steps alike), or between them (delivery, stats, the GIL)."""
        n, busy, between, since = self._timing
        if time.monotonic() - since < self.log_interval_s or not n:
            return
        log.info("engine loop: %d steps, %.2f ms a step, %.2f ms between steps", n, 1e3 * busy / n,
                 1e3 * between / n)
        self._timing = [0, 0.0, 0.0, time.monotonic()]

    def _fail_all(self, message: str) -> None:
        with self._lock:
            ids = list(self._streams)
        t = time.perf_counter()
        for rid in ids:
            self.engine.abort(rid)
            self._record(rid, 0, True, "error", t)
            self._send(rid, {"type": "output", "request_id": rid, "token_ids": [], "text": "", "finished": True,
                             "finish_reason": "error", "error": message, "prompt_tokens": 0,
                             "completion_tokens": 0, "error_code": None}, last=True)
