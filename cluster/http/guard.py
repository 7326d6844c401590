"""The ingress's guard: an ASGI middleware in front of the API that decides, before a body is
parsed, who may call and how much a request may ask of the server. Each refusal is an
OpenAI-style JSON error:

- **401** `invalid_api_key`: API keys are configured (`api_key` in the deployment args, or
  `RETROINFER_API_KEY`) and a request for `/v1/*`, `/tokenize` or `/detokenize` (`GUARDED`) has no
  `Authorization: Bearer <key>` with one of them. `/health`, `/metrics` and `/version` stay open
  (probes and Prometheus send no key; vLLM leaves everything outside `/v1` open, its tokenizer
  routes included: here those do work on the ingress for whoever calls, so they take the key). The key's SHA-256 becomes the request's `state.owner`, so jobs
  belong to the key that made them (the same hash as `jobs_store.owner_of`); no key, no owner.
- **413** `body_too_large`: the body is over `max_body_bytes`, by its Content-Length (refused
  before a byte of it is read) or as it arrives (chunked).
- **408** `body_timeout`: the body took longer than `body_timeout_s` to arrive (a client that
  declares more bytes than it sends would otherwise hold the request forever).
- **429** `too_many_jobs`: `max_queued_jobs` jobs already wait for a replica (`POST /v1/jobs`).

The body is read here, whole, within those limits, and replayed to the app. `deadline` and
`timed` bound the rest of a request's life (`request_timeout_s`: 408 `request_timeout`).

One ingress per process: the ingress calls `configure` in its constructor and the middleware
reads the module's `SETTINGS` on each request (Serve freezes a copy of the app, middleware
arguments included, when the class is decorated, before any deployment argument is known).
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import time
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable

from .protocol import APIError

DEFAULT_MAX_BODY_BYTES = 32 << 20   # 1M token ids as JSON are about 8 MB ("128000, " per token)
BODY_METHODS = ("POST", "PUT", "PATCH")
GUARDED = ("/v1", "/tokenize", "/detokenize")    # these paths and those below them need a key


def key_hash(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def parse_keys(value: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """Keys from the deployment's `api_key` (one, or a list) or the environment (comma-separated)."""
    if not value:
        return ()
    parts = value.split(",") if isinstance(value, str) else list(value)
    return tuple(k.strip() for k in parts if k and k.strip())


@dataclass
class GuardSettings:
    key_hashes: tuple[str, ...] = ()            # SHA-256 of the accepted keys; empty: no authentication
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    body_timeout_s: float | None = 30.0
    max_queued_jobs: int | None = None
    queued_jobs: Callable[[], int] | None = None    # how many jobs wait now
    retry_after_s: float = 1.0


SETTINGS = GuardSettings()


def configure(settings: GuardSettings) -> None:
    global SETTINGS
    SETTINGS = settings


def settings_from(opts: dict, queued_jobs: Callable[[], int] | None = None) -> GuardSettings:
    """From the ingress's options (`deployments/app.py`); with no key hashes there, the keys in
    this process's RETROINFER_API_KEY (e.g. from a Kubernetes Secret on the ingress's pod)."""
    hashes = tuple(opts.get("api_key_hashes") or ()) or \
        tuple(key_hash(k) for k in parse_keys(os.environ.get("RETROINFER_API_KEY")))
    return GuardSettings(key_hashes=hashes, max_body_bytes=int(opts.get("max_body_bytes", DEFAULT_MAX_BODY_BYTES)),
                         body_timeout_s=opts.get("body_timeout_s", 30.0), max_queued_jobs=opts.get("max_queued_jobs"),
                         queued_jobs=queued_jobs, retry_after_s=float(opts.get("retry_after_s", 1.0)))


class _Refused(Exception):
    def __init__(self, error: APIError, headers: dict | None = None):
        super().__init__(error.message)
        self.error, self.extra_headers = error, headers or {}


class Guard:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        s = SETTINGS
        try:
            owner = self._authenticate(scope, s)
            if owner is not None:
                scope["state"] = {**scope.get("state", {}), "owner": owner}
            if s.max_queued_jobs is not None and s.queued_jobs is not None and scope["method"] == "POST" \
                    and scope["path"].rstrip("/") == "/v1/jobs" and s.queued_jobs() >= s.max_queued_jobs:
                raise _Refused(APIError(429, f"{s.max_queued_jobs} jobs already wait for a replica; retry later",
                                        code="too_many_jobs", retry_after_s=s.retry_after_s))
            if scope["method"] in BODY_METHODS:
                receive = await self._read_body(scope, receive, s)
        except _Refused as r:
            return await _respond(send, r.error, r.extra_headers)
        await self.app(scope, receive, send)

    @staticmethod
    def _authenticate(scope, s: GuardSettings) -> str | None:
        if not s.key_hashes:
            return None
        path = scope["path"]
        if not any(path == p or path.startswith(p + "/") for p in GUARDED):
            return None
        auth = _header(scope, b"authorization")
        scheme, _, key = auth.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise _Refused(APIError(401, "no API key: send it as the header 'Authorization: Bearer <key>'",
                                    code="invalid_api_key"), {"www-authenticate": "Bearer"})
        h = key_hash(key)
        if not any(hmac.compare_digest(h, k) for k in s.key_hashes):
            raise _Refused(APIError(401, "the API key is not valid", code="invalid_api_key"),
                           {"www-authenticate": "Bearer"})
        return h

    @staticmethod
    async def _read_body(scope, receive, s: GuardSettings):
        """The whole body, within the size and time limits; -> a `receive` that replays it, then
        hands on to the client's (the app waits on that for a disconnect while it streams)."""
        declared = _header(scope, b"content-length")
        if declared:
            if not declared.isdigit():
                raise _Refused(APIError(400, "the Content-Length header is not a number", code="invalid_request"))
            if int(declared) > s.max_body_bytes:
                raise _Refused(_too_large(s))
        deadline = time.monotonic() + s.body_timeout_s if s.body_timeout_s else None
        chunks, size, more = [], 0, True
        while more:
            try:
                msg = await (receive() if deadline is None else
                             asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic())))
            except asyncio.TimeoutError:
                raise _Refused(APIError(408, f"the request body did not arrive within {s.body_timeout_s:g} s",
                                        code="body_timeout")) from None
            if msg["type"] == "http.disconnect":
                pending = [msg]
                break
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > s.max_body_bytes:
                raise _Refused(_too_large(s))
            chunks.append(chunk)
            more = msg.get("more_body", False)
        else:
            pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return pending.pop(0) if pending else await receive()
        return replay


def _too_large(s: GuardSettings) -> APIError:
    return APIError(413, f"the request body is larger than {s.max_body_bytes} bytes (max_body_bytes)",
                    code="body_too_large")


def _header(scope, name: bytes) -> str:
    for k, v in scope.get("headers", ()):
        if k.lower() == name:
            return v.decode("latin-1").strip()
    return ""


async def _respond(send, e: APIError, extra: dict) -> None:
    body = json.dumps(e.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), str(v).encode()) for k, v in {**e.headers, **extra}.items()]
    if e.status in (408, 413):      # the rest of the body is not read: the connection cannot be reused
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": e.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# -- the rest of a request's life --------------------------------------------------------------------
def deadline(timeout_s: float | None) -> float | None:
    return time.monotonic() + timeout_s if timeout_s else None


def timeout_error() -> APIError:
    return APIError(408, "the request took longer than the server's request_timeout_s", code="request_timeout")


async def within(aw: Awaitable, until: float | None):
    """`await aw`, or APIError 408 at `until` (time.monotonic()); `aw` is cancelled then."""
    if until is None:
        return await aw
    try:
        return await asyncio.wait_for(aw, max(0.0, until - time.monotonic()))
    except asyncio.TimeoutError:
        raise timeout_error() from None


async def timed(items: AsyncIterator, until: float | None):
    """The items of an async iterator until `until`, then APIError 408 (the iterator is closed)."""
    it = items.__aiter__()
    while True:
        try:
            item = await within(it.__anext__(), until)
        except StopAsyncIteration:
            return
        yield item
