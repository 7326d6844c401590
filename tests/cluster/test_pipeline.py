"""The Ray pipeline executor (stage actors) against the in-process executor, on CPU."""
import pytest
import torch

ray = pytest.importorskip("ray")

from retroinfer.attention import KVCapacityError  # noqa: E402
from retroinfer.config import EngineConfig  # noqa: E402
from retroinfer.engine.llm_engine import LLMEngine, load_model_config  # noqa: E402
from retroinfer.engine.sampling import SamplingParams  # noqa: E402

CFG = EngineConfig(model="tiny", device="cpu", kv_budget_bytes=1 << 20, max_batch=8)


@pytest.fixture(scope="module")
def ray_local():
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="error", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def pipeline(ray_local):
    from retroinfer.cluster.serve.pipeline import RayPipelineExecutor
    ex = RayPipelineExecutor(CFG, load_model_config("tiny"), 2, num_cpus=1, num_gpus=0, placement_group=None)
    yield ex
    ex.shutdown()


def _run(engine, prompts, max_tokens=12):
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    toks = {str(i): [] for i in range(len(prompts))}
    while engine.has_work():
        for out in engine.step():
            toks[out.request_id] += out.token_ids
    return [toks[str(i)] for i in range(len(prompts))]


def test_two_cpu_stages_match_local_executor(pipeline):
    prompts = [list(range(1, 40)), list(range(50, 61)), [7] * 100]   # 3 sequences: 2 micro-batches
    want = _run(LLMEngine(CFG), prompts)
    progress = []
    eng = LLMEngine(CFG, executor=pipeline, on_prefill_progress=lambda rid, d, n: progress.append((rid, d, n)))
    got = _run(eng, prompts)
    assert got == want
    assert [d for rid, d, n in progress if rid == "0"] == [0, 1, 2, 3, 4]  # start, then one per layer
    assert [s["layers"] for s in pipeline.stage_info] == [[0, 2], [2, 4]]
    assert pipeline.stats().used_bytes == 0                            # everything freed


def test_capacity_error_crosses_actors(pipeline):
    with pytest.raises(KVCapacityError) as e:
        pipeline.reserve("big", 10**6)
    assert e.value.ever is False
    assert pipeline.stats().used_bytes == 0


def test_abort_during_prefill_frees_kv(pipeline):
    eng = LLMEngine(CFG, executor=pipeline)
    eng.on_prefill_progress = lambda rid, done, n: eng.abort(rid) if done == 1 else None
    eng.add_request("a", list(range(1, 200)), SamplingParams(max_tokens=8, temperature=0))
    outs = []
    while eng.has_work():
        outs += eng.step()
    assert outs[-1].finished and outs[-1].finish_reason == "abort" and not outs[-1].token_ids
    assert pipeline.stats().used_bytes == 0


def test_a_dead_stage_fails_the_step_at_once(ray_local):
    """Decode runs through a compiled graph: a stage that dies closes its channels, so the next
    step raises (the engine loop then fails the replica's requests) instead of waiting on it."""
    import time

    from retroinfer.cluster.serve.pipeline import RayPipelineExecutor
    ex = RayPipelineExecutor(CFG, load_model_config("tiny"), 2, num_cpus=1, num_gpus=0, placement_group=None)
    try:
        eng = LLMEngine(CFG, executor=ex)
        eng.add_request("a", list(range(1, 20)), SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
        while not eng.running:
            eng.step()
        eng.step()                                     # one decode step through the graph
        ray.kill(ex.stages[1])
        time.sleep(0.5)
        t0 = time.perf_counter()
        with pytest.raises(Exception) as e:
            for _ in range(3):
                eng.step()
        assert time.perf_counter() - t0 < 10 and "Channel" in type(e.value).__name__ + str(e.value)
    finally:
        ex.shutdown()


def test_sampled_requests_match_the_local_executor(pipeline):
    """Greedy rows come back as token ids only, sampled rows with their logits: seeded sampling
    beside greedy rows in one batch gives the local executor's tokens."""
    prompts = [list(range(1, 30)), list(range(40, 52)), [9] * 70, list(range(100, 120))]

    def run(engine):
        for i, p in enumerate(prompts):
            sp = SamplingParams(max_tokens=10, ignore_eos=True, **(
                {"temperature": 0} if i % 2 else {"temperature": 0.9, "top_p": 0.95, "seed": 100 + i}))
            engine.add_request(str(i), p, sp)
        toks = {str(i): [] for i in range(len(prompts))}
        while engine.has_work():
            for out in engine.step():
                toks[out.request_id] += out.token_ids
        return [toks[str(i)] for i in range(len(prompts))]
    want = run(LLMEngine(CFG))
    got = run(LLMEngine(CFG, executor=pipeline))
    assert got == want
    assert len({tuple(t) for t in want}) == len(want)      # the rows differ: a mix-up would show


def test_a_stage_lost_during_prefill_is_the_engines_failure(ray_local):
    """A stage that dies while a prompt prefills fails the engine step (StageLost, an
    ExecutorFailure), not just that request: otherwise the replica would stay healthy and fail every
    request sent to it. The stage info carries each stage's process id."""
    import dataclasses
    import os
    import signal
    import time

    from retroinfer.cluster.serve.pipeline import RayPipelineExecutor, StageLost
    ex = RayPipelineExecutor(CFG, load_model_config("tiny"), 2, num_cpus=1, num_gpus=0, placement_group=None)
    try:
        assert all(isinstance(s["pid"], int) for s in ex.stage_info)
        eng = LLMEngine(dataclasses.replace(CFG, prefill_budget_tokens=64, prefill_chunk=64), executor=ex)
        eng.add_request("a", list(range(1, 250)), SamplingParams(max_tokens=4, temperature=0))
        eng.step()                                        # the prefill has begun
        os.kill(ex.stage_info[0]["pid"], signal.SIGKILL)
        time.sleep(1.0)
        with pytest.raises(StageLost, match="pipeline stage of this replica is gone"):
            for _ in range(50):
                eng.step()
    finally:
        ex.shutdown()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.int64])
def test_wire_format_round_trip(dtype):
    from retroinfer.cluster.serve.pipeline import from_wire, to_wire
    t = (torch.randn(3, 5) * 100).to(dtype)
    a = to_wire(t)
    a.setflags(write=False)                 # as a channel's view of its buffer may be
    back = from_wire(a)
    assert back.dtype == dtype and torch.equal(back, t)
    back.add_(1)                            # a copy: the channel's buffer is untouched
    assert torch.equal(from_wire(a), t)
