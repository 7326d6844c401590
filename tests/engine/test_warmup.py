"""The warm-up before serving (retroinfer/engine/warmup.py): every decode batch size 1..max_batch,
the mixed step, an idle engine afterwards; the replica and the in-process bench run the same one."""
import sys
from pathlib import Path

import pytest

from retroinfer.config import EngineConfig
from retroinfer.engine.llm_engine import LLMEngine
from retroinfer.engine.warmup import warm_up

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))


def _engine(**kw):
    base = dict(model="tiny", device="cpu", kv_budget_bytes=1 << 24, prefill_chunk=128, max_batch=5,
                prefill_budget_tokens=128)
    return LLMEngine(EngineConfig(**{**base, **kw}))


@pytest.mark.parametrize("attention", ["full", "wave"])
def test_warm_up_decodes_every_batch_bucket_and_the_mixed_step(attention):
    from retroinfer.config import WaveConfig
    from tests.wave.test_wave import SMALL_WAVE
    kw = dict(offload=True, host_kv_budget_bytes=1 << 24, kv_budget_bytes=1 << 26,
              wave=WaveConfig(**SMALL_WAVE)) if attention == "wave" else {}
    eng = _engine(attention=attention, **kw)
    reps = warm_up(eng, [300, 40], batch=eng.cfg.max_batch)
    for rep in reps:
        assert rep.error is None and rep.requests == 5
        assert rep.batch_sizes == [1, 2, 3, 4, 5]          # up, one join at a time, and down again
        assert rep.buckets == [1, 2, 4, 8]                 # the graph buckets of batches 1..max_batch
        assert rep.mixed_steps >= 4                        # each join prefilled beside a decode batch
    assert rep.batches.index(5) < len(rep.batches) - 1 and rep.batches[-1] < 5   # then down
    stats = eng.stats()
    assert not eng.has_work() and stats["used_bytes"] == 0 and stats["running"] == 0 and not eng.seqs


def test_warm_up_covers_what_the_kv_holds_and_reports_what_never_fits():
    import torch

    from retroinfer.engine.llm_engine import load_model_config
    per_token = load_model_config("tiny").kv_bytes_per_token(torch.float32)
    eng = _engine(kv_budget_bytes=per_token * 900)         # two 300-token requests and their decode
    big, part = warm_up(eng, [5000, 300], batch=eng.cfg.max_batch)
    assert big.requests == 0 and big.error and not big.batches
    assert part.requests == 2 and part.batch_sizes == [1, 2] and part.error is None
    assert not eng.has_work() and eng.stats()["used_bytes"] == 0


def test_the_bench_runs_the_replicas_warm_up(monkeypatch):
    import serve_trace as st

    import retroinfer.engine.warmup as wu
    seen = []
    monkeypatch.setattr(wu, "warm_up", lambda engine, lengths, **kw: seen.append(list(lengths)) or [])
    st.warm_up(object(), [16, 32])
    assert seen == [[16, 32]]
