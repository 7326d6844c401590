"""Wave index build and three-zone attention on CPU (the torch reference path)."""
import pytest
import torch

from retroinfer.attention import make_backend
from retroinfer.config import ConfigError, EngineConfig, WaveConfig
from retroinfer.engine.llm_engine import LLMEngine
from retroinfer.engine.sampling import SamplingParams
from retroinfer.models.presets import preset_config
from retroinfer.wave.index import build_index

SMALL_WAVE = dict(sink=4, window=16, segment_size=256, tokens_per_cluster=8, kmeans_iters=4,
                  update_every=64, update_clusters=8)


@pytest.mark.parametrize("dtype,offset,tol", [(torch.float32, 0.0, 1e-5), (torch.bfloat16, 5.0, 3e-2)])
def test_build_index_is_a_clustered_permutation(dtype, offset, tol):
    """offset: keys far from the origin (centring matters; the centroid must still be the mean)."""
    torch.manual_seed(0)
    T, H, D = 700, 3, 32
    k, v = (torch.randn(T, H, D) + offset).to(dtype), torch.randn(T, H, D).to(dtype)
    wave = WaveConfig(**SMALL_WAVE)
    ix = build_index(k, v, wave)
    C = ix.num_clusters
    assert C == 3 * 30          # 3 segments of 234 rows, ceil(234 / 8) clusters each
    assert (ix.offsets[:, 1:] >= ix.offsets[:, :-1]).all() and (ix.offsets[:, -1] == T).all()
    for h in range(H):
        # the same rows, reordered
        for got, want in ((ix.keys[h], k[:, h]), (ix.values[h], v[:, h])):
            a, b = (torch.unique(x.float(), dim=0, return_counts=True) for x in (got, want))
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        for c in torch.randperm(C)[:10].tolist():
            lo, hi = ix.offsets[h, c].item(), ix.offsets[h, c + 1].item()
            if hi > lo:
                mean_k, mean_v = ix.keys[h, lo:hi].float().mean(0), ix.values[h, lo:hi].float().mean(0)
                assert torch.allclose(ix.centroids[h, c].float(), mean_k, atol=tol, rtol=tol)
                assert torch.allclose(ix.value_mean[h, c].float(), mean_v, atol=tol, rtol=tol)
                assert (ix.log_size[h, c] - wave.estimation_log_bias).exp().round().item() == hi - lo
            else:
                assert ix.log_size[h, c] == float("-inf")


def _decode_all(backend, T, steps, q, k, v, seq="s"):
    """Prefill T tokens, then `steps` decode steps; returns the attention outputs."""
    backend.reserve(seq, T + steps)
    backend.write_prefill(0, seq, k[:T], v[:T], 0)
    outs = []
    for t in range(steps):
        plan = backend.plan_decode([seq])
        outs.append(backend.decode(0, plan, q[t:t + 1], k[T + t:T + t + 1], v[T + t:T + t + 1]))
        backend.finish_step(plan)
    return torch.cat(outs)


@pytest.mark.parametrize("T", [50, 900])   # dense until long enough / indexed at prefill
def test_full_budget_equals_full_attention(T):
    torch.manual_seed(T)
    cfg = preset_config("tiny")
    steps, H, D = 150, cfg.num_kv_heads, cfg.head_dim
    q = torch.randn(steps, cfg.num_heads, D)
    k, v = torch.randn(T + steps, H, D), torch.randn(T + steps, H, D)
    wave = WaveConfig(**SMALL_WAVE, retrieval_frac=1.0, estimation_frac=0.0)
    wb = make_backend("wave", cfg, range(1), "cpu", torch.float32, 1 << 26, wave)
    fb = make_backend("full", cfg, range(1), "cpu", torch.float32, 1 << 26)
    got, ref = _decode_all(wb, T, steps, q, k, v), _decode_all(fb, T, steps, q, k, v)
    assert wb.seqs["s"].clusters, "the index must exist by the end (built at prefill or by updates)"
    assert (got - ref).abs().max() < 1e-4


def test_estimation_zone_lowers_error():
    """Keys with cluster structure: estimating the clusters past the retrieval zone must be
    closer to full attention than dropping them."""
    torch.manual_seed(3)
    cfg = preset_config("tiny")
    H, D, T = cfg.num_kv_heads, cfg.head_dim, 4000
    centres = torch.randn(H, 64, D) * 0.6
    k = (centres[:, torch.randint(0, 64, (T,))] + 0.3 * torch.randn(H, T, D)).transpose(0, 1).contiguous()
    v = torch.randn(T, H, D)
    q = torch.randn(1, cfg.num_heads, D)
    full = make_backend("full", cfg, range(1), "cpu", torch.float32, 1 << 26)
    ref = _decode_all(full, T - 1, 1, q, k, v)
    errs = {}
    for est in (0.0, 0.232):
        w = WaveConfig(segment_size=2048, kmeans_iters=6, retrieval_frac=0.05, estimation_frac=est)
        got = _decode_all(make_backend("wave", cfg, range(1), "cpu", torch.float32, 1 << 26, w), T - 1, 1, q, k, v)
        errs[est] = ((got - ref).norm() / ref.norm()).item()
    assert errs[0.232] < errs[0.0], errs


def test_wave_generation_equals_full_at_full_budget():
    wave = WaveConfig(**SMALL_WAVE, retrieval_frac=1.0, estimation_frac=0.0)
    prompt = list(range(1, 255)) * 3
    params = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)
    outs = {}
    for attn in ("full", "wave"):
        eng = LLMEngine(EngineConfig(model="tiny", device="cpu", attention=attn, wave=wave,
                                     kv_budget_bytes=1 << 26))
        outs[attn] = [t for o in eng.generate(prompt, params) for t in o.token_ids]
    assert outs["wave"] == outs["full"]


@pytest.mark.parametrize("bad", [dict(retrieval_frac=0), dict(retrieval_frac=0.9, estimation_frac=0.2),
                                 dict(window=0), dict(update_clusters=2000), dict(tokens_per_cluster=0),
                                 dict(estimation_log_bias=float("inf")), dict(estimation_log_bias=float("nan"))])
def test_invalid_wave_config_is_rejected(bad):
    with pytest.raises(ConfigError, match="wave config"):
        WaveConfig(**bad)


def test_estimation_log_bias_shifts_only_the_estimated_weights():
    """The bias is added to every non-empty cluster's log weight; clustering, layout and the
    exact zones are untouched, so at a 100% retrieval budget the output is unchanged."""
    g = torch.Generator().manual_seed(7)
    k, v = torch.randn(3000, 2, 32, generator=g), torch.randn(3000, 2, 32, generator=g)
    plain = build_index(k, v, WaveConfig(estimation_log_bias=0.0))
    biased = build_index(k, v, WaveConfig(estimation_log_bias=0.5))
    assert torch.equal(plain.keys, biased.keys) and torch.equal(plain.offsets, biased.offsets)
    full = torch.isfinite(plain.log_size)
    assert torch.equal(full, torch.isfinite(biased.log_size))
    assert torch.allclose(biased.log_size[full], plain.log_size[full] + 0.5)
    cfg = preset_config("tiny")
    q = torch.randn(1, cfg.num_heads, cfg.head_dim, generator=g)
    outs = []
    for wave in (WaveConfig(estimation_log_bias=0.0), WaveConfig(estimation_log_bias=0.7),
                 WaveConfig(retrieval_frac=1.0, estimation_frac=0.0, estimation_log_bias=0.0),
                 WaveConfig(retrieval_frac=1.0, estimation_frac=0.0, estimation_log_bias=0.7)):
        b = make_backend("wave", cfg, range(1), "cpu", torch.float32, 1 << 26, wave, 2)
        gen = torch.Generator().manual_seed(1)
        kk = torch.randn(4000, cfg.num_kv_heads, cfg.head_dim, generator=gen)
        vv = torch.randn(4000, cfg.num_kv_heads, cfg.head_dim, generator=gen)
        b.reserve("s", 4001)
        b.write_prefill(0, "s", kk, vv, 0)
        outs.append(b.decode(0, b.plan_decode(["s"]), q, kk[:1], vv[:1]))
    assert not torch.allclose(outs[0], outs[1])        # the estimation zone weighs more
    assert torch.allclose(outs[2], outs[3])            # no estimation zone: nothing to bias


def test_cli_rejects_bad_wave_value(capsys):
    from retroinfer.cli import main
    assert main(["generate", "--prompt", "hi", "--attention", "wave", "--wave-retrieval-frac", "1.5"]) == 2
    assert "wave config" in capsys.readouterr().err


def test_offloaded_pool_equals_gpu_resident_layout():
    """Offload keeps the cluster-sorted KV in a host pool; on CPU the result must not change."""
    torch.manual_seed(5)
    cfg = preset_config("tiny")
    T, steps, H, D = 900, 80, cfg.num_kv_heads, cfg.head_dim
    q = torch.randn(steps, cfg.num_heads, D)
    k, v = torch.randn(T + steps, H, D), torch.randn(T + steps, H, D)
    wave = WaveConfig(**SMALL_WAVE)
    resident = make_backend("wave", cfg, range(1), "cpu", torch.float32, 1 << 26, wave, max_seqs=2)
    offload = make_backend("wave", cfg, range(1), "cpu", torch.float32, 1 << 26, wave, max_seqs=2,
                           host_kv_budget_bytes=1 << 24)
    assert offload.offload and offload.pools.keys[0].device.type == "cpu" and offload.caches
    for seq in ("s", "t"):      # the second reuses the first's pool ranges: its cached clusters must go
        a, b = _decode_all(resident, T, steps, q, k, v, seq), _decode_all(offload, T, steps, q, k, v, seq)
        assert torch.equal(a, b)
        resident.free(seq)
        offload.free(seq)
        k, v = torch.randn_like(k), torch.randn_like(v)
    st = offload.stats()
    assert st["pcie_bytes_per_step"] > 0 and 0 < st["cache_hit_ratio"] < 1 and st["cache_bytes"] > 0


def test_range_allocator_property():
    """Random alloc/free: ranges never overlap, frees coalesce back to one range."""
    import random
    from retroinfer.wave.pools import RangeAllocator
    rng = random.Random(0)
    a = RangeAllocator(1000)
    live = {}
    for _ in range(2000):
        if live and rng.random() < 0.5:
            start = rng.choice(list(live))
            a.release(start)
            del live[start]
        else:
            n = rng.randint(1, 120)
            s = a.alloc(n)
            if s is None:
                assert a.free_total < n or all(sz < n for _, sz in a.free_ranges)
                continue
            live[s] = n
        spans = sorted(live.items())
        assert all(s1 + n1 <= s2 for (s1, n1), (s2, _) in zip(spans, spans[1:]))
        assert a.free_total + sum(live.values()) == 1000
    for s in list(live):
        a.release(s)
    assert a.free_ranges == [(0, 1000)]


def test_host_pool_stays_within_its_budget():
    """torch rounds each pinned request up to a power of two: the pool is carved from slabs and
    sized so that what it pins, rounding included, stays within the budget."""
    from retroinfer.wave.host_memory import pinned_bytes, slab_plan
    G = 2**30
    for count, nbytes in [(64, 66 * G // 64), (56, 57 * G // 56), (64, 62 * G // 64), (3, 1000), (1, 4096)]:
        plan = slab_plan(count, nbytes)
        assert sum(n for _, n in plan) == count
        assert all(slab & (slab - 1) == 0 and n * nbytes <= slab for slab, n in plan)
        assert pinned_bytes(count, nbytes) <= count * nbytes * 1.1 + 2 * nbytes
    cfg = preset_config("random:llama3-8b")
    wb = make_backend("wave", cfg, range(2), "cpu", torch.bfloat16, 1 << 30, WaveConfig(), max_seqs=2,
                      host_kv_budget_bytes=3 << 26)
    assert 0.85 * (3 << 26) <= wb.host_pinned_bytes <= 3 << 26
    assert wb.stats()["host_pool_bytes"] <= wb.host_pinned_bytes


def test_offload_metrics_sum_over_pipeline_stages():
    """Two stages on CPU with the wave buffer: the engine's PCIe traffic and cache counts are the
    sums of its stages', the hit ratio recomputed from them."""
    cfg = EngineConfig(model="tiny", device="cpu", devices=("cpu", "cpu"), attention="wave", offload=True,
                       host_kv_budget_bytes=1 << 24, kv_budget_bytes=1 << 26,
                       wave=WaveConfig(**SMALL_WAVE))
    eng = LLMEngine(cfg)
    list(eng.generate(list(range(1, 255)) * 3, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)))
    s = eng.stats()
    per = s["stages"]
    assert len(per) == 2 and all(p["retrieved_clusters"] > 0 for p in per)
    for k in ("retrieved_clusters", "cache_hits", "pcie_bytes_total", "host_pinned_bytes"):
        assert s[k] == sum(p[k] for p in per)
    assert s["cache_hit_ratio"] == s["cache_hits"] / s["retrieved_clusters"]


def test_auto_cache_fills_the_gpu_budget_the_index_leaves():
    """cache_fraction "auto": every host token keeps its meta-index on the GPU, and the cache takes
    what the GPU budget leaves (at most 90% of the pool); a fixed fraction sizes it as asked; the
    CLI takes "auto"."""
    from retroinfer.attention.wave import AUTO_CACHE_MAX
    from retroinfer.config import fraction_or_auto
    cfg = preset_config("tiny")
    host = 1 << 24
    fixed = make_backend("wave", cfg, range(1), "cpu", torch.float32, 1 << 26, WaveConfig(**SMALL_WAVE), max_seqs=2,
                         host_kv_budget_bytes=host)
    for gpu in (1 << 22, 1 << 26):        # a tight budget: a small cache; an ample one: the cap
        auto = make_backend("wave", cfg, range(1), "cpu", torch.float32, gpu,
                            WaveConfig(**SMALL_WAVE, cache_fraction="auto"), max_seqs=2, host_kv_budget_bytes=host)
        st = auto.stats()
        assert auto.pools.tokens.capacity == fixed.pools.tokens.capacity      # the host pool is not cut
        assert 0 < auto.cache_fraction <= AUTO_CACHE_MAX and st["cache_fraction"] == auto.cache_fraction
        slots = int(auto.pools.tokens.capacity * auto.cache_fraction) // auto.wave.cache_slot_rows
        assert auto.caches[0].slots == slots
        steady = auto.bytes_per_token * auto.steady_cap * 2
        assert st["cache_bytes"] + auto.pools.tokens.capacity * auto.bytes_per_token * auto.cluster_ratio \
            <= gpu - steady
    assert auto.cache_fraction == AUTO_CACHE_MAX and fixed.cache_fraction == 0.05
    assert fraction_or_auto("Auto") == "auto" and fraction_or_auto("0.25") == 0.25
    with pytest.raises(ConfigError):
        WaveConfig(cache_fraction="most")


