"""The wave buffer's GPU cluster cache on CPU: its bookkeeping stays consistent under random
admission, eviction and invalidation, it evicts least-recently-used first, and a gather through
it returns exactly the host pool's rows."""
import random

import torch

from retroinfer.kernels.gather import gather_clusters_batched, gather_clusters_cached
from retroinfer.wave.cache import ClusterCache


def _pool(H, C, D, g):
    sizes = torch.randint(0, 50, (H, C), generator=g)          # some clusters past slot_rows, some empty
    offsets = torch.cat([torch.zeros(H, 1, dtype=torch.long), sizes.cumsum(1)], 1).int()
    N = int(offsets[:, -1].max())
    return torch.randn(H, N, D, generator=g), torch.randn(H, N, D, generator=g), offsets


def _ids(S, H, R, C, rng, hot):
    """Distinct ids per (slot, head); slots own disjoint cluster ranges, some ids padded -1; a
    hot set makes repeats (hits) likely."""
    out = torch.full((S, H, R), -1, dtype=torch.long)
    span = C // S
    for s in range(S):
        for h in range(H):
            n = rng.randrange(0, R + 1)
            pick = rng.sample(hot[s], min(n, len(hot[s]))) if rng.random() < 0.7 else \
                rng.sample(range(s * span, (s + 1) * span), n)
            out[s, h, :len(pick)] = torch.tensor(pick, dtype=torch.long)
    return out


def test_cache_bookkeeping_property():
    g, rng = torch.Generator().manual_seed(0), random.Random(0)
    S, H, R, C, D, slots = 3, 2, 6, 240, 16, 10
    k, v, offsets = _pool(H, C, D, g)
    cache = ClusterCache(H, slots, 32, C, D, torch.float32, torch.device("cpu"))
    hot = [rng.sample(range(s * (C // S), (s + 1) * (C // S)), 8) for s in range(S)]
    stamp = {}                       # (head, cluster) -> step of its last use, for the LRU check
    total_hits = 0
    for step in range(1, 200):
        if step % 37 == 0:           # a sequence finishes: its range is forgotten
            s = rng.randrange(S)
            c0, c1 = s * (C // S), (s + 1) * (C // S)
            cache.invalidate(c0, c1)
            stamp = {key: t for key, t in stamp.items() if not c0 <= key[1] < c1}
            cache.check()
            assert (cache.slot_of[:, c0:c1] == -1).all()
        ids = _ids(S, H, R, C, rng, hot)
        before = {(h, int(c)) for h in range(H) for c in cache.cluster_of[h, :slots] if c >= 0}
        read, write, hit = cache.plan(ids)
        cache.check()
        for s in range(S):
            for h in range(H):
                for r in range(R):
                    c = int(ids[s, h, r])
                    assert bool(hit[s, h, r]) == (c >= 0 and (h, c) in before)
                    assert (int(read[s, h, r]) >= 0) == bool(hit[s, h, r])
                    assert int(write[s, h, r]) == -1 or not hit[s, h, r]
        total_hits += int(hit.sum())
        # The gather through the cache equals the plain gather, and fills the admitted slots.
        Lmax = 6 * 50
        dst = [torch.zeros(S, H, Lmax, D) for _ in range(4)]
        n_plain = gather_clusters_batched(k, v, offsets, ids, dst[0], dst[1], 0)
        n_cached, n_src = gather_clusters_cached(k, v, offsets, ids, cache.k, cache.v, read, write,
                                                 dst[2], dst[3], 0)
        assert torch.equal(n_plain, n_cached) and torch.equal(dst[0], dst[2]) and torch.equal(dst[1], dst[3])
        sizes = offsets[:, 1:] - offsets[:, :-1]
        for s in range(S):
            for h in range(H):
                want = sum(max(0, int(sizes[h, c]) - 32) if hit[s, h, r] else int(sizes[h, c])
                           for r, c in enumerate(ids[s, h].tolist()) if c >= 0)
                assert int(n_src[s, h]) == want
        # Every cached cluster holds its pool rows; evictions took the least recently used.
        now = {(h, int(c)) for h in range(H) for c in cache.cluster_of[h, :slots] if c >= 0}
        used = {(h, int(c)) for s in range(S) for h in range(H) for c in ids[s, h].tolist() if c >= 0}
        for key in used:
            stamp[key] = step
        for h in range(H):
            evicted = [stamp[key] for key in before - now if key[0] == h]
            kept_idle = [stamp[key] for key in now & before if key[0] == h and key not in used]
            if evicted and kept_idle:
                assert max(evicted) <= min(kept_idle), "evicted a cluster used more recently than one kept"
            for slot in range(slots):
                c = int(cache.cluster_of[h, slot])
                if c >= 0:
                    lo, n = int(offsets[h, c]), min(32, int(sizes[h, c]))
                    assert torch.equal(cache.k[h, slot, :n], k[h, lo:lo + n])
                    assert torch.equal(cache.v[h, slot, :n], v[h, lo:lo + n])
    assert total_hits > 100


def test_cache_never_evicts_this_steps_hits():
    """More misses than free slots: hits keep their slots; the surplus misses are not admitted."""
    cache = ClusterCache(1, 4, 16, 100, 8, torch.float32, torch.device("cpu"))
    cache.plan(torch.tensor([[[0, 1, 2, 3]]]))
    read, write, hit = cache.plan(torch.tensor([[[0, 1, 50, 51, 52, 53]]]))
    assert hit[0, 0].tolist() == [True, True, False, False, False, False]
    free = set(range(4)) - set(read[0, 0, :2].tolist())
    assert sorted(w for w in write[0, 0].tolist() if w >= 0) == sorted(free)
    cache.check()
    assert {int(c) for c in cache.cluster_of[0, :4]} >= {0, 1}
