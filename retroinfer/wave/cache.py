"""The wave buffer's GPU cluster cache, one per layer: the first `slot_rows` rows of recently
retrieved clusters, per KV head, in fixed slots, evicted least-recently-used.

The bookkeeping is tensors on the cache's device: cluster -> slot, slot -> cluster and each
slot's last-use stamp. `plan` finds the hits and picks victims for the misses in one kernel
launch (no host synchronisation, capturable in a CUDA graph); the gather kernel then reads hits
from the cache and, as it copies a missed cluster from the host pool, writes it into its victim
slot (kernels/gather.py, `gather_clusters_cached`). A cluster longer than `slot_rows` keeps its
tail in the host pool: its cached head still saves that much of the transfer.

Why fixed slots: admission and eviction then never fragment, and a slot's place in the cache
is a plain index the kernel can compute; clusters average `tokens_per_cluster` rows, so
`slot_rows` of twice that keeps most clusters whole."""
from __future__ import annotations

import torch

from ..kernels.cache_plan import cache_plan


class ClusterCache:
    def __init__(self, heads: int, slots: int, slot_rows: int, clusters: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        assert slots >= 1 and slot_rows % 16 == 0, "slots >= 1; slot_rows a multiple of 16"
        self.heads, self.slots, self.slot_rows, self.clusters = heads, slots, slot_rows, clusters
        self.k = torch.zeros(heads, slots, slot_rows, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        # One extra column each: the target of writes that must not land (non-hits, non-admits).
        self.slot_of = torch.full((heads, clusters + 1), -1, dtype=torch.int32, device=device)
        self.cluster_of = torch.full((heads, slots + 1), -1, dtype=torch.int64, device=device)
        self.last_use = torch.full((heads, slots + 1), -1, dtype=torch.int64, device=device)
        self.clock = torch.zeros(heads, dtype=torch.int64, device=device)     # steps, per head
        self._heads = torch.arange(heads, device=device)

    def plan(self, ids: torch.Tensor, stats: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ids: [S, H, R] cluster ids to gather this step (-1: none; no id twice per head).
        Marks the hits used, assigns the least recently used slots not hit this step to the misses
        (as many as there are such slots) and updates the maps as if the gather had admitted them
        (kernels/cache_plan.py, one launch). Returns (read_slot, write_slot) [S, H, R] int32 (-1:
        none) and the hit mask; `stats` ([2] int64) accumulates retrieved and hit counts."""
        return cache_plan(ids, self.slot_of, self.cluster_of, self.last_use, self.clock, stats)

    def invalidate(self, c0: int, c1: int) -> None:
        """Forget clusters [c0, c1) (their pool range is being freed); their slots go first."""
        span = self.slot_of[:, c0:c1].long()
        slot = torch.where(span >= 0, span, self.slots)
        heads = self._heads[:, None].expand_as(slot)
        self.cluster_of[heads, slot] = -1
        self.last_use[heads, slot] = -1
        self.slot_of[:, c0:c1] = -1
        self.cluster_of[:, self.slots] = -1

    def check(self) -> None:
        """Consistency of the maps (tests): slot_of and cluster_of are inverse bijections."""
        for h in range(self.heads):
            cl = self.cluster_of[h, :self.slots]
            cached = (cl >= 0).nonzero().flatten()
            assert torch.equal(self.slot_of[h, cl[cached]].long(), cached), f"head {h}: slot -> cluster -> slot"
            ids = (self.slot_of[h, :self.clusters] >= 0).nonzero().flatten()
            assert torch.equal(self.cluster_of[h, self.slot_of[h, ids].long()], ids), f"head {h}: cluster -> slot"
            assert len(ids) == len(cached)
