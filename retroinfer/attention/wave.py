"""Wave attention: each decode step, each layer, each KV head attends in three zones —
steady (sink + local window + decoded tokens not yet indexed, exact), retrieval (the top clusters
by centroid score, exact over their gathered KV) and estimation (the next clusters, each one
weighted entry: key = centroid, value = value mean, weight = size) — merged by log-sum-exp.

Every sequence owns a steady-zone slot and ranges of the per-layer pools (wave/pools.py), so a
decode step runs a fixed set of batched kernels over all slots (idle slots have zero lengths),
whatever the batch: no per-sequence launches, no host synchronisation, capturable in a CUDA graph.
With offload (the wave buffer) the cluster-sorted KV lives in pinned host memory and a GPU
cluster cache per layer (wave/cache.py) serves the retrieved clusters it holds; the gather reads
the misses over PCIe and admits them into the cache on the way."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable

import torch

from ..config import WaveConfig
from ..kernels import cdiv, next_pow2
from ..kernels.centroid_scores import centroid_logits
from ..kernels.gather import cluster_rows, gather_clusters_batched, gather_clusters_cached
from ..kernels.select import select_zones_logits
from ..kernels.split_reduce import merge_partials
from ..kernels.step_inputs import step_inputs
from ..kernels.weighted_decode import estimate_decode, weighted_decode
from ..side_stream import SideStream
from ..wave.cache import ClusterCache
from ..wave.host_memory import pinned_bytes
from ..wave.index import ClusterIndex, build_index
from ..wave.pools import WavePools
from .base import AttentionBackend, KVCapacityError


@dataclass
class SeqState:
    slot: int
    tok0: int                          # first row of its range of the token pool
    cl0: int                           # first entry of its range of the cluster pool
    tokens: int                        # reserved tokens
    steady: int = 0                    # valid rows of the steady zone
    indexed: int = 0                   # tokens in the index (same in every layer)
    clusters: int = 0                  # clusters in the index (same in every layer)


@dataclass
class WavePlan:
    """Per-step inputs shared by every layer; the [S] tensors cover slots 0..S-1 (slot 0 is
    scratch, S a power of two past the highest busy slot)."""
    seq_ids: list
    slots: torch.Tensor                # [B] int64
    write_pos: torch.Tensor            # [B] int64: steady row of this step's token
    steady_len: torch.Tensor           # [S, H] int32
    counts: torch.Tensor               # [S] int32 clusters (0: idle or not indexed yet)
    base: torch.Tensor                 # [S] int64 first cluster in the pool
    retrieve: torch.Tensor             # [S] int64 retrieval clusters
    estimate: torch.Tensor             # [S] int64 estimation clusters
    shape: tuple[int, int, int, int, int]   # (slots S, score width W, retrieval cap R, estimation
                                            #  cap E, execution buffer rows of the retrieved KV)
    updates: list = field(default_factory=list)   # SeqStates whose steady zone is full


AUTO_CACHE_MAX = 0.9    # the largest share of the host pool an "auto" GPU cache holds
CACHE_SLACK = 1.1       # GPU budget per byte of cached KV: 10% more, for the cache's maps and stamps
# A step's caps are rounded up to these, so that a CUDA graph captured for them serves many steps.
SCORE_ROUND = 512       # clusters scored per slot
RETRIEVE_ROUND = 16     # retrieval-zone clusters
ESTIMATE_ROUND = 64     # estimation-zone clusters
ROWS_ROUND = 256        # execution-buffer rows of the retrieved KV


def round_up(n: int, m: int) -> int:
    return cdiv(n, m) * m


def zone_caps(retrieve: int, estimate: int) -> tuple[int, int]:
    """A step's retrieval and estimation caps for its largest zones (before the bound by the
    scored width)."""
    return round_up(retrieve, RETRIEVE_ROUND), round_up(estimate, ESTIMATE_ROUND)


class WaveAttention(AttentionBackend):
    def __init__(self, cfg, layer_ids, device, dtype, kv_budget_bytes: int, wave: WaveConfig,
                 max_seqs: int = 16, host_kv_budget_bytes: int | None = None):
        """`host_kv_budget_bytes` set: the cluster-sorted KV lives in pinned host memory of that
        size (the wave buffer's CPU pool) and the GPU budget holds the steady zones and the
        meta-index; else everything is on the GPU."""
        super().__init__(cfg, layer_ids, device, dtype)
        self.wave = wave
        self.steady_cap = wave.sink + wave.window + wave.update_every
        # Clusters per token at most: prompt segments (tokens_per_cluster, plus one per segment
        # for rounding) and decode updates (update_clusters per update_every).
        self.cluster_ratio = max(1 / wave.tokens_per_cluster, wave.update_clusters / wave.update_every) \
            + 1 / wave.segment_size
        steady = WavePools.bytes_needed(cfg, len(layer_ids), dtype, max_seqs, self.steady_cap, 0, 0)
        gpu_free = kv_budget_bytes - steady
        bpt = self.bytes_per_token
        self.cache_fraction = 0.0
        if host_kv_budget_bytes is None:
            tokens = int(gpu_free / (bpt * (1 + self.cluster_ratio)))
        elif wave.cache_fraction == "auto":   # the meta-index of every host token; the rest caches
            tokens = min(self._host_tokens(host_kv_budget_bytes, len(layer_ids)),
                         int(gpu_free / (bpt * self.cluster_ratio)))
            spare = gpu_free / (bpt * max(tokens, 1)) - self.cluster_ratio
            self.cache_fraction = max(0.0, min(AUTO_CACHE_MAX, spare / CACHE_SLACK))
        else:   # the GPU holds the meta-index and the cluster cache (cache_fraction of the tokens)
            self.cache_fraction = float(wave.cache_fraction)
            tokens = min(self._host_tokens(host_kv_budget_bytes, len(layer_ids)),
                         int(gpu_free / (bpt * (self.cluster_ratio + CACHE_SLACK * self.cache_fraction))))
        if tokens < wave.update_every:
            raise ValueError(f"KV budget of {kv_budget_bytes / 2**20:.1f} MiB (GPU) / "
                             f"{(host_kv_budget_bytes or 0) / 2**20:.1f} MiB (host) leaves no room for the "
                             f"wave index after the steady zones of {max_seqs} sequences")
        clusters = int(tokens * self.cluster_ratio) + 4 * max_seqs
        self.offload = host_kv_budget_bytes is not None
        self.pools = WavePools(cfg, layer_ids, self.device, dtype, max_seqs, self.steady_cap, tokens, clusters,
                               host_tokens=self.offload)
        self.host_pinned_bytes = 0
        if self.offload:
            n = 2 * len(layer_ids)
            self.host_pinned_bytes = pinned_bytes(n, tokens * self.bytes_per_token // n)
        self.caches: dict[int, ClusterCache] = {}
        cache_slots = int(tokens * self.cache_fraction) // wave.cache_slot_rows
        if self.offload and cache_slots:
            self.caches = {li: ClusterCache(cfg.num_kv_heads, cache_slots, wave.cache_slot_rows, clusters,
                                            cfg.head_dim, dtype, self.device) for li in layer_ids}
        # retrieved clusters, of them cache hits, rows gathered, of them read from the source pool
        self.counters = torch.zeros(4, dtype=torch.long, device=self.device)
        self.steps = 0
        self.free_slots = list(range(max_seqs, 0, -1))      # slot 0: scratch (pools.scratch)
        self.max_rows = max_seqs                             # a slot per sequence: no more rows than that
        self.seqs: dict[Hashable, SeqState] = {}
        self.max_cluster = 0           # over all sequences and layers: sizes the gather buffer
        self.side = SideStream(self.device)

    def _host_tokens(self, budget: int, layers: int) -> int:
        """The most tokens whose pinned K and V of every layer stay within `budget` bytes."""
        row = self.bytes_per_token // (2 * layers)          # one token of one layer's K (or V)
        lo, hi = 0, budget // self.bytes_per_token
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if pinned_bytes(2 * layers, mid * row) <= budget else (lo, mid - 1)
        return lo

    # -- lifecycle ----------------------------------------------------------------------------------
    def _clusters_for(self, tokens: int) -> int:
        return int(tokens * self.cluster_ratio) + 3

    def reserve(self, seq_id, num_tokens):
        p = self.pools
        if num_tokens > p.tokens.capacity:
            raise KVCapacityError(f"{num_tokens} tokens exceed the KV capacity of {p.tokens.capacity} tokens",
                                  ever=False)
        if not self.free_slots:
            raise KVCapacityError("every sequence slot is busy", ever=True)
        tok0 = p.tokens.alloc(num_tokens)
        cl0 = p.clusters.alloc(self._clusters_for(num_tokens)) if tok0 is not None else None
        if cl0 is None:
            if tok0 is not None:
                p.tokens.release(tok0)
            raise KVCapacityError(f"{num_tokens} tokens of KV: {p.tokens.free_total} tokens free", ever=True)
        self.seqs[seq_id] = SeqState(slot=self.free_slots.pop(), tok0=tok0, cl0=cl0, tokens=num_tokens)

    def free(self, seq_id):
        st = self.seqs.pop(seq_id, None)
        if st is not None:
            for cache in self.caches.values():
                cache.invalidate(st.cl0, st.cl0 + self.pools.clusters.taken[st.cl0])
            self.pools.tokens.release(st.tok0)
            self.pools.clusters.release(st.cl0)
            self.free_slots.append(st.slot)

    def write_prefill(self, layer, seq_id, k, v, start):
        assert start == 0, "wave attention indexes whole prompts"
        st, w = self.seqs[seq_id], self.wave
        T = k.shape[0]
        if T - w.sink - w.window >= w.update_every:
            ix = build_index(k[w.sink:T - w.window], v[w.sink:T - w.window], w)
            self._add_segment(layer, st, ix)
            k_s, v_s = torch.cat([k[:w.sink], k[T - w.window:]]), torch.cat([v[:w.sink], v[T - w.window:]])
        else:   # too short to index: dense until decoding makes it long enough
            k_s, v_s = k, v
        self.pools.write_steady(layer, st.slot, 0, k_s.transpose(0, 1), v_s.transpose(0, 1))
        st.steady = k_s.shape[0]

    def _add_segment(self, layer, st: SeqState, ix: ClusterIndex) -> None:
        """Appends a segment after the sequence's index; the counts move after the last layer."""
        self.pools.write_index(layer, st.tok0 + st.indexed, st.cl0 + st.clusters, ix)
        self.max_cluster = max(self.max_cluster, ix.max_cluster)
        if layer == self.layer_ids[-1]:
            st.indexed += ix.num_tokens
            st.clusters += ix.num_clusters

    # -- decode -------------------------------------------------------------------------------------
    def plan_decode(self, seq_ids):
        states = [self.seqs[s] for s in seq_ids]
        H = self.cfg.num_kv_heads
        S = min(next_pow2(max(st.slot for st in states) + 1), self.pools.slots)
        steady = torch.zeros(S, dtype=torch.int32)
        counts = torch.zeros(S, dtype=torch.int32)
        base = torch.zeros(S, dtype=torch.long)
        retrieve = torch.zeros(S, dtype=torch.long)
        estimate = torch.zeros(S, dtype=torch.long)
        for st in states:
            steady[st.slot], counts[st.slot], base[st.slot] = st.steady + 1, st.clusters, st.cl0
            if st.clusters:
                retrieve[st.slot], estimate[st.slot] = self.wave.zone_sizes(st.clusters)
        # Caps rounded up, so that a CUDA graph captured for them serves many steps.
        W = min(round_up(int(counts.max()), SCORE_ROUND), self.pools.clusters.capacity)
        R_cap, E_cap = zone_caps(int(retrieve.max()), int(estimate.max()))
        K = min(R_cap + E_cap, W)
        R, E = min(R_cap, K), min(E_cap, K)
        rows = round_up(R * self.max_cluster, ROWS_ROUND) if R else 0
        dev = self.device
        plan = WavePlan(
            seq_ids=list(seq_ids),
            slots=torch.tensor([st.slot for st in states], device=dev),
            write_pos=torch.tensor([st.steady for st in states], device=dev),
            steady_len=steady[:, None].expand(S, H).contiguous().to(dev),
            counts=counts.to(dev), base=base.to(dev), retrieve=retrieve.to(dev), estimate=estimate.to(dev),
            shape=(S, W, R, E, rows),
            updates=[st for st in states if st.steady + 1 == self.steady_cap])
        for st in states:
            st.steady += 1
        self.pools.ready()
        self.steps += 1
        return plan

    def decode(self, layer, plan: WavePlan, q, k, v):
        B, Hq, D = q.shape
        H = self.cfg.num_kv_heads
        p = self.pools
        S, W, R, E, cap = plan.shape
        ks, vs = p.k_steady[layer][:S], p.v_steady[layer][:S]
        q_slots = step_inputs(q, k, v, plan.slots, plan.write_pos, ks, vs, S)
        # Every zone's split-K states, merged once (log-sum-exp) at the end. The steady and
        # estimation zones run on the side stream, beside the retrieval zone's choice and gather.
        zones = []
        with self.side.fork():
            zones.append(weighted_decode(q_slots, ks, vs, plan.steady_len, None, self.scale, partial=True))
        if cap:
            ret, est, logits = self._select(layer, plan, q_slots)
            if not self.offload:   # the row numbers first: a few microseconds the side work would delay
                retrieved = self._retrieve(layer, plan, ret)
            if E:   # the estimation zone's clusters (plan.estimate of them per slot), read in place
                with self.side.fork():
                    zones.append(estimate_decode(q_slots, p.centroids[layer], p.value_mean[layer], p.log_size[layer],
                                                 est, plan.estimate, self.scale, base=plan.base, width=E,
                                                 partial=True, logits=logits))
            if self.offload:       # the cache plan and the gather over PCIe, beside the estimation
                retrieved = self._retrieve(layer, plan, ret)
            k_x, v_x, rows, lengths = retrieved
            zones.append(weighted_decode(q_slots, k_x, v_x, lengths, None, self.scale, partial=True, rows=rows))
        self.side.join()
        out = q.new_empty((B, Hq, D))
        merge_partials(zones, out.view(-1, D), slots=plan.slots)    # only the batch's slots
        return out

    def _select(self, layer, plan: WavePlan, q_slots: torch.Tensor):
        """Scores every slot's clusters and selects its zones (exact, no sort): the retrieval zone
        as pool ids [S, H, R] and the estimation zone as local ids [S, H, E], -1 past the counts;
        and the clusters' logits, which the estimation zone reads instead of the centroids."""
        p = self.pools
        S, W, R, E, cap = plan.shape
        logits = centroid_logits(q_slots, p.centroids[layer], plan.counts, self.scale, base=plan.base, width=W)
        # zone_sizes keeps retrieve + estimate <= counts, so the zones hold exactly those counts
        ret, est = select_zones_logits(logits, plan.counts, plan.retrieve, plan.estimate, R, E, base=plan.base)
        return ret, est, logits

    def _retrieve(self, layer, plan: WavePlan, ret: torch.Tensor):
        """The retrieval zone's keys and values as (k, v, rows, lengths): a GPU-resident pool is
        read in place through its row numbers (rows [S, H, cap]); an offloaded one is gathered into
        an execution buffer [S, H, cap, D] (rows None), through the GPU cluster cache if any."""
        p, dev = self.pools, self.device
        H, D = self.cfg.num_kv_heads, self.cfg.head_dim
        S, cap = plan.shape[0], plan.shape[4]
        if not self.offload:
            rows = torch.empty(S, H, cap, device=dev, dtype=torch.int32)
            return p.keys[layer], p.values[layer], rows, cluster_rows(p.offsets[layer], ret, rows)
        k_x = torch.empty(S, H, cap, D, device=dev, dtype=self.dtype)
        v_x = torch.empty_like(k_x)
        cache = self.caches.get(layer)
        if cache is not None:
            read, write, _ = cache.plan(ret, stats=self.counters[:2])
            n_ret, _ = gather_clusters_cached(p.keys[layer], p.values[layer], p.offsets[layer], ret,
                                              cache.k, cache.v, read, write, k_x, v_x, 0, tally=self.counters)
        else:      # no cache: every gathered row crossed PCIe
            n_ret = gather_clusters_batched(p.keys[layer], p.values[layer], p.offsets[layer], ret, k_x, v_x, 0,
                                            tally=self.counters)
        return k_x, v_x, None, n_ret

    def finish_step(self, plan: WavePlan) -> None:
        """Index maintenance after the step: the oldest `update_every` decoded tokens past the
        sink become one new segment in every layer."""
        w = self.wave
        lo, hi = w.sink, w.sink + w.update_every
        for st in plan.updates:
            for layer in self.layer_ids:
                ks, vs = self.pools.k_steady[layer][st.slot], self.pools.v_steady[layer][st.slot]
                new = build_index(ks[:, lo:hi].transpose(0, 1), vs[:, lo:hi].transpose(0, 1), w,
                                  clusters=w.update_clusters, segment=w.update_every)
                self._add_segment(layer, st, new)
                self.pools.shift_steady(layer, st.slot, lo, hi)
            st.steady -= w.update_every

    def index_of(self, seq_id, layer: int) -> ClusterIndex:
        """A sequence's index in one layer, as views of the pools (for inspection and benchmarks)."""
        st, p = self.seqs[seq_id], self.pools
        n, c = st.indexed, st.clusters
        offsets = p.offsets[layer][:, st.cl0:st.cl0 + c + 1] - st.tok0
        return ClusterIndex(
            keys=p.keys[layer][:, st.tok0:st.tok0 + n], values=p.values[layer][:, st.tok0:st.tok0 + n],
            offsets=offsets, centroids=p.centroids[layer][:, st.cl0:st.cl0 + c],
            value_mean=p.value_mean[layer][:, st.cl0:st.cl0 + c], log_size=p.log_size[layer][:, st.cl0:st.cl0 + c],
            max_cluster=int((offsets[:, 1:] - offsets[:, :-1]).max()) if c else 0)

    # -- CUDA graphs --------------------------------------------------------------------------------
    def graph_key(self, plan: WavePlan):
        return plan.shape

    def static_plan(self, batch: int, plan: WavePlan) -> WavePlan:
        dev = self.device
        return WavePlan([], torch.empty(batch, dtype=torch.long, device=dev),
                        torch.empty(batch, dtype=torch.long, device=dev), plan.steady_len.clone(),
                        plan.counts.clone(), plan.base.clone(), plan.retrieve.clone(), plan.estimate.clone(),
                        plan.shape)

    def load_static_plan(self, static: WavePlan, plan: WavePlan) -> None:
        B = plan.slots.shape[0]
        static.slots.fill_(self.pools.scratch)
        static.slots[:B].copy_(plan.slots)
        static.write_pos.zero_()
        static.write_pos[:B].copy_(plan.write_pos)
        for name in ("steady_len", "counts", "base", "retrieve", "estimate"):
            getattr(static, name).copy_(getattr(plan, name))

    def reset_metrics(self) -> None:
        self.counters.zero_()
        self.steps = 0

    def stats(self):
        p = self.pools
        bpt = self.bytes_per_token
        out = {"capacity_bytes": p.tokens.capacity * bpt,
               "used_bytes": (p.tokens.capacity - p.tokens.free_total) * bpt,
               "sequences": len(self.seqs), "wave_clusters": sum(st.clusters for st in self.seqs.values()),
               "kv_footprint_bytes": {s: st.tokens * bpt for s, st in self.seqs.items()}}
        if self.offload:
            row = 2 * self.cfg.head_dim * self.dtype.itemsize          # K and V of one head
            retrieved, hits, rows, src_rows = self.counters.tolist()
            total = src_rows * row
            out.update(retrieved_clusters=retrieved, cache_hits=hits, gathered_rows=rows, pcie_rows=src_rows,
                       pcie_bytes_total=total, pcie_bytes_per_step=total / max(1, self.steps),
                       host_pool_bytes=p.tokens.capacity * bpt,
                       host_pinned_bytes=self.host_pinned_bytes,
                       cache_bytes=sum(c.k.numel() * 2 * c.k.element_size() for c in self.caches.values()),
                       cache_fraction=self.cache_fraction,
                       cache_hit_ratio=hits / retrieved if retrieved else None,
                       cache_row_hit_ratio=1 - src_rows / rows if rows else None)
        return out
