"""EngineLoop: the engine on its own thread; outputs reach the asyncio side, and its timing log
says where the loop's time goes."""
import asyncio
import logging
import time
from dataclasses import dataclass, field

from retroinfer.cluster.serve.engine_loop import EngineLoop
from retroinfer.cluster.serve.replica import LLMReplica
from retroinfer.engine.protocol import EngineStats
from retroinfer.engine.sampling import SamplingParams


@dataclass
class Out:
    request_id: str
    token_ids: list = field(default_factory=list)
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class FakeEngine:
    """Three steps of 2 ms per request, one token each."""
    on_prefill_progress = None

    def __init__(self):
        self.left, self.rid = 0, None

    def engine_stats(self):
        return EngineStats(capacity_bytes=1 << 20)

    def validate(self, ids, params):
        pass

    def add_request(self, rid, ids, params, wait=None):
        self.rid, self.left = rid, 3

    def has_work(self):
        return self.left > 0

    def step(self):
        time.sleep(0.002)
        self.left -= 1
        return [Out(self.rid, [7], "x", self.left == 0, "length" if self.left == 0 else None, None, 1, 3 - self.left)]

    def abort(self, rid):
        self.left = 0


def listen(caplog, name):
    """Ray may set its loggers not to propagate: hand the records to caplog directly (once)."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.addHandler(caplog.handler)
    logger.propagate, logger.was_propagating = False, logger.propagate
    return logger


def unlisten(caplog, logger):
    logger.removeHandler(caplog.handler)
    logger.propagate = logger.was_propagating


def test_loop_streams_outputs_and_logs_its_timing(caplog):
    logger = listen(caplog, "ray.serve.retroinfer")
    loop = EngineLoop(FakeEngine(), log_interval_s=0.0)
    try:
        async def run():
            q = loop.submit("r1", [1, 2], SamplingParams(max_tokens=3), 100)
            outs = []
            while not outs or not outs[-1]["finished"]:
                outs.append(await asyncio.wait_for(q.get(), 5))
            return outs
        outs = asyncio.run(run())
    finally:
        loop.shutdown()
        unlisten(caplog, logger)
    assert [o["completion_tokens"] for o in outs] == [1, 2, 3] and outs[-1]["finish_reason"] == "length"
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("engine loop:")]
    assert lines, "no timing line"
    steps = sum(int(line.split()[2]) for line in lines)
    assert steps == 3
    ms = float(lines[0].split(", ")[1].split()[0])
    assert ms >= 2.0                                 # the 2 ms sleeps of step() are counted in it


def test_replica_warm_up_leaves_the_engine_empty(caplog):
    """The replica's warm-up requests (before it takes traffic; on a GPU max_batch of each length,
    decoding at every batch size; on a CPU one) end and free their KV; one the replica cannot hold
    fails with a warning, not a failed start."""
    from retroinfer.cluster.serve.replica import LLMReplica, ReplicaOptions
    from retroinfer.config import EngineConfig
    logger = listen(caplog, "ray.serve")
    cfg = EngineConfig(model="tiny", device="cpu", kv_budget_bytes=1 << 22, prefill_chunk=128)
    # the class under the deployment; 3000 tokens need more KV than 4 MiB
    rep = LLMReplica.func_or_class(cfg, ReplicaOptions(warmup_tokens=(300, 3000, 100)))
    try:
        stats = rep.engine.stats()
        assert not rep.engine.has_work() and stats["used_bytes"] == 0 and stats["running"] == 0
        said = [r.getMessage() for r in caplog.records]
        assert any("warm-up of 300 tokens: 1 request(s), decode batches 1..1" in m for m in said)
        assert not any("covered" in m for m in said)     # one request is all a CPU replica warms up
        assert any("warm-up of 3000 tokens failed" in m for m in said)
        assert not any("warm-up of 3000 tokens:" in m for m in said)
        assert any("warm-up of 100 tokens: " in m for m in said)
    finally:
        rep.loop.shutdown()
        unlisten(caplog, logger)


class StuckEngine(FakeEngine):
    """Its first step never returns until released (a hung kernel or stage)."""

    def __init__(self):
        super().__init__()
        import threading
        self.release, self.aborted = threading.Event(), []

    def step(self):
        self.release.wait(10)
        return super().step()

    def abort(self, rid):
        self.aborted.append(rid)
        super().abort(rid)


def test_a_stalled_step_fails_the_requests_and_the_health():
    from retroinfer.cluster.serve.engine_loop import Rejected

    async def go():
        eng = StuckEngine()
        loop = EngineLoop(eng, step_timeout_s=0.3)
        try:
            assert loop.healthy
            q = loop.submit("a", [1, 2], SamplingParams(max_tokens=3), 0)
            await asyncio.sleep(0.1)
            assert loop.healthy and loop.failure is None        # a step in flight, not yet a stall
            await asyncio.sleep(0.4)
            assert not loop.healthy and "has not returned" in loop.failure
            replica = LLMReplica.func_or_class.__new__(LLMReplica.func_or_class)
            replica.loop, replica.monitor, replica.replica_id = loop, loop.observer, "r"
            assert replica.record_routing_stats()["healthy"] is False     # what Serve's router polls
            msg = await asyncio.wait_for(q.get(), 2)
            assert msg["finished"] and msg["finish_reason"] == "error" and "step_timeout_s" in msg["error"]
            assert eng.aborted == ["a"]
            try:
                loop.submit("b", [1], SamplingParams(max_tokens=1), 0)
                raise AssertionError("an unhealthy loop must refuse")
            except Rejected as e:
                assert e.status == 429 and e.code == "replica_unhealthy"
            eng.release.set()               # the step returns late: its output is not delivered
            await asyncio.sleep(0.1)
            assert q.empty() and not loop.healthy
        finally:
            eng.release.set()
            loop.shutdown()

    asyncio.run(go())


def test_no_timeout_means_no_stall_check():
    eng = StuckEngine()
    loop = EngineLoop(eng, step_timeout_s=None)
    try:
        eng.add_request("a", [1], None)
        loop._wake.set()
        time.sleep(0.2)
        assert loop.healthy
    finally:
        eng.release.set()
        loop.shutdown()
