"""The SQLite jobs store (cluster/http/jobs_store.py): rows round-trip, survive a reopen, are listed by
owner, and finished ones are purged after their time."""
from __future__ import annotations

import sqlite3
import time

import pytest

from retroinfer.cluster.http.jobs_store import JobsStore, owner_of, pack_ids, unpack_ids


def _row(jid, owner=None, phase="queued", created=None, ids=(1, 2, 3)):
    return {"id": jid, "owner": owner, "phase": phase, "prompt_ids": list(ids), "prompt_tokens": len(ids),
            "request": {"request_id": f"req-{jid}", "params": {"max_tokens": 4}, "kv_bytes": 4096},
            **({"created": created} if created is not None else {})}


def test_round_trip_and_reopen(tmp_path):
    path = tmp_path / "sub" / "jobs.sqlite"          # the parent folder is made
    s = JobsStore(path)
    assert s.journal_mode == "wal"
    ids = [0, 1, 151_935, 2**31 - 1]                 # a real vocabulary's ids fit int32
    s.insert(_row("job-a", owner="k1", ids=ids))
    got = s.get("job-a")
    assert "prompt_ids" not in got                   # status reads leave the prompt out
    assert got["phase"] == "queued" and got["attempts"] == 0 and got["owner"] == "k1"
    assert got["request"] == {"request_id": "req-job-a", "params": {"max_tokens": 4}, "kv_bytes": 4096}
    assert got["created"] == got["updated"] and got["finished_at"] is None
    s.update("job-a", phase="decode", attempts=1, replica="r1", engine_request_id="req-job-a-1",
             tokens_generated=7, prefill_progress=1.0)
    s.close()

    s = JobsStore(path)                              # as a restarted ingress sees it
    (row,) = s.unfinished()
    assert row["prompt_ids"] == ids and row["tokens_generated"] == 7 and row["replica"] == "r1"
    assert row["engine_request_id"] == "req-job-a-1" and row["updated"] >= row["created"]
    s.update("job-a", phase="done", result_text="héllo", finish_reason="length")
    done = s.get("job-a", with_prompt=True)
    assert done["result_text"] == "héllo" and done["finished_at"] is not None and done["prompt_ids"] == ids
    assert s.unfinished() == []
    assert s.get("job-nope") is None
    with pytest.raises(KeyError):
        s.update("job-a", colour="red")


def test_list_by_owner_newest_first(tmp_path):
    s = JobsStore(tmp_path / "jobs.sqlite")
    t = time.time()
    s.insert(_row("job-1", owner=owner_of("key-a"), created=t))
    s.insert(_row("job-2", owner=owner_of("key-b"), created=t + 1))
    s.insert(_row("job-3", owner=owner_of("key-a"), created=t + 2, phase="done"))
    s.insert(_row("job-4", owner=None, created=t + 3))
    assert [r["id"] for r in s.list(owner_of("key-a"))] == ["job-3", "job-1"]
    assert [r["id"] for r in s.list(owner_of("key-a"), phase="queued")] == ["job-1"]
    assert [r["id"] for r in s.list(owner_of("key-a"), limit=1)] == ["job-3"]
    assert [r["id"] for r in s.list(None)] == ["job-4"]          # no key: only the keyless jobs
    assert [r["id"] for r in s.list(owner_of("key-c"))] == []
    assert [r["id"] for r in s.unfinished()] == ["job-1", "job-2", "job-4"]   # oldest first


def test_owner_is_a_hash_not_the_key():
    assert owner_of(None) is None and owner_of("") is None
    h = owner_of("sk-secret")
    assert h == owner_of("sk-secret") != owner_of("sk-other") and "sk-secret" not in h and len(h) == 64


def test_purge_deletes_finished_jobs_only(tmp_path):
    s = JobsStore(tmp_path / "jobs.sqlite")
    for jid in ("job-old", "job-new", "job-running"):
        s.insert(_row(jid))
    s.update("job-old", phase="done", finished_at=time.time() - 100)
    s.update("job-new", phase="failed", error="x")
    assert s.purge(time.time() - 50) == 1
    assert s.get("job-old") is None and s.get("job-new")["error"] == "x" and s.get("job-running")


def test_two_connections_see_each_others_writes(tmp_path):
    """WAL: a reader (another process, e.g. an operator's sqlite3 shell) does not block the writer."""
    path = tmp_path / "jobs.sqlite"
    s = JobsStore(path)
    s.insert(_row("job-a"))
    other = sqlite3.connect(path)
    other.execute("BEGIN")
    assert other.execute("SELECT phase FROM jobs").fetchone() == ("queued",)
    s.update("job-a", phase="prefill")                # not blocked by the open read transaction
    other.rollback()
    assert other.execute("SELECT phase FROM jobs").fetchone() == ("prefill",)
    other.close()


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "jobs.sqlite"
    JobsStore(path).close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(RuntimeError, match="newer"):
        JobsStore(path)


def test_ids_pack_as_little_endian_int32():
    assert pack_ids([1, 256]) == b"\x01\x00\x00\x00\x00\x01\x00\x00"
    assert unpack_ids(pack_ids(list(range(1000)))) == list(range(1000))


def test_default_path_is_the_processs_env_or_the_cache(monkeypatch, tmp_path):
    from retroinfer.cluster.http.jobs_store import default_path
    monkeypatch.setenv("RETROINFER_JOBS_DB", str(tmp_path / "env.sqlite"))
    assert default_path() == tmp_path / "env.sqlite" and JobsStore().path == tmp_path / "env.sqlite"
    monkeypatch.delenv("RETROINFER_JOBS_DB")
    assert str(default_path()).endswith(".cache/retroinfer/jobs.sqlite")
