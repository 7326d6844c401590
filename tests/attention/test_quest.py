"""Quest page top-k (attention/quest.py) on CPU: decode attention against a plain dense
implementation of the same page choice, on fresh random data and awkward shapes (GQA, partial
last pages, sequences of different lengths, chunked prefill, pages reused after a free); its
Triton path under the interpreter; equal to full attention at a budget of the whole context;
the default budget equal to wave's exactly attended tokens; the engine, CLI and deployment."""
import math
import random

import pytest
import torch

from retroinfer.attention import make_backend
from retroinfer.config import ConfigError, EngineConfig, ModelConfig, QuestConfig, WaveConfig, wave_exact_tokens
from retroinfer.engine.llm_engine import LLMEngine
from retroinfer.engine.sampling import SamplingParams


def _cfg(hq, hkv, d):
    return ModelConfig(arch="llama", vocab_size=1, hidden_size=hq * d, intermediate_size=1, num_layers=1,
                       num_heads=hq, num_kv_heads=hkv, head_dim=d)


def quest_reference(q, keys, values, keep, page, sink_page, scale):
    """Dense: q [Hq, D] over keys, values [n, Hkv, D] (fp32). Per query head the page bounds from
    the raw keys, the last page (and the first) forced, then the best ones up to `keep` pages;
    softmax over the chosen pages' tokens only."""
    n, Hkv, D = keys.shape
    Hq = q.shape[0]
    G, P = Hq // Hkv, math.ceil(n / page)
    out = torch.empty(Hq, D, dtype=torch.float64)
    for h in range(Hq):
        k, v, qh = keys[:, h // G].double(), values[:, h // G].double(), q[h].double()
        bounds = []
        for p in range(P):
            kp = k[p * page:(p + 1) * page]
            bounds.append(torch.maximum(qh * kp.min(0).values, qh * kp.max(0).values).sum().item())
        forced = [P - 1] + ([0] if sink_page and P > 1 else [])
        rest = sorted((p for p in range(P) if p not in forced), key=lambda p: -bounds[p])
        chosen = (forced + rest)[:keep]
        mask = torch.zeros(n, dtype=torch.bool)
        for p in chosen:
            mask[p * page:(p + 1) * page] = True
        s = (k @ qh) * scale
        w = torch.softmax(s.masked_fill(~mask, float("-inf")), 0)
        out[h] = w @ v
    return out


def _keep(quest, wave, prompt, n):
    pages = math.ceil(n / quest.page_size)
    want = math.ceil(quest.budget_tokens(wave, prompt, n) / quest.page_size)
    return min(pages, max(want, 1 + (quest.sink_page and pages > 1)))


def _run(backend, lens, steps, hq, hkv, d, seed, dtype=torch.float32, chunk=None, check=None):
    """Prefill sequences of `lens` tokens (in chunks of `chunk` tokens if given), then `steps`
    decode steps of the whole batch; `check(step, outputs, keys, values, q)` after each."""
    g = torch.Generator().manual_seed(seed)
    keys = [torch.randn(n + steps, hkv, d, generator=g).to(dtype) for n in lens]
    values = [torch.randn(n + steps, hkv, d, generator=g).to(dtype) for n in lens]
    for i, n in enumerate(lens):
        backend.reserve(i, n + steps)
        c = chunk or n
        for s in range(0, n, c):
            e = min(n, s + c)
            backend.write_prefill(0, i, keys[i][:e][s:], values[i][:e][s:], s)
    outs = []
    for t in range(steps):
        q = torch.randn(len(lens), hq, d, generator=g).to(dtype)
        k = torch.stack([keys[i][n + t] for i, n in enumerate(lens)])
        v = torch.stack([values[i][n + t] for i, n in enumerate(lens)])
        out = backend.decode(0, backend.plan_decode(list(range(len(lens)))), q, k, v)
        if check is not None:
            check(t, out, keys, values, q)
        outs.append(out)
    return outs


CASES = [   # (Hq, Hkv, D, page, lengths, steps, budget, sink_page, prefill chunk)
    (4, 2, 64, 16, [300, 17, 1, 16, 15, 129], 20, 0.25, True, None),
    (6, 2, 40, 16, [500, 33, 250], 18, 96, True, 100),
    (3, 3, 16, 32, [700, 64, 65, 31], 40, 0.1, False, None),
    (8, 1, 24, 16, [1000, 200], 35, 200, True, 333),
    (4, 4, 32, 64, [1024, 130], 10, 0.5, False, None),
    (6, 3, 16, 16, [400, 90, 48, 2], 24, None, True, None),      # wave's budget (dense this short)
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_decode_equals_the_dense_reference(case):
    hq, hkv, d, page, lens, steps, budget, sink, chunk = CASES[case]
    quest = QuestConfig(budget=budget, page_size=page, sink_page=sink)
    wave = WaveConfig()
    qb = make_backend("quest", _cfg(hq, hkv, d), range(1), "cpu", torch.float32, 1 << 24, quest=quest)

    def check(t, out, keys, values, q):
        for i, n in enumerate(lens):
            m = n + t + 1
            keep = _keep(quest, wave, n, m)
            ref = quest_reference(q[i], keys[i][:m], values[i][:m], keep, page, sink, d ** -0.5)
            assert torch.allclose(out[i].double(), ref, atol=2e-5, rtol=1e-4), (case, t, i, (out[i] - ref).abs().max())

    _run(qb, lens, steps, hq, hkv, d, seed=case, chunk=chunk, check=check)


def test_reused_pages_start_fresh_bounds():
    """Pages freed by one sequence and handed to the next: the page bounds are rebuilt (at prefill
    and at a page's first decoded row), never merged with the stale ones."""
    hq, hkv, d, page = 4, 2, 32, 16
    quest = QuestConfig(budget=48, page_size=page)
    qb = make_backend("quest", _cfg(hq, hkv, d), range(1), "cpu", torch.float32, 1 << 20, quest=quest)
    big = 100 * torch.randn(240, hkv, d).sign()      # huge keys of both signs: stale bounds would dominate
    qb.reserve("old", 400)
    qb.write_prefill(0, "old", big[:200], big[:200], 0)
    for t in range(40):                              # decoded rows too (pages filled from their first row)
        qb.decode(0, qb.plan_decode(["old"]), torch.randn(1, hq, d), big[200 + t:201 + t], big[:1])
    old_pages = set(qb.tables["old"].tolist())
    qb.free("old")

    def check(t, out, keys, values, q):
        n = 37 + t + 1
        ref = quest_reference(q[0], keys[0][:n], values[0][:n], _keep(quest, WaveConfig(), 37, n), page, True,
                              d ** -0.5)
        assert torch.allclose(out[0].double(), ref, atol=2e-5, rtol=1e-4), (t, (out[0] - ref).abs().max())

    _run(qb, [37], 40, hq, hkv, d, seed=7, check=check)
    assert set(qb.tables[0][:5].tolist()) <= old_pages        # the new sequence did get the old pages


def test_triton_path_under_the_interpreter(monkeypatch):
    """The CUDA path (the paged decode kernel, one launch per KV head) run by Triton's CPU
    interpreter equals the torch path."""
    pytest.importorskip("triton")
    hq, hkv, d, lens, steps = 6, 2, 32, [150, 20, 1], 3
    quest = QuestConfig(budget=0.3)
    outs = {}
    for interp in ("0", "1"):
        monkeypatch.setenv("RETROINFER_TRITON_INTERPRET", interp)
        qb = make_backend("quest", _cfg(hq, hkv, d), range(1), "cpu", torch.float32, 1 << 22, quest=quest)
        outs[interp] = torch.stack(_run(qb, lens, steps, hq, hkv, d, seed=11))
    assert (outs["0"] - outs["1"]).abs().max() < 1e-5


@pytest.mark.parametrize("budget", [1.0, 10 ** 6])
def test_whole_context_budget_equals_full_attention(budget):
    hq, hkv, d, lens, steps = 6, 2, 32, [333, 16, 1, 70], 30
    cfg = _cfg(hq, hkv, d)
    qb = make_backend("quest", cfg, range(1), "cpu", torch.float32, 1 << 24, quest=QuestConfig(budget=budget))
    fb = make_backend("full", cfg, range(1), "cpu", torch.float32, 1 << 24)
    got = torch.stack(_run(qb, lens, steps, hq, hkv, d, seed=5, chunk=100))
    ref = torch.stack(_run(fb, lens, steps, hq, hkv, d, seed=5, chunk=100))
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5), (got - ref).abs().max()


SMALL_WAVE = dict(sink=4, window=16, segment_size=256, tokens_per_cluster=8, kmeans_iters=2,
                  update_every=64, update_clusters=8)


@pytest.mark.parametrize("prompt", [50, 84, 85, 900])   # dense, dense to the update, indexed at prefill
def test_default_budget_is_wave_exact_share(prompt):
    """wave_exact_tokens replays wave's zones: its steady part equals the wave backend's steady
    length at every step (across updates), its retrieval part ceil(frac * C) clusters of the
    nominal size, within one cluster of what wave retrieves at its mean cluster size."""
    cfg = _cfg(4, 2, 16)
    w = WaveConfig(**SMALL_WAVE, retrieval_frac=0.1)
    wb = make_backend("wave", cfg, range(1), "cpu", torch.float32, 1 << 24, w)
    steps = 200
    k, v = torch.randn(prompt + steps, 2, 16), torch.randn(prompt + steps, 2, 16)
    wb.reserve("s", prompt + steps)
    wb.write_prefill(0, "s", k[:prompt], v[:prompt], 0)
    st = wb.seqs["s"]
    for t in range(steps):
        n = prompt + t + 1
        plan = wb.plan_decode(["s"])
        steady = int(plan.steady_len[st.slot, 0])
        got = wave_exact_tokens(w, prompt, n)
        assert n - steady == st.indexed
        if st.indexed == 0:
            assert got == n
        else:
            per = w.tokens_per_cluster
            assert got - steady == min(st.indexed, per * math.ceil(w.retrieval_frac * st.indexed / per))
            retrieved = int(plan.retrieve[st.slot]) * st.indexed / st.clusters
            assert abs((got - steady) - retrieved) <= per
        wb.decode(0, plan, torch.randn(1, 4, 16), k[n - 1:n], v[n - 1:n])
        wb.finish_step(plan)
    assert st.clusters > 0
    # the paper's defaults at 32K: 4 + 64 + ceil(0.018 * 2044) = 37 clusters of 16 tokens
    assert wave_exact_tokens(WaveConfig(), 32768, 32769) == 69 + 16 * 37


def test_config_and_budget_forms():
    q = QuestConfig()
    assert q.budget is None and q.page_size == 16 and q.sink_page and q.dense_layers == 0
    assert QuestConfig(budget=0.25).budget_tokens(WaveConfig(), 1000, 1001) == 251
    assert QuestConfig(budget=300).budget_tokens(WaveConfig(), 1000, 1001) == 300
    for bad in (dict(budget=0), dict(page_size=24), dict(page_size=8), dict(dense_layers=-1)):
        with pytest.raises(ConfigError, match="quest config"):
            QuestConfig(**bad)
    assert EngineConfig(attention="quest").quest == QuestConfig()
    with pytest.raises(ConfigError, match="offload"):
        EngineConfig(attention="quest", offload=True)
    with pytest.raises(ConfigError, match="attention must be one of"):
        EngineConfig(attention="quests")


def test_kv_budget_counts_the_page_bounds():
    cfg = _cfg(4, 2, 16)
    budget = 1 << 20
    qb = make_backend("quest", cfg, range(1), "cpu", torch.float32, budget)
    fb = make_backend("full", cfg, range(1), "cpu", torch.float32, budget)
    assert qb.pages.num_pages == budget // (qb.bytes_per_token * 17)
    assert qb.stats()["capacity_bytes"] <= budget and fb.stats()["capacity_bytes"] <= budget
    assert qb.kmin[0].shape == (qb.pages.num_pages + 1, 2, 16)


def test_dense_layers_attend_fully():
    cfg = _cfg(4, 2, 16)
    qb = make_backend("quest", cfg, range(1), "cpu", torch.float32, 1 << 22,
                      quest=QuestConfig(budget=0.1, dense_layers=1))
    fb = make_backend("full", cfg, range(1), "cpu", torch.float32, 1 << 22)
    got, ref = (torch.stack(_run(b, [300, 40], 5, 4, 2, 16, seed=3)) for b in (qb, fb))
    assert torch.allclose(got, ref, atol=1e-5)


# -- the engine ---------------------------------------------------------------------------------
PROMPT = list(range(1, 255)) * 2
PARAMS = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)


def _generate(**kw):
    eng = LLMEngine(EngineConfig(model="tiny", device="cpu", kv_budget_bytes=1 << 25, **kw))
    outs = [[t for o in eng.generate(p, PARAMS) for t in o.token_ids] for p in (PROMPT, PROMPT[:77])]
    return outs, eng


def test_engine_quest_generates_and_equals_full_at_whole_budget():
    full, _ = _generate(attention="full")
    whole, eng = _generate(attention="quest", quest=QuestConfig(budget=1.0))
    assert whole == full
    assert eng.stats()["quest_page_size"] == 16
    sparse, _ = _generate(attention="quest", quest=QuestConfig(budget=64))
    assert [len(o) for o in sparse] == [40, 40]


def test_cli_generates_with_quest(capsys):
    from retroinfer import cli
    assert cli.main(["generate", "--prompt", "hello quest", "--max-tokens", "3", "--device", "cpu",
                     "--attention", "quest", "--quest-budget", "0.5", "--ignore-eos"]) == 0
    assert "(quest attention)" in capsys.readouterr().err


def test_deployment_args_take_quest():
    pytest.importorskip("ray")
    from retroinfer.deployments.app import AppArgs, plan_replica
    a = AppArgs.model_validate({"model": "tiny", "attention": "quest", "quest": {"budget": 0.2, "page_size": 32}})
    cfg, _, _ = plan_replica(a, {"CPU": 4})
    assert cfg.attention == "quest" and cfg.quest == QuestConfig(budget=0.2, page_size=32) and not cfg.offload
    with pytest.raises(ValueError, match="unknown quest option"):
        AppArgs.model_validate({"model": "tiny", "quest": {"budgt": 0.2}})


def test_random_lengths_property():
    """Many random batches: every row's output equals the reference."""
    rng = random.Random(0)
    for trial in range(4):
        hkv = rng.choice([1, 2, 4])
        hq, d = hkv * rng.choice([1, 2, 3]), rng.choice([16, 24])
        lens = [rng.choice([1, 15, 16, 17, rng.randint(1, 400)]) for _ in range(rng.randint(1, 5))]
        quest = QuestConfig(budget=rng.choice([0.05, 0.3, 40, 100]), sink_page=rng.random() < 0.5)
        qb = make_backend("quest", _cfg(hq, hkv, d), range(1), "cpu", torch.float32, 1 << 24, quest=quest)

        def check(t, out, keys, values, q):
            for i, n in enumerate(lens):
                m = n + t + 1
                ref = quest_reference(q[i], keys[i][:m], values[i][:m], _keep(quest, WaveConfig(), n, m), 16,
                                      quest.sink_page, d ** -0.5)
                assert torch.allclose(out[i].double(), ref, atol=2e-5, rtol=1e-4), (trial, t, i)

        _run(qb, lens, 6, hq, hkv, d, seed=100 + trial, check=check)


def test_rows_past_the_tokens_are_never_read_into_the_output():
    """The pools are allocated uninitialised: the unwritten tail of a row's last page and the
    scratch page may hold NaN. They are masked out, not only weighted zero (0 * NaN is NaN)."""
    from retroinfer.attention.quest import sparse_paged_decode
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, D, page, P = 2, 4, 2, 16, 8, 6
    k = torch.randn(P, page, Hkv, D, generator=g)
    v = torch.randn(P, page, Hkv, D, generator=g)
    table = torch.tensor([[0, 1, 5], [2, 3, 5]], dtype=torch.int32)[:, None].expand(B, Hq, 3).contiguous()
    tokens = torch.tensor([11, 14], dtype=torch.int32)          # page 5 (scratch) and the page tails unused
    q = torch.randn(B, Hq, D, generator=g)
    want = sparse_paged_decode(q, k, v, table, tokens, D ** -0.5)
    for b, n in enumerate(tokens.tolist()):                    # garbage where no token is
        last = table[b, 0, n // page].item()
        k[last, n % page:], v[last, n % page:] = float("nan"), float("nan")
    k[5], v[5] = float("nan"), float("nan")
    got = sparse_paged_decode(q, k, v, table, tokens, D ** -0.5)
    assert torch.isfinite(got).all() and torch.allclose(got, want)
