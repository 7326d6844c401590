"""Wave attention: each decode step, each layer, each KV head attends in three zones —
steady (sink + local window + decoded tokens not yet indexed, exact), retrieval (the top clusters
by centroid score, exact over their gathered KV) and estimation (the next clusters, each one
weighted entry: key = centroid, value = value mean, weight = size) — merged by log-sum-exp.
Here the indexed KV stays on the GPU; the wave buffer moves it to host memory."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable

import torch

from ..config import WaveConfig
from ..wave.index import ClusterIndex, build_index
from .base import AttentionBackend, KVCapacityError


@dataclass
class SeqState:
    slot: int
    tokens: int                       # reserved tokens
    steady: int = 0                   # valid rows of this sequence's steady zone
    index: dict = field(default_factory=dict)   # layer -> ClusterIndex
    max_cluster: int = 0              # over all layers: sizes the gather buffer


@dataclass
class WavePlan:
    seq_ids: list
    slots: torch.Tensor               # [B] int64
    write_pos: torch.Tensor           # [B] int64: steady row of this step's token
    steady_len: torch.Tensor          # [S, Hkv] int32 over all slots (0 for idle slots)
    indexed: list                     # (batch row, SeqState, retrieval r, estimation e)
    exec_k: torch.Tensor | None = None
    exec_v: torch.Tensor | None = None
    log_w: torch.Tensor | None = None
    updates: list = field(default_factory=list)   # SeqStates whose steady zone overflows this step


class WaveAttention(AttentionBackend):
    def __init__(self, cfg, layer_ids, device, dtype, kv_budget_bytes: int, wave: WaveConfig,
                 max_seqs: int = 16):
        super().__init__(cfg, layer_ids, device, dtype)
        self.wave = wave
        self.steady_cap = wave.sink + wave.window + wave.update_every
        shape = (max_seqs, cfg.num_kv_heads, self.steady_cap, cfg.head_dim)
        self.k_steady = {li: torch.zeros(shape, device=self.device, dtype=dtype) for li in layer_ids}
        self.v_steady = {li: torch.zeros(shape, device=self.device, dtype=dtype) for li in layer_ids}
        self.free_slots = list(range(max_seqs - 1, -1, -1))
        self.seqs: dict[Hashable, SeqState] = {}
        # The meta-index costs a key and a value mean per cluster on top of the KV itself.
        self.token_bytes = int(self.bytes_per_token * (1 + 1 / wave.tokens_per_cluster))
        self.capacity = kv_budget_bytes - 2 * max_seqs * self.steady_cap * self.bytes_per_token // 2
        self.used = 0

    # -- lifecycle -------------------------------------------------------------------------------
    def reserve(self, seq_id, num_tokens):
        need = num_tokens * self.token_bytes
        if need > self.capacity:
            raise KVCapacityError(f"needs {need / 2**30:.2f} GiB of KV, capacity {self.capacity / 2**30:.2f} GiB",
                                  ever=False)
        if need > self.capacity - self.used or not self.free_slots:
            raise KVCapacityError(f"needs {need / 2**30:.2f} GiB of KV, "
                                  f"{(self.capacity - self.used) / 2**30:.2f} GiB free", ever=True)
        self.used += need
        self.seqs[seq_id] = SeqState(slot=self.free_slots.pop(), tokens=num_tokens)

    def free(self, seq_id):
        st = self.seqs.pop(seq_id, None)
        if st is not None:
            self.used -= st.tokens * self.token_bytes
            self.free_slots.append(st.slot)

    def write_prefill(self, layer, seq_id, k, v, start):
        assert start == 0, "wave attention indexes whole prompts"
        st, w = self.seqs[seq_id], self.wave
        T = k.shape[0]
        if T - w.sink - w.window >= w.update_every:
            ix = build_index(k[w.sink:T - w.window], v[w.sink:T - w.window], w)
            st.index[layer] = ix
            st.max_cluster = max(st.max_cluster, ix.max_cluster)
            k_s, v_s = torch.cat([k[:w.sink], k[T - w.window:]]), torch.cat([v[:w.sink], v[T - w.window:]])
        else:   # too short to index: dense until decoding makes it long enough
            k_s, v_s = k, v
        n = k_s.shape[0]
        self.k_steady[layer][st.slot, :, :n] = k_s.transpose(0, 1)
        self.v_steady[layer][st.slot, :, :n] = v_s.transpose(0, 1)
        st.steady = n

    # -- decode ------------------------------------------------------------------------------------
    def plan_decode(self, seq_ids):
        states = [self.seqs[s] for s in seq_ids]
        dev, H, D = self.device, self.cfg.num_kv_heads, self.cfg.head_dim
        steady_len = torch.zeros(len(self.free_slots) + len(self.seqs), H, dtype=torch.int32)
        indexed, cap = [], 0
        for row, st in enumerate(states):
            steady_len[st.slot] = st.steady + 1
            ix = next(iter(st.index.values()), None)
            if ix is not None:
                r, e = self.wave.zone_sizes(ix.num_clusters)
                indexed.append((row, st, r, e))
                cap = max(cap, e + min(ix.num_tokens, r * st.max_cluster))
        plan = WavePlan(
            seq_ids=list(seq_ids),
            slots=torch.tensor([st.slot for st in states], device=dev),
            write_pos=torch.tensor([st.steady for st in states], device=dev),
            steady_len=steady_len.to(dev), indexed=indexed,
            updates=[st for st in states if st.steady + 1 == self.steady_cap])
        if indexed:
            shape = (len(indexed), H, cap, D)
            plan.exec_k = torch.empty(shape, device=dev, dtype=self.dtype)
            plan.exec_v = torch.empty(shape, device=dev, dtype=self.dtype)
            plan.log_w = torch.zeros(shape[:3], device=dev, dtype=torch.float32)
        for st in states:
            st.steady += 1
        return plan

    def decode(self, layer, plan: WavePlan, q, k, v):
        from ..kernels.weighted_decode import merge_states, weighted_decode

        B, Hq, D = q.shape
        H = self.cfg.num_kv_heads
        q4 = q.view(B, H, Hq // H, D)
        ks, vs = self.k_steady[layer], self.v_steady[layer]
        ks[plan.slots, :, plan.write_pos] = k
        vs[plan.slots, :, plan.write_pos] = v
        q_slots = q4.new_zeros((ks.shape[0],) + q4.shape[1:])
        q_slots[plan.slots] = q4
        out, lse = weighted_decode(q_slots, ks, vs, plan.steady_len, None, self.scale)
        out, lse = out[plan.slots], lse[plan.slots]
        if plan.indexed:
            rows = torch.tensor([row for row, *_ in plan.indexed], device=self.device)
            lengths = self._assemble(layer, plan, q4[rows])
            out_i, lse_i = weighted_decode(q4[rows], plan.exec_k, plan.exec_v, lengths, plan.log_w, self.scale)
            merged, merged_lse = merge_states(out[rows], lse[rows], out_i, lse_i)
            out[rows], lse[rows] = merged, merged_lse
        for st in plan.updates:
            self._index_update(layer, st)
        return out.view(B, Hq, D).to(q.dtype)

    def _assemble(self, layer, plan: WavePlan, q_idx: torch.Tensor) -> torch.Tensor:
        """Fill the execution buffer: per row, estimation entries [0, e), then the retrieved
        clusters' KV. Returns valid lengths [rows, Hkv]."""
        from ..kernels.centroid_scores import centroid_scores
        from ..kernels.gather import gather_clusters

        H, D = self.cfg.num_kv_heads, self.cfg.head_dim
        lengths = []
        for i, (_, st, r, e) in enumerate(plan.indexed):
            ix: ClusterIndex = st.index[layer]
            counts = torch.full((1,), ix.num_clusters, dtype=torch.int32, device=self.device)
            scores = centroid_scores(q_idx[i:i + 1], ix.centroids[None], counts, self.scale)[0]
            top = scores.topk(r + e, dim=-1, sorted=True).indices            # [H, r + e]
            est = top[:, r:]
            if e:
                sel = est[..., None].expand(-1, -1, D)
                plan.exec_k[i, :, :e] = ix.centroids.gather(1, sel)
                plan.exec_v[i, :, :e] = ix.value_mean.gather(1, sel)
                plan.log_w[i, :, :e] = ix.log_size.gather(1, est)
            n = gather_clusters(ix.keys, ix.values, ix.offsets, top[:, :r].contiguous(),
                                plan.exec_k[i], plan.exec_v[i], e)
            lengths.append(n + e)
        return torch.stack(lengths).to(torch.int32)

    def _index_update(self, layer, st: SeqState) -> None:
        """The oldest `update_every` decoded tokens past the sink become one new segment."""
        w = self.wave
        lo, hi = w.sink, w.sink + w.update_every
        ks, vs = self.k_steady[layer][st.slot], self.v_steady[layer][st.slot]
        new = build_index(ks[:, lo:hi].transpose(0, 1), vs[:, lo:hi].transpose(0, 1), w,
                          clusters=w.update_clusters, segment=w.update_every)
        st.index[layer] = st.index[layer].append(new) if layer in st.index else new
        st.max_cluster = max(st.max_cluster, new.max_cluster)
        keep = self.steady_cap - hi
        ks[:, lo:lo + keep] = ks[:, hi:].clone()
        vs[:, lo:lo + keep] = vs[:, hi:].clone()
        if layer == self.layer_ids[-1]:
            st.steady -= w.update_every

    def stats(self):
        clusters = sum(ix.num_clusters for st in self.seqs.values() for ix in st.index.values())
        return {"capacity_bytes": self.capacity, "used_bytes": self.used, "sequences": len(self.seqs),
                "wave_clusters": clusters}
