"""The scheduler through the engine on a FakeExecutor (no model): admission and its typed
reasons, the prefill budget of a step, decode in every step, abort in every phase, and the policy
between long and short prompts. Then the real tiny model: an abort lands within one chunk."""
import pytest

from retroinfer.config import EngineConfig
from retroinfer.engine.fake_executor import FakeExecutor
from retroinfer.engine.llm_engine import LLMEngine
from retroinfer.engine.protocol import Admission, AdmissionError, ErrorCode, FinishReason
from retroinfer.engine.sampling import SamplingParams
from retroinfer.models.presets import preset_config

L, CHUNK = 4, 64                    # tiny has 4 layers


def _engine(capacity=1 << 16, **kw):
    cfg = EngineConfig(model="tiny", device="cpu", prefill_chunk=CHUNK, **kw)
    return LLMEngine(cfg, executor=FakeExecutor(preset_config("tiny"), CHUNK, capacity))


def _p(n, max_tokens=8):
    return [1 + i % 250 for i in range(n)], SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


def _step(eng):
    """One step -> (its outputs by request, its executor events)."""
    ev = eng.executor.events
    n = len(ev)
    outs = {}
    for o in eng.step():
        outs.setdefault(o.request_id, []).append(o)
    return outs, ev[n:]


def _prefill_cost(events, lengths):
    """Token-layers of the prefill units among events (a unit: one chunk through one layer)."""
    return sum(min(CHUNK, lengths[e[1]] - e[3]) for e in events if e[0] == "prefill")


def _run(eng, limit=10_000):
    steps = []
    while eng.has_work() and len(steps) < limit:
        steps.append(_step(eng))
    return steps


def _add(eng, rid, n, max_tokens=8):
    ids, sp = _p(n, max_tokens)
    eng.add_request(rid, ids, sp)
    return len(ids)


def _units(events, rid):
    return [e for e in events if e[0] == "prefill" and e[1] == rid]


# -- admission ------------------------------------------------------------------------------
def test_admission_reasons_and_the_ledger():
    eng = _engine(capacity=1000)
    with pytest.raises(AdmissionError) as e:
        _add(eng, "huge", 995, max_tokens=10)                 # 1005 > 1000: never
    assert e.value.admission is Admission.NEVER_FITS and (e.value.admission.status, e.value.admission.code) == \
        (400, "kv_capacity_exceeded")
    eng.reject_when_full = True                               # as the serving layer runs it
    _add(eng, "a", 600, max_tokens=8)
    with pytest.raises(AdmissionError) as e:
        _add(eng, "b", 500, max_tokens=8)                     # 608 + 508 > 1000: not now
    assert e.value.admission is Admission.NO_ROOM_NOW and e.value.admission.status == 429
    assert "b" not in eng.seqs and eng.stats()["outstanding_bytes"] == 608 * eng.bytes_per_token
    with pytest.raises(ValueError, match="already in use"):
        _add(eng, "a", 10)
    _run(eng)
    assert eng.stats()["outstanding_bytes"] == 0 and eng.stats()["used_bytes"] == 0
    _add(eng, "b", 500)                                       # room again
    eng.reject_when_full = False                              # in process: no room now means wait
    _add(eng, "c", 500)
    steps = _run(eng)
    first = {rid: next(i for i, (o, _) in enumerate(steps) if rid in o and o[rid][0].token_ids) for rid in "bc"}
    assert first["c"] > first["b"] + 7                        # c started once b had finished (8 tokens)
    assert not eng.executor.held and eng.stats()["outstanding_bytes"] == 0


def test_a_request_asked_to_wait_queues_for_room_up_to_max_waiting():
    """The serving layer refuses no-room requests (429) unless the ingress asks them to wait:
    then they queue FCFS for KV, at most `max_waiting` of them, and start as room frees."""
    eng = _engine(capacity=1000)
    eng.reject_when_full = True
    eng.scheduler.max_waiting = 1
    _add(eng, "a", 600, max_tokens=8)
    ids, sp = _p(500)
    eng.add_request("b", ids, sp, wait=True)                  # no room now: waits (ledger over capacity)
    with pytest.raises(AdmissionError) as e:
        eng.add_request("c", ids, sp, wait=True)              # one waits already: the queue is full
    assert e.value.admission is Admission.NO_ROOM_NOW and "already wait" in str(e.value)
    with pytest.raises(AdmissionError):
        eng.add_request("d", *_p(10))                         # not asked to wait: refused at once
    assert eng.stats()["outstanding_bytes"] == (608 + 508) * eng.bytes_per_token
    steps = _run(eng)
    first = {rid: next(i for i, (o, _) in enumerate(steps) if rid in o and o[rid][0].token_ids) for rid in "ab"}
    assert first["b"] > first["a"] + 7                        # b started once a had finished
    assert steps[-1][0]["b"][-1].finish_reason is FinishReason.LENGTH
    assert not eng.executor.held and eng.stats()["outstanding_bytes"] == 0
    eng.scheduler.max_waiting = 0                             # 0: nothing waits
    _add(eng, "e", 600)
    with pytest.raises(AdmissionError):
        eng.add_request("f", ids, sp, wait=True)
    eng.abort("e")
    _run(eng)
    assert eng.stats()["outstanding_bytes"] == 0


def test_a_waiting_request_aborted_before_it_starts_leaves_the_ledger():
    eng = _engine(capacity=1000)
    eng.reject_when_full = True
    _add(eng, "a", 600, max_tokens=8)
    eng.add_request("b", *_p(500), wait=True)
    _step(eng)
    assert [s.request_id for s in eng.scheduler.waiting] == ["b"]
    eng.abort("b")
    outs, _ = _step(eng)
    assert outs["b"][-1].finish_reason is FinishReason.ABORT and not outs["b"][-1].token_ids
    assert eng.stats()["outstanding_bytes"] == 608 * eng.bytes_per_token
    _run(eng)
    assert eng.stats()["outstanding_bytes"] == 0 and not eng.executor.held


def test_kv_the_backend_refuses_is_a_typed_error():
    """The ledger admits by its sums; the executor's reserve has the last word (here it holds
    less than it reports): with nothing else holding KV, the request ends with the typed code."""
    eng = _engine(capacity=1000)
    eng.executor.capacity = 100
    _add(eng, "a", 200)
    (outs, _), = _run(eng)
    last = outs["a"][-1]
    assert last.finished and last.finish_reason is FinishReason.ERROR
    assert last.error_code is ErrorCode.KV_CAPACITY_EXCEEDED and "KV cache cannot hold" in last.error
    assert eng.stats()["outstanding_bytes"] == 0 and not eng.seqs


# -- the budget, and decode in every step ------------------------------------------------------------
def test_every_step_decodes_and_prefill_stays_within_the_budget():
    eng = _engine(prefill_budget_tokens=100)                  # 400 token-layers: six 64-token units
    _add(eng, "a", 50, max_tokens=200)
    _step(eng)                                                 # a prefilled (1 x 4 units <= budget)
    _add(eng, "b", 1000, max_tokens=4)                         # 16 chunks x 4 layers = 64 units
    b_steps, tokens_a = 0, 0
    for outs, events in _run(eng):
        if _units(events, "b"):
            b_steps += 1
            assert _prefill_cost(events, {"a": 50, "b": 1000}) <= 100 * L
            assert any(e[0] == "decode" and "a" in e[1] for e in events), "a decodes in every step"
            assert [e[0] for e in events][-1] == "decode"     # prefill work first, then the decode step
            assert "a" in outs and outs["a"][0].token_ids
            tokens_a += 1
    assert b_steps == -(-64 // 6)                              # 6 units a step: 11 steps
    assert tokens_a == b_steps


def test_several_short_prompts_prefill_in_one_step():
    eng = _engine(prefill_budget_tokens=200)
    for rid in "abc":
        _add(eng, rid, 60)                                     # 4 units x 60 tokens each: 720 <= 800
    outs, events = _step(eng)
    assert {r for r in "abc" if outs.get(r) and outs[r][0].token_ids} == set("abc")
    assert [e[0] for e in events].count("prefill") == 12


def test_a_time_slice_of_zero_runs_one_unit_a_step():
    eng = _engine(prefill_slice_s=0.0)
    _add(eng, "a", 200)                                        # 4 chunks x 4 layers
    steps = _run(eng)
    assert [len(_units(ev, "a")) for _, ev in steps[:16]] == [1] * 16


def test_no_budget_finishes_every_prefill_in_its_first_step():
    eng = _engine(prefill_budget_tokens=None)
    _add(eng, "a", 1000)
    _add(eng, "b", 300)
    outs, events = _step(eng)
    assert outs["a"][0].token_ids and outs["b"][0].token_ids and len(_units(events, "a")) == 64


# -- abort ------------------------------------------------------------------------------------------
def test_abort_in_every_phase_frees_the_kv():
    eng = _engine(capacity=4000, prefill_budget_tokens=64, max_batch=2)
    _add(eng, "run", 30, max_tokens=500)
    _step(eng)
    _add(eng, "pre", 2000, max_tokens=4)                       # prefills over many steps
    _add(eng, "wait", 30, max_tokens=4)                        # no batch slot: waits
    for _ in range(3):
        _step(eng)
    sch = eng.scheduler
    assert [s.request_id for s in sch.running] == ["run"] and [s.request_id for s in sch.prefilling] == ["pre"]
    assert [s.request_id for s in sch.waiting] == ["wait"] and set(eng.executor.held) == {"run", "pre"}
    for rid in ("wait", "pre", "run"):
        eng.abort(rid)
        outs, events = _step(eng)
        assert outs[rid][-1].finished and outs[rid][-1].finish_reason is FinishReason.ABORT
        assert rid not in eng.executor.held and rid not in eng.seqs
        assert not _units(events, rid)                          # nothing of it ran after the abort
    assert not eng.has_work() and eng.stats()["outstanding_bytes"] == 0 and not eng.executor.held


def test_abort_during_a_prefill_lands_within_one_unit():
    """Aborted while its prefill runs (here from the progress callback, as another thread would):
    no further unit of it runs, also when the step had budget for the whole prompt."""
    eng = _engine(prefill_budget_tokens=None)
    eng.on_prefill_progress = lambda rid, done, n: eng.abort(rid) if done == 1 else None
    _add(eng, "a", 1000)
    outs, events = _step(eng)
    assert outs["a"][-1].finish_reason is FinishReason.ABORT and not eng.executor.held
    assert len(_units(events, "a")) == 16 + 1                   # layer 0, then the unit that finished it


# -- long and short prompts ------------------------------------------------------------------------------
def test_a_chat_is_not_stuck_behind_a_long_prefill_and_the_long_one_still_advances():
    eng = _engine(prefill_budget_tokens=100)
    _add(eng, "long", 8000, max_tokens=2)                      # 125 chunks x 4 layers: ~90 steps
    _step(eng)
    added, first = {}, {}
    for step in range(40):
        if step % 4 == 0:                                      # a chat arrives every 4th step
            rid = f"chat{step}"
            _add(eng, rid, 40 + step, max_tokens=3)
            added[rid] = step
        outs, events = _step(eng)
        assert _units(events, "long"), "the oldest prefill advances in every step"
        for rid, o in outs.items():
            if rid.startswith("chat") and o[0].token_ids:
                first.setdefault(rid, step)
    assert set(first) == set(added)
    assert all(first[r] - added[r] <= 1 for r in added), (added, first)   # its first token within 2 steps
    assert [s.request_id for s in eng.scheduler.prefilling] == ["long"]  # still prefilling
    _run(eng)
    assert not eng.executor.held


def test_a_chat_takes_the_budget_first_within_two_steps():
    eng = _engine(prefill_budget_tokens=100)
    _add(eng, "long", 8000, max_tokens=2)
    _step(eng)
    _add(eng, "chat", 80)                                      # 2 chunks x 4 layers = 320 token-layers
    outs, events = _step(eng)
    units = [e[1] for e in events if e[0] == "prefill"]
    assert units == ["chat"] * 8 + ["long"]                    # shortest first; the long one the rest (80)
    assert outs["chat"][0].token_ids                           # its first token in the step it arrived


def test_admission_is_first_come_first_served_for_kv():
    """A request that waits for KV holds up those behind it (no starvation of a big one)."""
    eng = _engine(capacity=3000, prefill_budget_tokens=100)
    _add(eng, "a", 1500, max_tokens=100)
    _step(eng)
    _add(eng, "big", 2000, max_tokens=100)                     # waits for a's KV
    _add(eng, "small", 50, max_tokens=4)                       # would fit now, but comes after big
    order = []
    for outs, events in _run(eng):
        order += [e[1] for e in events if e[0] == "reserve"]
    assert order == ["big", "small"]


def test_a_long_prompt_waiting_for_activation_room_lets_short_ones_pass():
    eng = _engine(prefill_budget_tokens=100, max_model_len=4000)
    _add(eng, "long1", 3000, max_tokens=2)
    _add(eng, "long2", 3000, max_tokens=2)                     # 6000 > 4000 in flight: waits
    _add(eng, "chat", 60, max_tokens=2)
    outs, events = _step(eng)
    sch = eng.scheduler
    assert [e[1] for e in events if e[0] == "reserve"] == ["long1", "chat"]
    assert outs["chat"][0].token_ids and [s.request_id for s in sch.waiting] == ["long2"]
    assert [s.request_id for s in sch.prefilling] == ["long1"]
    _run(eng)
    assert not eng.executor.held


# -- the real model ------------------------------------------------------------------------------------
def test_abort_during_a_real_long_prefill_frees_the_kv_within_one_chunk():
    """Issue 17, item 6: the tiny model, a 2048-token prompt in 128-token chunks, nothing else
    running and no step budget: an abort after the 3rd unit stops it at once (not at the end of
    the layer, let alone the prompt) and frees its KV."""
    cfg = EngineConfig(model="tiny", device="cpu", kv_budget_bytes=1 << 24, prefill_chunk=128,
                       prefill_budget_tokens=None)
    eng = LLMEngine(cfg)
    real, ran = eng.executor.prefill_steps, []

    def counting(seq_id, ids, progress=None):
        gen = real(seq_id, ids, progress)
        try:
            while True:
                next(gen)
                ran.append(seq_id)
                if len(ran) == 3:
                    eng.abort(seq_id)
                yield
        except StopIteration as done:
            return done.value
    eng.executor.prefill_steps = counting
    ids, sp = _p(2048)
    eng.add_request("a", ids, sp)
    outs = eng.step()
    assert outs[-1].finish_reason is FinishReason.ABORT and len(ran) == 3
    assert eng.stats()["used_bytes"] == 0 and not eng.has_work()


def test_engine_stats_merge_stages_once():
    from retroinfer.engine.protocol import EngineStats
    a = {"capacity_bytes": 100, "used_bytes": 10, "sequences": 2, "retrieved_clusters": 8, "cache_hits": 6,
         "kv_footprint_bytes": {"s": 10}}
    b = {"capacity_bytes": 50, "used_bytes": 5, "sequences": 3, "retrieved_clusters": 2, "cache_hits": 0}
    d = EngineStats.from_stages([a, b]).as_dict()
    assert (d["capacity_bytes"], d["used_bytes"], d["sequences"]) == (150, 15, 2)   # summed; first stage's
    assert d["cache_hit_ratio"] == 0.6 and d["stages"] == [a, b] and "kv_footprint_bytes" not in d
    assert "pcie_rows" not in d and "cache_row_hit_ratio" not in d                  # not reported: absent
    plain = EngineStats.from_stages([{"capacity_bytes": 1, "used_bytes": 0}]).as_dict()
    assert {"waiting", "running", "prefilling", "outstanding_bytes", "decode_s", "prefill_s"} <= set(plain)
