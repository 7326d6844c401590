"""The wave index of one sequence in one layer: keys clustered by segmented spherical k-means,
the KV in cluster-contiguous order, and the meta-index (centroids, value means, sizes)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import WaveConfig
from ..kernels import cdiv
from ..kernels.cluster_layout import cluster_order, cluster_reorder
from ..kernels.kmeans import kmeans_assign, spherical_kmeans


@dataclass
class ClusterIndex:
    keys: torch.Tensor        # [Hkv, N, D] cluster-contiguous (per head its own order)
    values: torch.Tensor      # [Hkv, N, D]
    offsets: torch.Tensor     # [Hkv, C+1] int32: cluster c of head h = rows offsets[h,c]:offsets[h,c+1]
    centroids: torch.Tensor   # [Hkv, C, D] plain mean of the cluster's keys
    value_mean: torch.Tensor  # [Hkv, C, D] value_sum / size
    log_size: torch.Tensor    # [Hkv, C] float32 estimation log weight: log(size) + estimation_log_bias, -inf if empty
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


def segment_layout(n: int, segment: int) -> tuple[int, int]:
    """Segments of about `segment` rows covering n rows: (count, rows per segment)."""
    nseg = max(1, cdiv(n, segment))
    return nseg, cdiv(n, nseg)


def segmented_kmeans(x: torch.Tensor, segment: int, per_cluster: int, iters: int,
                     clusters: int | None = None, n: int | None = None) -> torch.Tensor:
    """x: [H, *, D] centred keys, the first n rows (default all) valid. Segments of about
    `segment` rows are clustered independently (spherical k-means, max inner product against unit
    centroids). An x already holding ``segment_layout``'s padded length (zeros past n) is used in
    place. Returns the unit centroids [H, C, D] of all segments together. Each segment stops once
    its assignment repeats (a fixed point): the result is that of all `iters`."""
    H, D = x.shape[0], x.shape[2]
    N = x.shape[1] if n is None else n
    nseg, seg_len = segment_layout(N, segment)
    K = clusters or max(1, cdiv(seg_len, per_cluster))
    if x.shape[1] != nseg * seg_len or not x.is_contiguous():
        x = torch.nn.functional.pad(x[:, :N], (0, 0, 0, nseg * seg_len - N)).contiguous()
    xs = x.view(H * nseg, seg_len, D)
    # rows of each segment (the last one may be short), built on the device: setting one element
    # from a Python int would copy it from host memory and synchronise the stream
    starts = torch.arange(nseg, device=x.device, dtype=torch.int32) * seg_len
    n_valid = (N - starts).clamp(max=seg_len).repeat(H)
    # Initial centroids: evenly spaced rows of each segment's valid part.
    pick = (torch.arange(K, device=x.device)[None, :] * n_valid[:, None].long()) // K
    c = _normalise(xs[torch.arange(H * nseg, device=x.device)[:, None], pick].float()).to(x.dtype)
    c, _ = spherical_kmeans(xs, c, n_valid, iters)
    return c.reshape(H, nseg * K, D)


def build_index(k: torch.Tensor, v: torch.Tensor, wave: WaveConfig, clusters: int | None = None,
                segment: int | None = None) -> ClusterIndex:
    """k, v: [T, Hkv, D] keys (after RoPE) and values of the tokens to index."""
    kh = k.transpose(0, 1)                                     # [H, T, D] view
    H, T, D = kh.shape
    seg = segment or wave.segment_size
    nseg, seg_len = segment_layout(T, seg)
    # Keys centred in the KV dtype (bf16 dots use the tensor cores, fp32 ones would not), written
    # straight into the segments' padded layout.
    mean = kh.mean(dim=1, dtype=torch.float32).to(k.dtype)     # [H, D]
    centred = torch.empty(H, nseg * seg_len, D, device=k.device, dtype=k.dtype)
    torch.sub(kh, mean[:, None], out=centred[:, :T])
    centred[:, T:].zero_()
    unit = segmented_kmeans(centred, seg, wave.tokens_per_cluster, wave.kmeans_iters, clusters, n=T)
    C = unit.shape[1]
    # Global pass: every key to its best centroid of all segments.
    assign = kmeans_assign(centred[:, :T], unit)                # [H, T]
    # Cluster-contiguous order (one stable sort for all heads); then one pass over the KV copies
    # each cluster's rows together and takes its mean key (the centroid kept) and mean value.
    order, offsets = cluster_order(assign, C)                   # [H * T], [H, C + 1]
    lay = cluster_reorder(k, v, order, offsets)
    sizes = offsets.diff(dim=1)
    return ClusterIndex(
        keys=lay.keys, values=lay.values, offsets=offsets, centroids=lay.key_means,  # empty clusters: 0, never weighed
        value_mean=lay.value_means,
        log_size=torch.where(sizes > 0, sizes.float().log() + wave.estimation_log_bias, float("-inf")),
        max_cluster=int(sizes.max()))
