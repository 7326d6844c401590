"""Full attention over a paged KV cache (pages shared by id across this backend's layers)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable

import numpy as np
import torch

from ..kernels import cdiv, next_pow2
from ..kernels.paged_decode import paged_decode
from .base import AttentionBackend, KVCapacityError

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


def _packed_size(batch: int, width: int) -> int:
    return 2 * batch + cdiv(batch * (width + 1), 2)


@dataclass
class PagedPlan:
    """A decode step's plan for its first `rows` of `batch` rows (a power of two: padded rows, and
    pages past a row's reservation, hold the scratch page). The four tensors view one flat int64
    buffer, `packed` = [write_page | write_off | block_table and lengths as int32], so that the
    whole plan moves in one copy. A step's plan is built in host memory (pinned on CUDA); `to`
    copies it to the device for an eager step, `load_static_plan` into a CUDA graph's buffer."""
    seq_ids: list
    packed: torch.Tensor
    batch: int
    width: int                  # pages per row: a power of two, the CUDA graph's key
    rows: int
    block_table: torch.Tensor = field(init=False)   # [rows, width] int32
    lengths: torch.Tensor = field(init=False)       # [rows] int32, including the token this step appends
    write_page: torch.Tensor = field(init=False)    # [rows] int64
    write_off: torch.Tensor = field(init=False)     # [rows] int64
    _copy: PagedPlan | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        B, W, n = self.batch, self.width, self.rows
        i32 = self.packed[2 * B:].view(torch.int32)
        self.write_page, self.write_off = self.packed[:n], self.packed[B:B + n]
        self.block_table, self.lengths = i32[:B * W].view(B, W)[:n], i32[B * W:B * W + n]

    def to(self, device: torch.device) -> PagedPlan:
        """This plan on `device` (one copy, made on the first call)."""
        if self.packed.device == device:
            return self
        if self._copy is None:
            self._copy = PagedPlan(self.seq_ids, self.packed.to(device, non_blocking=True),
                                   self.batch, self.width, self.rows)
        return self._copy


class FullAttention(AttentionBackend):
    page_size = PAGE                           # tokens per page (a subclass may set its own first)

    def __init__(self, cfg, layer_ids, device, dtype, kv_budget_bytes: int, max_rows: int | None = None):
        """`max_rows`: plans pad to a power of two but never past it (set by a backend beside this one
        in a CUDA graph: wave's slots)."""
        super().__init__(cfg, layer_ids, device, dtype)
        self.max_rows = max_rows
        num_pages = max(1, kv_budget_bytes // self.page_bytes)
        self.scratch_page = num_pages          # never allocated: padding of plans and CUDA graphs
        shape = (num_pages + 1, self.page_size, cfg.num_kv_heads, cfg.head_dim)
        self.k = {li: torch.empty(shape, device=self.device, dtype=dtype) for li in layer_ids}
        self.v = {li: torch.empty(shape, device=self.device, dtype=dtype) for li in layer_ids}
        self.pages = PageAllocator(num_pages)
        self.tables: dict[Hashable, np.ndarray] = {}   # a sequence's pages (host memory only)
        self.seq_len: dict[Hashable, int] = {}

    @property
    def page_bytes(self) -> int:
        """Device bytes of one page over this backend's layers (its share of the KV budget)."""
        return self.bytes_per_token * self.page_size

    def reserve(self, seq_id, num_tokens):
        self.tables[seq_id] = np.array(self.pages.alloc(cdiv(num_tokens, self.page_size)), dtype=np.int32)
        self.seq_len[seq_id] = 0

    def write_prefill(self, layer, seq_id, k, v, start):
        T = k.shape[0]
        first = start // self.page_size
        pages = torch.from_numpy(self.tables[seq_id][first:cdiv(start + T, self.page_size)])
        pos = torch.arange(start, start + T, device=self.device)
        # A pageable non-blocking copy is staged by the driver before it returns: no stream sync.
        slot = pages.to(self.device, non_blocking=True).long()[pos // self.page_size - first]
        self.k[layer][slot, pos % self.page_size] = k
        self.v[layer][slot, pos % self.page_size] = v
        if layer == self.layer_ids[-1]:
            self.seq_len[seq_id] = start + T

    def plan_decode(self, seq_ids):
        """Built on the host, padded to a power-of-two batch and width. The pinned buffer comes
        fresh from torch's caching host allocator, which hands a block out again only once the
        non-blocking copies recorded on it have completed: no step overwrites a plan in flight."""
        n = len(seq_ids)
        lens = np.fromiter((self.seq_len[s] for s in seq_ids), dtype=np.int64, count=n)
        batch, width = self.graph_batch(n), next_pow2(cdiv(int(lens.max()) + 1, self.page_size))
        buf = torch.empty(_packed_size(batch, width), dtype=torch.int64,
                          pin_memory=self.device.type == "cuda")
        a = buf.numpy()
        i32 = a[2 * batch:].view(np.int32)
        table, lengths = i32[:batch * width].reshape(batch, width), i32[batch * width:batch * (width + 1)]
        table.fill(self.scratch_page)
        for i, s in enumerate(seq_ids):
            t = self.tables[s][:width]
            table[i, :t.size] = t
            self.seq_len[s] += 1
        lengths.fill(1)                        # padded rows: one scratch token each
        lengths[:n] = lens + 1
        a[:batch] = self.scratch_page          # write_page
        a[:n] = table[np.arange(n), lens // self.page_size]
        a[batch:2 * batch] = 0                 # write_off
        a[batch:batch + n] = lens % self.page_size
        return PagedPlan(list(seq_ids), buf, batch, width, n)

    def graph_key(self, plan: PagedPlan) -> int:
        return plan.width

    def static_plan(self, batch: int, plan: PagedPlan) -> PagedPlan:
        """The buffer a CUDA graph reads its plan from (see `load_static_plan`)."""
        assert batch == plan.batch, (batch, plan.batch)
        buf = torch.empty(plan.packed.shape, dtype=torch.int64, device=self.device)
        return PagedPlan([], buf, batch, plan.width, batch)

    def load_static_plan(self, static: PagedPlan, plan: PagedPlan) -> None:
        """One host-to-device copy of the whole padded plan."""
        static.packed.copy_(plan.packed, non_blocking=True)

    def decode(self, layer, plan: PagedPlan, q, k, v):
        plan = plan.to(q.device)               # an eager step's host plan: copied on its first layer
        self.k[layer][plan.write_page, plan.write_off] = k
        self.v[layer][plan.write_page, plan.write_off] = v
        return paged_decode(q, self.k[layer], self.v[layer], plan.block_table, plan.lengths, self.scale)

    def free(self, seq_id):
        self.pages.release(self.tables.pop(seq_id, np.empty(0, np.int32)).tolist())
        self.seq_len.pop(seq_id, None)

    def stats(self):
        page_bytes = self.page_bytes
        used = self.pages.num_pages - len(self.pages.free_pages)
        return {"capacity_bytes": self.pages.num_pages * page_bytes, "used_bytes": used * page_bytes,
                "sequences": len(self.tables)}
