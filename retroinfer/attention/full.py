"""Full attention over a paged KV cache (pages shared by id across this backend's layers)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable

import torch

from .base import AttentionBackend, KVCapacityError, pow2_bucket

PAGE = 64


class PageAllocator:
    """Free list of page ids; a sequence owns a list of pages for its whole life."""

    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self.free_pages = list(range(num_pages - 1, -1, -1))

    def alloc(self, n: int) -> list[int]:
        if n > len(self.free_pages):
            raise KVCapacityError(f"needs {n} KV pages, {len(self.free_pages)} free of {self.num_pages}",
                                  ever=n <= self.num_pages)
        out = self.free_pages[-n:][::-1]
        del self.free_pages[len(self.free_pages) - n:]
        return out

    def release(self, pages: list[int]) -> None:
        self.free_pages.extend(reversed(pages))


@dataclass
class PagedPlan:
    seq_ids: list
    block_table: torch.Tensor   # [B, max_pages] int32
    lengths: torch.Tensor       # [B] int32, including the token this step appends
    write_page: torch.Tensor    # [B] int64
    write_off: torch.Tensor     # [B] int64


class FullAttention(AttentionBackend):
    def __init__(self, cfg, layer_ids, device, dtype, kv_budget_bytes: int):
        super().__init__(cfg, layer_ids, device, dtype)
        num_pages = max(1, kv_budget_bytes // (self.bytes_per_token * PAGE))
        self.scratch_page = num_pages          # never allocated: padded rows of a CUDA graph
        shape = (num_pages + 1, PAGE, cfg.num_kv_heads, cfg.head_dim)
        self.k = {li: torch.empty(shape, device=self.device, dtype=dtype) for li in layer_ids}
        self.v = {li: torch.empty(shape, device=self.device, dtype=dtype) for li in layer_ids}
        self.pages = PageAllocator(num_pages)
        self.seq_pages: dict[Hashable, list[int]] = {}
        self.seq_len: dict[Hashable, int] = {}
        self.tables: dict[Hashable, torch.Tensor] = {}

    def reserve(self, seq_id, num_tokens):
        self.seq_pages[seq_id] = self.pages.alloc(-(-num_tokens // PAGE))
        self.tables[seq_id] = torch.tensor(self.seq_pages[seq_id], dtype=torch.int32, device=self.device)
        self.seq_len[seq_id] = 0

    def write_prefill(self, layer, seq_id, k, v, start):
        T = k.shape[0]
        pos = torch.arange(start, start + T, device=self.device)
        pages = self.tables[seq_id].long()[pos // PAGE]
        self.k[layer][pages, pos % PAGE] = k
        self.v[layer][pages, pos % PAGE] = v
        if layer == self.layer_ids[-1]:
            self.seq_len[seq_id] = start + T

    def plan_decode(self, seq_ids):
        lens = [self.seq_len[s] for s in seq_ids]
        max_pages = max(-(-(n + 1) // PAGE) for n in lens)
        table = torch.zeros(len(seq_ids), max_pages, dtype=torch.int32, device=self.device)
        for i, s in enumerate(seq_ids):
            t = self.tables[s][:max_pages]
            table[i, :t.numel()] = t
            self.seq_len[s] += 1
        pos = torch.tensor(lens, device=self.device)
        rows = torch.arange(len(seq_ids), device=self.device)
        return PagedPlan(seq_ids, table, (pos + 1).to(torch.int32),
                         table[rows, pos // PAGE].long(), pos % PAGE)

    def graph_key(self, plan: PagedPlan) -> int:
        return pow2_bucket(plan.block_table.shape[1])

    def static_plan(self, batch: int, plan: PagedPlan) -> PagedPlan:
        """Buffers a CUDA graph reads its plan from (see `load_static_plan`)."""
        dev, width = self.device, self.graph_key(plan)
        return PagedPlan([], torch.empty(batch, width, dtype=torch.int32, device=dev),
                         torch.empty(batch, dtype=torch.int32, device=dev),
                         torch.empty(batch, dtype=torch.long, device=dev),
                         torch.empty(batch, dtype=torch.long, device=dev))

    def load_static_plan(self, static: PagedPlan, plan: PagedPlan) -> None:
        B, w = plan.block_table.shape
        static.block_table.fill_(self.scratch_page)
        static.block_table[:B, :w].copy_(plan.block_table)
        static.lengths.fill_(1)
        static.lengths[:B].copy_(plan.lengths)
        static.write_page.fill_(self.scratch_page)
        static.write_page[:B].copy_(plan.write_page)
        static.write_off.zero_()
        static.write_off[:B].copy_(plan.write_off)

    def decode(self, layer, plan: PagedPlan, q, k, v):
        from ..kernels.paged_decode import paged_decode
        self.k[layer][plan.write_page, plan.write_off] = k
        self.v[layer][plan.write_page, plan.write_off] = v
        return paged_decode(q, self.k[layer], self.v[layer], plan.block_table, plan.lengths, self.scale)

    def free(self, seq_id):
        self.pages.release(self.seq_pages.pop(seq_id, []))
        self.tables.pop(seq_id, None)
        self.seq_len.pop(seq_id, None)

    def stats(self):
        page_bytes = self.bytes_per_token * PAGE
        used = self.pages.num_pages - len(self.pages.free_pages)
        return {"capacity_bytes": self.pages.num_pages * page_bytes, "used_bytes": used * page_bytes,
                "sequences": len(self.seq_pages)}
