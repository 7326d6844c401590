"""Scheduling: a long prefill is sliced so that running sequences keep decoding, without changing
anyone's tokens; abort and capacity errors during it."""
from retroinfer.config import EngineConfig
from retroinfer.engine.llm_engine import LLMEngine
from retroinfer.engine.sampling import SamplingParams
from retroinfer.engine.sequence import Phase

GREEDY = dict(temperature=0, ignore_eos=True)


def _engine(**kw):
    return LLMEngine(EngineConfig(model="tiny", device="cpu", kv_budget_bytes=1 << 26, prefill_chunk=128, **kw))


def _alone(prompt, n):
    eng = _engine(prefill_slice_s=None)
    return [t for o in eng.generate(prompt, SamplingParams(max_tokens=n, **GREEDY)) for t in o.token_ids]


def test_decodes_continue_during_a_long_prefill():
    short, long_ = list(range(1, 60)), list(range(1, 250)) * 8          # 1992 tokens: 16 chunks x 4 layers
    eng = _engine(prefill_slice_s=0.0)                                    # yield after every chunk
    eng.add_request("a", short, SamplingParams(max_tokens=40, **GREEDY))
    tokens = {"a": [t for o in eng.step() for t in o.token_ids], "b": []}   # a: prefilled, decoding
    eng.add_request("b", long_, SamplingParams(max_tokens=5, **GREEDY))
    a_during_b_prefill = 0
    while eng.has_work():
        for out in eng.step():
            tokens[out.request_id] += out.token_ids
            if out.request_id == "a" and out.token_ids and eng.scheduler.prefilling:
                a_during_b_prefill += 1
    assert a_during_b_prefill >= 10, "a must keep decoding while b prefills"
    assert tokens["a"] == _alone(short, 40) and tokens["b"] == _alone(long_, 5)


def test_abort_during_sliced_prefill_frees_kv():
    eng = _engine(prefill_slice_s=0.0)
    eng.add_request("a", list(range(1, 60)), SamplingParams(max_tokens=200, **GREEDY))
    eng.step()
    used_a = eng.stats()["used_bytes"]
    eng.add_request("b", list(range(1, 250)) * 8, SamplingParams(max_tokens=5, **GREEDY))
    for _ in range(3):
        eng.step()
    seq_b = eng.scheduler.prefilling[0]
    assert seq_b.phase is Phase.PREFILL and eng.stats()["used_bytes"] > used_a
    eng.abort("b")
    outs = eng.step()
    assert any(o.request_id == "b" and o.finish_reason == "abort" for o in outs)
    assert not eng.scheduler.prefilling and eng.stats()["used_bytes"] == used_a


def test_incremental_detokenizer_matches_full_decode(tmp_path):
    """Streamed deltas concatenate to the full decode, for the byte tokenizer (multi-byte UTF-8
    split over tokens) and a byte-level BPE tokenizer written by transformers."""
    import random

    from retroinfer.engine.tokenizer import ByteTokenizer, HFTokenizer, IncrementalDetokenizer

    from tests.hf_models import make_tokenizer
    make_tokenizer(tmp_path, 384)
    rng = random.Random(0)
    text = "naïve café — 東京 the quick brown fox, hello world! " * 3
    for tok in (ByteTokenizer(), HFTokenizer(tmp_path)):
        ids = tok.encode(text)[1:] if isinstance(tok, ByteTokenizer) else tok.encode(text)
        ids = ids + [rng.randrange(0, 256) for _ in range(40)] if isinstance(tok, ByteTokenizer) else ids
        detok, out = IncrementalDetokenizer(tok), ""
        for n in range(1, len(ids) + 1):
            out += detok.delta(ids[:n])
        full = tok.decode(ids)
        assert out == detok.text
        assert full.startswith(out) and len(full) - len(out) <= 3   # at most an unfinished UTF-8 tail held back
        if not full.endswith("\ufffd"):
            assert out == full


def test_byte_tokenizer_streams_every_large_vocab_token():
    """Random-weight presets sample ids past the bytes: each still yields a text delta (clients
    and benchmarks time tokens by their deltas)."""
    from retroinfer.engine.tokenizer import ByteTokenizer, IncrementalDetokenizer

    detok, ids = IncrementalDetokenizer(ByteTokenizer()), []
    deltas = []
    for t in [104, 300, 127000, 0xC3, 0xA9, 257, 999]:
        ids.append(t)
        deltas.append(detok.delta(ids))
    assert deltas == ["h", "\u2047", "\u2047", "", "\u00e9", "", "\u2047"]


def test_sparse_logits_sample_as_the_whole_logits_do():
    """An executor may hand the sampler every row's argmax and only the sampled rows' logits
    (`SparseLogits`): greedy rows take the argmax, sampled rows draw from their own generator, so
    the tokens are those of the whole [B, V] logits."""
    import torch

    from retroinfer.engine.sampling import Sampler, SparseLogits
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 300, generator=g)
    params = [SamplingParams(temperature=t, top_k=k, seed=s) for t, k, s in
              [(0, 0, None), (0.8, 0, 1), (0, 0, None), (1.2, 40, 2), (0.5, 1, 3)]]   # top_k 1: greedy
    sampler = Sampler(torch.device("cpu"))
    gens = lambda: [sampler.generator(p.seed if p.seed is not None else 0) for p in params]  # noqa: E731
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    assert sampled == [1, 3]
    sparse = SparseLogits(logits.argmax(dim=-1), {i: logits[i].clone() for i in sampled})
    assert sampler(sparse, params, gens()) == sampler(logits, params, gens())
