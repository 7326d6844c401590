"""Storage of the wave index for every sequence of a backend, one set of tensors per layer:

- steady zone: [slots + 1, Hkv, steady_cap, D] per slot (slot 0 is scratch for the padded rows
  of a CUDA graph);
- the cluster-sorted KV: one token pool [Hkv, tokens, D]; a sequence owns a contiguous range.
  On the GPU (GPU-resident index), or in pinned host memory (the wave buffer's CPU pool, read by
  the zero-copy gather);
- the meta-index: one cluster pool (centroids and value means [Hkv, clusters, D], log sizes,
  absolute row offsets [Hkv, clusters + 1]); a sequence owns a contiguous range of clusters plus
  one (its last cluster's end offset).

The ranges are the same in every layer, so one allocator serves all of them. Batched kernels read
the pools through per-slot bases: nothing is padded to the longest sequence."""
from __future__ import annotations

import bisect

import torch

from ..config import ModelConfig
from ..side_stream import SideStream
from .host_memory import pinned_tensors


class RangeAllocator:
    """First-fit allocator of contiguous ranges in [0, capacity), coalescing on free."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.free_ranges: list[tuple[int, int]] = [(0, capacity)] if capacity > 0 else []   # sorted
        self.taken: dict[int, int] = {}

    @property
    def free_total(self) -> int:
        return sum(n for _, n in self.free_ranges)

    def alloc(self, n: int) -> int | None:
        for i, (start, size) in enumerate(self.free_ranges):
            if size >= n:
                if size == n:
                    del self.free_ranges[i]
                else:
                    self.free_ranges[i] = (start + n, size - n)
                self.taken[start] = n
                return start
        return None

    def release(self, start: int) -> None:
        n = self.taken.pop(start)
        i = bisect.bisect_left(self.free_ranges, (start, 0))
        self.free_ranges.insert(i, (start, n))
        # merge with the right, then the left neighbour
        if i + 1 < len(self.free_ranges) and start + n == self.free_ranges[i + 1][0]:
            self.free_ranges[i] = (start, n + self.free_ranges.pop(i + 1)[1])
        if i > 0 and self.free_ranges[i - 1][0] + self.free_ranges[i - 1][1] == start:
            s0, n0 = self.free_ranges.pop(i - 1)
            self.free_ranges[i - 1] = (s0, n0 + self.free_ranges[i - 1][1])


class WavePools:
    def __init__(self, cfg: ModelConfig, layer_ids: range, device: torch.device, dtype: torch.dtype,
                 max_seqs: int, steady_cap: int, tokens: int, clusters: int, host_tokens: bool = False):
        H, D = cfg.num_kv_heads, cfg.head_dim
        self.slots, self.scratch = max_seqs + 1, 0
        self.tokens, self.clusters = RangeAllocator(tokens), RangeAllocator(clusters)

        def per_layer(shape, dt=dtype, fill=None):
            return {li: (torch.zeros(shape, device=device, dtype=dt) if fill is None
                         else torch.full(shape, fill, device=device, dtype=dt)) for li in layer_ids}

        self.k_steady = per_layer((self.slots, H, steady_cap, D))
        self.v_steady = per_layer((self.slots, H, steady_cap, D))
        if host_tokens:   # the wave buffer's CPU pool: pinned, on the GPU's NUMA node
            pin = device.type == "cuda"
            n = 2 * len(layer_ids)
            pool = pinned_tensors(n, (H, tokens, D), dtype, device) if pin else \
                [torch.empty((H, tokens, D), dtype=dtype) for _ in range(n)]
            self.keys = dict(zip(layer_ids, pool[0::2]))
            self.values = dict(zip(layer_ids, pool[1::2]))
        else:
            self.keys = per_layer((H, tokens, D))
            self.values = per_layer((H, tokens, D))
        # offload copies to the pinned host pool (none on CPU or with the KV on the GPU)
        self.copy = SideStream(device if host_tokens else torch.device("cpu"))
        self.centroids = per_layer((H, clusters, D))
        self.value_mean = per_layer((H, clusters, D))
        self.log_size = per_layer((H, clusters), torch.float32, float("-inf"))
        self.offsets = per_layer((H, clusters + 1), torch.int32)

    @staticmethod
    def bytes_needed(cfg: ModelConfig, layers: int, dtype: torch.dtype, max_seqs: int, steady_cap: int,
                     tokens: int, clusters: int) -> int:
        # a steady row and a pool token hold K and V; a cluster its centroid and value mean
        kv = cfg.kv_bytes_per_token(dtype, layers=1)
        per_layer = ((max_seqs + 1) * steady_cap + tokens + clusters) * kv \
            + cfg.num_kv_heads * clusters * 8                   # log size (fp32) and offset (int32)
        return layers * per_layer

    def ready(self) -> None:
        """Decode reads the host pool only after every offload copy has landed."""
        self.copy.join()

    def write_steady(self, layer: int, slot: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [Hkv, n, D]."""
        n = k.shape[1]
        self.k_steady[layer][slot, :, start:start + n] = k
        self.v_steady[layer][slot, :, start:start + n] = v

    def shift_steady(self, layer: int, slot: int, lo: int, hi: int) -> None:
        """Drop rows [lo, hi) of a slot's steady zone, moving the rows after them down."""
        for t in (self.k_steady[layer], self.v_steady[layer]):
            t[slot, :, lo:lo + t.shape[2] - hi] = t[slot, :, hi:].clone()

    def write_index(self, layer: int, tok0: int, cl0: int, ix) -> None:
        """Store a ClusterIndex at token row tok0 and cluster cl0 of the pools."""
        N, C = ix.num_tokens, ix.num_clusters
        if self.copy.stream is not None:
            # Offload while the next layer computes; the side stream keeps ix alive until done.
            with self.copy.fork():
                for h in range(ix.keys.shape[0]):
                    self.keys[layer][h, tok0:tok0 + N].copy_(ix.keys[h], non_blocking=True)
                    self.values[layer][h, tok0:tok0 + N].copy_(ix.values[h], non_blocking=True)
            ix.keys.record_stream(self.copy.stream)
            ix.values.record_stream(self.copy.stream)
        else:
            self.keys[layer][:, tok0:tok0 + N] = ix.keys
            self.values[layer][:, tok0:tok0 + N] = ix.values
        self.centroids[layer][:, cl0:cl0 + C] = ix.centroids
        self.value_mean[layer][:, cl0:cl0 + C] = ix.value_mean
        self.log_size[layer][:, cl0:cl0 + C] = ix.log_size
        self.offsets[layer][:, cl0:cl0 + C + 1] = ix.offsets + tok0
