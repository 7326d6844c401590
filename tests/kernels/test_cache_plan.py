"""cache_plan: the cluster cache's step bookkeeping in one launch, step by step equal to its torch
reference (outputs and all maps) over random steps with hits, misses past the free slots,
padding and several sequences; the maps stay inverse bijections (ClusterCache.check)."""

import pytest
import torch
from kernel_testutil import GPU, gen

from retroinfer.kernels import cache_plan, cache_plan_ref
from retroinfer.kernels.cache_plan import TUNE
from retroinfer.wave.cache import ClusterCache

# (S, H, R, clusters, slots, steps, block_i, block_s)
CASES = [
    (1, 1, 4, 40, 3, 12, 16, 16),          # more misses than slots every step
    (3, 2, 6, 240, 10, 30, 16, 16),        # several chunks of ids and of slots
    (2, 4, 37, 500, 64, 20, 32, 16),
    (4, 3, 20, 900, 200, 15, 2048, 4096),  # one chunk each
]
GPU_ONLY = [(1, 4, 1184, 65536, 1638, 8, 2048, 4096),    # 1M tokens, batch 1, 5% cache
            (8, 8, 160, 60000, 3000, 8, 2048, 4096)]
PARAMS = ([pytest.param("cpu", c, id=f"interp-{i}") for i, c in enumerate(CASES)]
          + [pytest.param("cuda", c, marks=GPU, id=f"cuda-{i}") for i, c in enumerate(CASES + GPU_ONLY)])


def step_ids(g, S, H, R, C, hot):
    """Distinct ids per (slot, head) from disjoint ranges per slot; half from a hot set (hits)."""
    span = C // S
    out = torch.full((S, H, R), -1, dtype=torch.long)
    for s in range(S):
        for h in range(H):
            n = int(torch.randint(0, R + 1, (1,), generator=g))
            pool = hot[s] if torch.rand(1, generator=g).item() < 0.5 else torch.arange(s * span, (s + 1) * span)
            out[s, h, :min(n, len(pool))] = pool[torch.randperm(len(pool), generator=g)[:n]]
    return out


@pytest.mark.parametrize("device,case", PARAMS)
def test_cache_plan_matches_ref(device, case, monkeypatch):
    S, H, R, C, slots, steps, block_i, block_s = case
    monkeypatch.setitem(TUNE, "block_ids", block_i)
    monkeypatch.setitem(TUNE, "block_slots", block_s)
    g = gen("cpu", "cache_plan", case)
    span = C // S
    hot = [s * span + torch.randperm(span, generator=g)[:max(2, R)] for s in range(S)]
    caches = [ClusterCache(H, slots, 16, C, 8, torch.float32, torch.device(device)) for _ in range(2)]
    stats = [torch.zeros(2, dtype=torch.long, device=device) for _ in range(2)]
    for step in range(steps):
        ids = step_ids(g, S, H, R, C, hot).to(device)
        if step % 2:
            ids = ids.int()
        got = cache_plan(ids, caches[0].slot_of, caches[0].cluster_of, caches[0].last_use, caches[0].clock, stats[0])
        want = cache_plan_ref(ids, caches[1].slot_of, caches[1].cluster_of, caches[1].last_use, caches[1].clock,
                              stats[1])
        for a, b, name in zip(got, want, ("read", "write", "hit")):
            assert torch.equal(a, b), (name, step)
        for name in ("slot_of", "cluster_of", "last_use", "clock"):
            assert torch.equal(getattr(caches[0], name), getattr(caches[1], name)), (name, step)
        assert torch.equal(stats[0], stats[1])
        caches[0].check()
