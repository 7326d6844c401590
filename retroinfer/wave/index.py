"""The wave index of one sequence in one layer: keys clustered by segmented spherical k-means,
the KV in cluster-contiguous order, and the meta-index (centroids, value means, sizes)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import WaveConfig


@dataclass
class ClusterIndex:
    keys: torch.Tensor        # [Hkv, N, D] cluster-contiguous (per head its own order)
    values: torch.Tensor      # [Hkv, N, D]
    offsets: torch.Tensor     # [Hkv, C+1] int32: cluster c of head h = rows offsets[h,c]:offsets[h,c+1]
    centroids: torch.Tensor   # [Hkv, C, D] plain mean of the cluster's keys
    value_mean: torch.Tensor  # [Hkv, C, D] value_sum / size
    log_size: torch.Tensor    # [Hkv, C] float32, -inf for an empty cluster
    max_cluster: int          # largest cluster (host int, known at build; sizes the gather buffer)

    @property
    def num_clusters(self) -> int:
        return self.centroids.shape[1]

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[1]

    def append(self, other: "ClusterIndex") -> "ClusterIndex":
        """A new segment joins: its clusters follow ours, its rows follow ours."""
        return ClusterIndex(
            keys=torch.cat([self.keys, other.keys], 1), values=torch.cat([self.values, other.values], 1),
            offsets=torch.cat([self.offsets, other.offsets[:, 1:] + self.num_tokens], 1),
            centroids=torch.cat([self.centroids, other.centroids], 1),
            value_mean=torch.cat([self.value_mean, other.value_mean], 1),
            log_size=torch.cat([self.log_size, other.log_size], 1),
            max_cluster=max(self.max_cluster, other.max_cluster))


def _normalise(c: torch.Tensor) -> torch.Tensor:
    return c / c.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def segmented_kmeans(x: torch.Tensor, segment: int, per_cluster: int, iters: int,
                     clusters: int | None = None) -> torch.Tensor:
    """x: [H, N, D] centred keys. Segments of about `segment` rows are clustered
    independently (spherical k-means, max inner product against unit centroids). Returns the unit
    centroids [H, C, D] of all segments together."""
    from ..kernels.kmeans import kmeans_assign, kmeans_update

    H, N, D = x.shape
    nseg = max(1, math.ceil(N / segment))
    seg_len = math.ceil(N / nseg)
    K = clusters or max(1, math.ceil(seg_len / per_cluster))
    pad = nseg * seg_len - N
    xs = torch.nn.functional.pad(x, (0, 0, 0, pad)).view(H * nseg, seg_len, D)
    n_valid = torch.full((nseg,), seg_len, dtype=torch.int32, device=x.device)
    n_valid[-1] = seg_len - pad
    n_valid = n_valid.repeat(H)
    # Initial centroids: evenly spaced rows of each segment's valid part.
    pick = (torch.arange(K, device=x.device)[None, :] * n_valid[:, None].long()) // K
    c = _normalise(xs.gather(1, pick[..., None].expand(-1, -1, D)))
    for _ in range(iters):
        idx = kmeans_assign(xs, c, n_valid)
        sums, counts = kmeans_update(xs, idx, K)
        c = torch.where(counts[..., None] > 0, _normalise(sums), c.float()).to(x.dtype)
    return c.reshape(H, nseg * K, D)


def build_index(k: torch.Tensor, v: torch.Tensor, wave: WaveConfig, clusters: int | None = None,
                segment: int | None = None) -> ClusterIndex:
    """k, v: [T, Hkv, D] keys (after RoPE) and values of the tokens to index."""
    from ..kernels.kmeans import kmeans_assign, kmeans_update

    kh, vh = k.transpose(0, 1), v.transpose(0, 1)              # [H, T, D] views
    kf = kh.float()
    # Assignments run in the KV dtype: bf16 dots use the tensor cores, fp32 ones would not.
    centred = (kf - kf.mean(dim=1, keepdim=True)).to(k.dtype).contiguous()
    unit = segmented_kmeans(centred, segment or wave.segment_size, wave.tokens_per_cluster,
                            wave.kmeans_iters, clusters).to(k.dtype)
    H, C = unit.shape[:2]
    assign = kmeans_assign(centred, unit)                       # global pass: [H, T]
    ksum, sizes = kmeans_update(kh.contiguous(), assign, C)
    vsum, _ = kmeans_update(vh.contiguous(), assign, C)
    order = assign.argsort(dim=1, stable=True)
    rows = order[..., None].expand(-1, -1, k.shape[-1])
    denom = sizes.clamp_min(1)[..., None].float()
    mean_key = kf.mean(dim=1, keepdim=True).expand(-1, C, -1)  # empty clusters: never weigh in
    offsets = torch.zeros(H, C + 1, dtype=torch.int32, device=k.device)
    offsets[:, 1:] = sizes.cumsum(1)
    return ClusterIndex(
        keys=kh.gather(1, rows), values=vh.gather(1, rows), offsets=offsets,
        centroids=torch.where(sizes[..., None] > 0, ksum / denom, mean_key).to(k.dtype),
        value_mean=(vsum / denom).to(v.dtype),
        log_size=torch.where(sizes > 0, sizes.float().log(), float("-inf")),
        max_cluster=int(sizes.max()))
