"""The wave index's cluster-contiguous KV and per-cluster means, in one pass over the KV.

    cluster_order(assign, C) -> (order, offsets)          the layout, from each head's cluster ids
    cluster_reorder(k, v, order, offsets) -> ClusterLayout(keys, values, key_means, value_means)

``k``, ``v``: [T, H, D], token-major as the model writes them (any strides, last dim contiguous).
``order``: [H * T] int64, the head-major positions ``h * T + t`` sorted by (head, cluster), so that
the rows of head h's cluster c are ``order[h * T + offsets[h, c] : h * T + offsets[h, c + 1]]``;
``offsets``: [H, C + 1] int32. Returns

    keys[h, i]        = k[order[h * T + i] - h * T, h]           [H, T, D], values likewise
    key_means[h, c]   = mean of cluster c's keys (fp32 sum)     [H, C, D] in the KV dtype; 0 if empty
    value_means[h, c] = mean of its values                      [H, C, D]

Triton: one program per (cluster, head) copies the cluster's rows in tiles of ``BLOCK_R`` and sums
them on the way, so the sums need no atomics and the KV is read once (sums by fp32 atomics would
read it twice more, and a torch row gather does not stream it at HBM bandwidth).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._triton_util import FLOAT_DTYPES, lazy_jit, next_pow2, tl, use_triton

TUNE = {"block_r": 16, "num_warps": 2}


class ClusterLayout(NamedTuple):
    keys: torch.Tensor          # [H, T, D] cluster-contiguous per head
    values: torch.Tensor        # [H, T, D]
    key_means: torch.Tensor     # [H, C, D]
    value_means: torch.Tensor   # [H, C, D]


@lazy_jit
def _cluster_reorder_kernel(
    k_ptr, v_ptr, order_ptr, off_ptr, ok_ptr, ov_ptr, km_ptr, vm_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    T, C, D,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    c = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    start = tl.load(off_ptr + h * (C + 1) + c)
    end = tl.load(off_ptr + h * (C + 1) + c + 1)
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    ksum = tl.zeros([BLOCK_D], tl.float32)
    vsum = tl.zeros([BLOCK_D], tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + offs_r
        rmask = rows < end
        t = tl.load(order_ptr + h * T + rows, mask=rmask, other=0) - h * T
        m2 = rmask[:, None] & dmask[None, :]
        kr = tl.load(k_ptr + t[:, None] * stride_kt + h * stride_kh + offs_d[None, :], mask=m2, other=0.0)
        vr = tl.load(v_ptr + t[:, None] * stride_vt + h * stride_vh + offs_d[None, :], mask=m2, other=0.0)
        dst = (h * T + rows)[:, None] * D + offs_d[None, :]
        tl.store(ok_ptr + dst, kr, mask=m2)
        tl.store(ov_ptr + dst, vr, mask=m2)
        ksum += tl.sum(kr.to(tl.float32), axis=0)
        vsum += tl.sum(vr.to(tl.float32), axis=0)
    inv = 1.0 / tl.maximum(end - start, 1).to(tl.float32)
    at = (h * C + c) * D + offs_d
    tl.store(km_ptr + at, (ksum * inv).to(km_ptr.dtype.element_ty), mask=dmask)
    tl.store(vm_ptr + at, (vsum * inv).to(vm_ptr.dtype.element_ty), mask=dmask)


def cluster_order(assign: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The layout ``cluster_reorder`` takes, from each head's cluster ids ``assign`` [H, T] (in
    [0, clusters)): order [H * T] int64, the positions ``h * T + t`` stably sorted by (head,
    cluster), and offsets [H, clusters + 1] int32. One sort of int32 keys for all heads together."""
    H, T = assign.shape
    heads = torch.arange(H, device=assign.device, dtype=torch.int32)[:, None]
    sorted_keys, order = (assign.int() + heads * clusters).view(-1).sort(stable=True)
    bounds = heads * clusters + torch.arange(clusters + 1, device=assign.device, dtype=torch.int32)
    return order, torch.searchsorted(sorted_keys, bounds, out_int32=True) - heads * T


def _check(k, v, order, offsets):
    assert k.dim() == 3 and v.shape == k.shape, (k.shape, v.shape)
    assert k.dtype in FLOAT_DTYPES and v.dtype == k.dtype
    T, H, _ = k.shape
    assert order.shape == (H * T,) and order.dtype == torch.int64, (order.shape, order.dtype)
    assert offsets.dim() == 2 and offsets.shape[0] == H and offsets.dtype == torch.int32
    assert len({t.device for t in (k, v, order, offsets)}) == 1
    return T, H, k.shape[2], offsets.shape[1] - 1


def cluster_reorder_ref(k: torch.Tensor, v: torch.Tensor, order: torch.Tensor,
                        offsets: torch.Tensor) -> ClusterLayout:
    """Plain-torch ``cluster_reorder``: a row gather, then per-cluster sums by index_add_."""
    T, H, D, C = _check(k, v, order, offsets)
    t, h = order % T, order // T
    keys, values = k[t, h].view(H, T, D), v[t, h].view(H, T, D)
    rows = torch.arange(T, device=k.device).expand(H, T).contiguous()
    cid = torch.searchsorted(offsets[:, 1:].contiguous(), rows.int(), right=True)   # [H, T]; C: no cluster
    inside = (cid < C) & (rows >= offsets[:, :1])
    cluster = (torch.arange(H, device=k.device)[:, None] * C + cid)[inside]
    denom = offsets.diff(dim=1).clamp_min(1).view(H, C, 1).float()

    def means(x):
        s = torch.zeros(H * C, D, device=k.device, dtype=torch.float32)
        s.index_add_(0, cluster, x[inside].float())
        return (s.view(H, C, D) / denom).to(k.dtype)
    return ClusterLayout(keys, values, means(keys), means(values))


def cluster_reorder(k: torch.Tensor, v: torch.Tensor, order: torch.Tensor,
                    offsets: torch.Tensor) -> ClusterLayout:
    """Cluster-contiguous keys and values with each cluster's mean key and value (see the module)."""
    if not use_triton(k, v, order, offsets):
        return cluster_reorder_ref(k, v, order, offsets)
    T, H, D, C = _check(k, v, order, offsets)
    assert k.stride(2) == 1 and v.stride(2) == 1, "k, v: last dim must be contiguous"
    order, offsets = order.contiguous(), offsets.contiguous()
    out = ClusterLayout(*(torch.empty(H, n, D, device=k.device, dtype=k.dtype) for n in (T, T, C, C)))
    if H * C == 0:
        return out
    _cluster_reorder_kernel[(C, H)](
        k, v, order, offsets, *out,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        T, C, D,
        BLOCK_R=TUNE["block_r"], BLOCK_D=max(16, next_pow2(D)), num_warps=TUNE["num_warps"],
    )
    return out


__all__ = ["ClusterLayout", "cluster_order", "cluster_reorder", "cluster_reorder_ref"]
