"""Quest (Tang et al. 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM
Inference", arXiv 2406.10774): page top-k attention over full attention's paged KV.

Pages of `page_size` tokens (Quest's 16) keep, per KV head, the elementwise min and max of their
keys. At a decode step each query head scores every page of its sequence by the upper bound

    u_p = sum_d max(q_d * min_pd, q_d * max_pd)  >=  q . k  for every key k of page p,

chooses the top pages by it (the last, partly filled page always, and the first one, which holds
wave's sink tokens, unless `sink_page` is off), and attends exactly, softmax over the chosen
pages' tokens only. Prefill is dense (the model's), as for wave.

GQA: as Quest (written for MHA models), every query head chooses its own pages from its KV head's
bounds; the heads of one group may read different pages, so a KV head is read for up to G times the
budget (the cost of Quest's choice, not its accuracy). Wave chooses per KV head (scores summed over
the group); per query head, both attend `budget` tokens exactly.

Budget (`QuestConfig.budget_tokens`): by default, at every step, the tokens wave attends exactly at
that step (config.wave_exact_tokens: sink + window + decoded tokens not yet indexed, plus
ceil(retrieval_frac * C) clusters of 16 tokens); ceil(budget / page_size) pages, the forced ones
counted in. Wave's estimation zone has no counterpart here (nothing is estimated).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import QuestConfig, WaveConfig
from ..kernels import cdiv, next_pow2, use_triton
from ..kernels.paged_decode import paged_decode
from .full import FullAttention, PagedPlan


@dataclass
class QuestPlan:
    """A full-attention plan plus, per row, the pages to attend (`keep` [batch] int32, padded rows
    1) and the width of the top-k (`top`, a power of two: with the page table's width, the CUDA
    graph's key)."""
    paged: PagedPlan
    keep: torch.Tensor
    top: int
    _copy: QuestPlan | None = field(default=None, init=False, repr=False)

    @property
    def seq_ids(self) -> list:
        return self.paged.seq_ids

    def to(self, device: torch.device) -> QuestPlan:
        if self.keep.device == device:
            return self
        if self._copy is None:
            self._copy = QuestPlan(self.paged.to(device), self.keep.to(device, non_blocking=True), self.top)
        return self._copy


def page_bounds(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """q [B, Hq, D]; kmin, kmax [B, W, Hkv, D] (each row's pages in order) -> fp32 [B, Hq, W],
    sum_d max(q_d kmin_d, q_d kmax_d): q_d > 0 takes the max, q_d < 0 the min."""
    B, Hq, D = q.shape
    Hkv = kmin.shape[2]
    qf = q.float().view(B, Hkv, Hq // Hkv, D)
    bound = (torch.einsum("bhgd,bwhd->bhgw", qf.clamp(min=0), kmax.float())
             + torch.einsum("bhgd,bwhd->bhgw", qf.clamp(max=0), kmin.float()))
    return bound.reshape(B, Hq, -1)


def select_pages(q, kmin, kmax, block_table, lengths, keep, top: int, page: int, sink_page: bool,
                 scratch: int):
    """The pages each query head attends, from the pools' page bounds (no host synchronisation).

    q [B, Hq, D]; kmin, kmax [P, Hkv, D] (the layer's per-page key min / max); block_table [B, W]
    int32 and lengths [B] int32 (this step's token included) as in full attention's plan; keep [B]
    int32 pages to attend per row (<= its pages). Returns (table [B, Hq, top] int32 page ids in
    ascending order, the row's last page at position keep - 1, scratch past it; tokens [B] int32 =
    (keep - 1) * page + the tokens of the last page)."""
    B, W = block_table.shape
    bt = block_table.long()
    bound = page_bounds(q, kmin[bt], kmax[bt])                         # [B, Hq, W]
    j = torch.arange(W, device=q.device)
    pages = (lengths.long() + page - 1) // page
    last = (pages - 1)[:, None, None]
    bound = bound.masked_fill(j >= pages[:, None, None], float("-inf"))
    if sink_page:   # below the last page: with keep 1 the last page wins
        bound = bound.masked_fill(j == 0, torch.finfo(torch.float32).max)
    bound = bound.masked_fill(j == last, float("inf"))
    idx = bound.topk(top, dim=-1).indices                               # best first
    rank = torch.arange(top, device=q.device)
    idx = torch.where(rank < keep.long()[:, None, None], idx, W).sort(dim=-1).values
    ext = torch.cat([bt, torch.full((B, 1), scratch, dtype=torch.long, device=q.device)], 1)
    table = ext.gather(1, idx.view(B, -1)).view(idx.shape).to(torch.int32)
    tokens = (keep.long() - 1) * page + lengths.long() - (pages - 1) * page
    return table, tokens.to(torch.int32)


def sparse_paged_decode(q, k_pages, v_pages, table, tokens, scale: float) -> torch.Tensor:
    """Attention of q [B, Hq, D] over per-query-head page lists: table [B, Hq, N] int32 (pages of
    KV head h // G), the first tokens[b] tokens of that list. On CUDA: the paged decode kernel, one
    launch per KV head (each query head one row of it); else plain torch, vectorised."""
    B, Hq, D = q.shape
    _, page, Hkv, _ = k_pages.shape
    G, N = Hq // Hkv, table.shape[2]
    if use_triton(q, k_pages, v_pages):
        out = q.new_empty(B, Hq, D)
        lens = tokens.repeat_interleave(G)
        for h in range(Hkv):
            heads = slice(h * G, (h + 1) * G)
            o = paged_decode(q[:, heads].reshape(B * G, 1, D), k_pages[:, :, h:h + 1], v_pages[:, :, h:h + 1],
                             table[:, heads].reshape(B * G, N), lens, scale)
            out[:, heads] = o.view(B, G, D)
        return out
    kv_head = (torch.arange(Hq, device=q.device) // G)[None, :, None]
    rows = table.long()
    k = k_pages.transpose(1, 2)[rows, kv_head].reshape(B, Hq, N * page, D)   # [B, Hq, N * page, D]
    v = v_pages.transpose(1, 2)[rows, kv_head].reshape(B, Hq, N * page, D)
    s = torch.einsum("bhd,bhtd->bht", q.float(), k.float()) * scale
    valid = torch.arange(N * page, device=q.device) < tokens.long()[:, None, None]
    p = torch.softmax(s.masked_fill(~valid, float("-inf")), dim=-1)
    # rows past `tokens` (the last page's unwritten tail, the scratch page) hold whatever the pool
    # held: a zero weight times a NaN there is NaN, so they are zeroed, not only weighted 0
    v = v.float().masked_fill(~valid[..., None], 0.0)
    return torch.einsum("bht,bhtd->bhd", p, v).to(q.dtype)


class QuestAttention(FullAttention):
    def __init__(self, cfg, layer_ids, device, dtype, kv_budget_bytes: int, quest: QuestConfig,
                 wave: WaveConfig):
        self.page_size, self.quest, self.wave = quest.page_size, quest, wave
        super().__init__(cfg, layer_ids, device, dtype, kv_budget_bytes)
        shape = (self.pages.num_pages + 1, cfg.num_kv_heads, cfg.head_dim)
        self.kmin = {li: torch.empty(shape, device=self.device, dtype=dtype) for li in layer_ids}
        self.kmax = {li: torch.empty(shape, device=self.device, dtype=dtype) for li in layer_ids}
        self.prompt_len: dict = {}     # a sequence's prompt (the default budget follows wave's zones)

    @property
    def page_bytes(self) -> int:
        """A page's K and V plus its key min and max (one token's K and V): 1 + 1/page of the KV."""
        return self.bytes_per_token * (self.page_size + 1)

    def reserve(self, seq_id, num_tokens):
        super().reserve(seq_id, num_tokens)
        self.prompt_len.pop(seq_id, None)

    def free(self, seq_id):
        super().free(seq_id)
        self.prompt_len.pop(seq_id, None)

    def write_prefill(self, layer, seq_id, k, v, start):
        super().write_prefill(layer, seq_id, k, v, start)
        page, end = self.page_size, start + k.shape[0]
        first = start // page
        ids = np.arange(first, cdiv(end, page))
        pages = torch.from_numpy(self.tables[seq_id][ids]).to(self.device, non_blocking=True).long()
        kp = self.k[layer][pages]                                          # [n, page, Hkv, D]
        pos = torch.from_numpy(ids).to(self.device)[:, None] * page + torch.arange(page, device=self.device)
        valid = (pos < end)[:, :, None, None]                             # rows written so far
        self.kmin[layer][pages] = torch.where(valid, kp, float("inf")).amin(1)
        self.kmax[layer][pages] = torch.where(valid, kp, float("-inf")).amax(1)

    def plan_decode(self, seq_ids):
        """Full attention's plan, and per row ceil(budget / page) pages (at most its pages, at
        least the forced ones)."""
        page = self.page_size
        for s in seq_ids:
            self.prompt_len.setdefault(s, self.seq_len[s])
        paged = super().plan_decode(seq_ids)       # seq_len now counts this step's token
        keep = torch.ones(paged.batch, dtype=torch.int32, pin_memory=self.device.type == "cuda")
        kp = keep.numpy()
        for i, s in enumerate(seq_ids):
            n = self.seq_len[s]
            pages = cdiv(n, page)
            want = cdiv(self.quest.budget_tokens(self.wave, self.prompt_len[s], n), page)
            kp[i] = min(pages, max(want, 1 + (self.quest.sink_page and pages > 1)))
        top = min(next_pow2(int(kp.max())), paged.width)
        return QuestPlan(paged, keep, top)

    def decode(self, layer, plan: QuestPlan, q, k, v):
        plan = plan.to(q.device)
        p = plan.paged
        self.k[layer][p.write_page, p.write_off] = k
        self.v[layer][p.write_page, p.write_off] = v
        # the written page's key bounds: reset at its first row (a page may come back from a
        # freed sequence); idempotent, as a CUDA graph's warm-up needs
        fresh = (p.write_off == 0)[:, None, None]
        lo, hi = self.kmin[layer], self.kmax[layer]
        lo[p.write_page] = torch.where(fresh, k, torch.minimum(lo[p.write_page], k))
        hi[p.write_page] = torch.where(fresh, k, torch.maximum(hi[p.write_page], k))
        if layer < self.quest.dense_layers:
            return paged_decode(q, self.k[layer], self.v[layer], p.block_table, p.lengths, self.scale)
        table, tokens = select_pages(q, lo, hi, p.block_table, p.lengths, plan.keep[:p.rows], plan.top,
                                     self.page_size, self.quest.sink_page, self.scratch_page)
        return sparse_paged_decode(q, self.k[layer], self.v[layer], table, tokens, self.scale)

    # -- CUDA graphs --------------------------------------------------------------------------------
    def graph_key(self, plan: QuestPlan):
        return plan.paged.width, plan.top

    def static_plan(self, batch: int, plan: QuestPlan) -> QuestPlan:
        return QuestPlan(super().static_plan(batch, plan.paged),
                         torch.empty(batch, dtype=torch.int32, device=self.device), plan.top)

    def load_static_plan(self, static: QuestPlan, plan: QuestPlan) -> None:
        super().load_static_plan(static.paged, plan.paged)
        static.keep.copy_(plan.keep, non_blocking=True)

    def stats(self):
        return {**super().stats(), "quest_budget": self.quest.budget, "quest_page_size": self.page_size}
