"""The jobs' durable record: one SQLite file (stdlib sqlite3, WAL) at the path the deployment names
(`jobs_db`, else `default_path()`), so that an ingress restart, or a `serve run` restart, loses no
job and no result.

A row holds what is needed to run the job again (the prompt's token ids as little-endian int32,
the sampling parameters and KV footprint as JSON), its state (phase, prefill progress, tokens
generated, result text, finish reason, error), who made it (`owner`: a hash of the API key, or
NULL), how often it was sent to an engine replica (`attempts`), the engine request and replica of
the latest attempt (so a restarted ingress can abort work its predecessor left behind), and
timestamps (`created`, `updated`, `finished_at`, seconds since the epoch).

Writes are autocommit, `synchronous=NORMAL`: a committed write survives the process dying; a power
loss may roll back the last ones. Calls are short and made from the ingress's event loop.
"""
from __future__ import annotations

import array
import hashlib
import json
import os
import sqlite3
import sys
import threading
import time
from pathlib import Path

FINAL = ("done", "failed", "cancelled")
SCHEMA_VERSION = 1
COLUMNS = ("id", "owner", "phase", "request", "prompt_ids", "prompt_tokens", "prefill_progress",
           "tokens_generated", "result_text", "finish_reason", "error", "replica", "engine_request_id",
           "attempts", "created", "updated", "finished_at")
LIGHT = tuple(c for c in COLUMNS if c != "prompt_ids")     # what a status read needs
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT,
    phase TEXT NOT NULL,
    request TEXT NOT NULL,
    prompt_ids BLOB NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    prefill_progress REAL NOT NULL DEFAULT 0,
    tokens_generated INTEGER NOT NULL DEFAULT 0,
    result_text TEXT,
    finish_reason TEXT,
    error TEXT,
    replica TEXT,
    engine_request_id TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner, created);
CREATE INDEX IF NOT EXISTS jobs_by_phase ON jobs (phase);
"""


def owner_of(api_key: str | None) -> str | None:
    """The `owner` recorded for a caller: the SHA-256 of its API key (never the key), or None."""
    return hashlib.sha256(api_key.encode()).hexdigest() if api_key else None


def pack_ids(ids: list[int]) -> bytes:
    a = array.array("i", ids)
    if sys.byteorder == "big":
        a.byteswap()
    return a.tobytes()


def unpack_ids(blob: bytes) -> list[int]:
    a = array.array("i")
    a.frombytes(blob)
    if sys.byteorder == "big":
        a.byteswap()
    return a.tolist()


def default_path() -> Path:
    """Where a store goes when the deployment names none: $RETROINFER_JOBS_DB of this process (the
    ingress's node, e.g. a Kubernetes pod's volume), else ~/.cache/retroinfer/jobs.sqlite."""
    return Path(os.environ.get("RETROINFER_JOBS_DB") or Path.home() / ".cache" / "retroinfer" / "jobs.sqlite")


class JobsStore:
    """Rows are dicts keyed by COLUMNS; `request` is a dict and `prompt_ids` a list of ints here."""

    def __init__(self, path: str | Path | None = None):
        path = ":memory:" if str(path) == ":memory:" else Path(path or default_path()).expanduser()
        if path != ":memory:":
            path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=10.0)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"{path}: jobs store schema {version} is newer than this code's {SCHEMA_VERSION}")
        self._db.executescript(_SCHEMA)
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @property
    def journal_mode(self) -> str:
        return self._db.execute("PRAGMA journal_mode").fetchone()[0]

    # -- rows --------------------------------------------------------------------------------------
    @staticmethod
    def _encode(fields: dict) -> dict:
        bad = set(fields) - set(COLUMNS)
        if bad:
            raise KeyError(f"unknown job column(s) {sorted(bad)}")
        out = dict(fields)
        if "request" in out:
            out["request"] = json.dumps(out["request"])
        if "prompt_ids" in out:
            out["prompt_ids"] = pack_ids(out["prompt_ids"])
        return out

    @staticmethod
    def _decode(row: sqlite3.Row) -> dict:
        out = dict(row)
        if "request" in out:
            out["request"] = json.loads(out["request"])
        if "prompt_ids" in out:
            out["prompt_ids"] = unpack_ids(out["prompt_ids"])
        return out

    def insert(self, row: dict) -> None:
        now = time.time()
        row = self._encode({"created": now, "updated": now, **row})
        cols = ", ".join(row)
        with self._lock:
            self._db.execute(f"INSERT INTO jobs ({cols}) VALUES ({', '.join('?' * len(row))})", tuple(row.values()))

    def update(self, job_id: str, **fields) -> None:
        fields = self._encode({"updated": time.time(), **fields})
        if fields.get("phase") in FINAL and "finished_at" not in fields:
            fields["finished_at"] = fields["updated"]
        sets = ", ".join(f"{c} = ?" for c in fields)
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*fields.values(), job_id))

    def get(self, job_id: str, with_prompt: bool = False) -> dict | None:
        cols = ", ".join(COLUMNS if with_prompt else LIGHT)
        with self._lock:
            row = self._db.execute(f"SELECT {cols} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else self._decode(row)

    def list(self, owner: str | None, limit: int = 100, phase: str | None = None) -> list[dict]:
        """The owner's jobs (owner None: the jobs made without a key), newest first."""
        where, args = ["owner IS ?"], [owner]
        if phase is not None:
            where.append("phase = ?")
            args.append(phase)
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(LIGHT)} FROM jobs WHERE {' AND '.join(where)} "
                                    "ORDER BY created DESC, id LIMIT ?", (*args, int(limit))).fetchall()
        return [self._decode(r) for r in rows]

    def unfinished(self) -> list[dict]:
        """Jobs not yet done, failed or cancelled, oldest first, with their prompts (to resume)."""
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(COLUMNS)} FROM jobs WHERE phase NOT IN "
                                    f"({', '.join('?' * len(FINAL))}) ORDER BY created, id", FINAL).fetchall()
        return [self._decode(r) for r in rows]

    def purge(self, finished_before: float) -> int:
        """Deletes the jobs that finished before the given time; -> how many."""
        with self._lock:
            cur = self._db.execute("DELETE FROM jobs WHERE finished_at IS NOT NULL AND finished_at < ?",
                                   (finished_before,))
        return cur.rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()
