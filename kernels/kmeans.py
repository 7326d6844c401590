"""Batched segment k-means steps (spherical k-means of the wave index build).

``S`` independent problems (segments x kv heads), each ``N`` points and ``K`` centroids in ``D``:

    kmeans_assign:  idx[s, n] = argmax_k x[s, n] . centroids[s, k]     (first k on ties;
                                 -1 for n >= n_valid[s])
    kmeans_update:  sums[s, k] = sum_{n: idx[s, n] = k} x[s, n]   (fp32),   counts[s, k] = |{n}|
                                 (idx < 0 or >= K is skipped)
    kmeans_centroids: the next unit centroids, sums[s, k] / |sums[s, k]| where counts[s, k] > 0,
                                 else the previous centroid (an empty cluster keeps its place)

Normalising the centroids makes the assignment by inner product the spherical k-means assignment.

Triton: ``assign`` runs one program per (s, BLOCK_N points), sweeping K in tiles with a running
max/argmax; ``update`` adds each point into its cluster's row with fp32 atomics (one read of x);
``centroids`` normalises BLOCK_K rows per program (one launch instead of a chain of torch ops).
"""

from __future__ import annotations

import torch

from ._triton_util import (FLOAT_DTYPES, cdiv, check_last_contiguous, dot_precision, lazy_jit,
                           next_pow2, tl, use_triton)


TUNE = {"block_n": 256, "block_k": 64, "num_stages": 3}   # assign tiles, H100 sweep (bench_kernels --only kmeans)


@lazy_jit
def _kmeans_assign_kernel(
    x_ptr, c_ptr, nv_ptr, idx_ptr,
    stride_xs, stride_xn, stride_cs, stride_ck,
    N, K, D,
    HAS_NV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    nmask = offs_n < N
    dmask = offs_d < D
    x = tl.load(x_ptr + s * stride_xs + offs_n[:, None].to(tl.int64) * stride_xn + offs_d[None, :],
                mask=nmask[:, None] & dmask[None, :], other=0.0)
    best = tl.full([BLOCK_N], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_N], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        kmask = kk < K
        c = tl.load(c_ptr + s * stride_cs + kk[:, None] * stride_ck + offs_d[None, :],
                    mask=kmask[:, None] & dmask[None, :], other=0.0)
        sc = tl.dot(x, tl.trans(c), input_precision=PRECISION)
        sc = tl.where(kmask[None, :], sc, float("-inf"))
        # max and the first column reaching it, in one reduction
        tile_max, tile_arg = tl.max(sc, axis=1, return_indices=True, return_indices_tie_break_left=True)
        tile_arg = tile_arg + k0
        upd = tile_max > best
        best = tl.where(upd, tile_max, best)
        best_idx = tl.where(upd, tile_arg, best_idx)
    out = best_idx.to(tl.int64)
    if HAS_NV:
        nv = tl.load(nv_ptr + s)
        out = tl.where(offs_n < nv, out, -1)
    tl.store(idx_ptr + s * N + offs_n, out, mask=nmask)


@lazy_jit
def _kmeans_update_kernel(
    x_ptr, idx_ptr, sums_ptr, cnt_ptr,
    stride_xs, stride_xn, stride_is,
    N, K, D,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    nmask = offs_n < N
    dmask = offs_d < D
    idx = tl.load(idx_ptr + s * stride_is + offs_n, mask=nmask, other=-1).to(tl.int64)
    ok = nmask & (idx >= 0) & (idx < K)
    m2 = ok[:, None] & dmask[None, :]
    x = tl.load(x_ptr + s * stride_xs + offs_n[:, None].to(tl.int64) * stride_xn + offs_d[None, :],
                mask=m2, other=0.0).to(tl.float32)
    row = s * K + tl.where(ok, idx, 0)
    tl.atomic_add(sums_ptr + row[:, None] * D + offs_d[None, :], x, mask=m2, sem="relaxed")
    tl.atomic_add(cnt_ptr + row, tl.full([BLOCK_N], 1, tl.int32), mask=ok, sem="relaxed")


@lazy_jit
def _kmeans_centroids_kernel(
    sums_ptr, cnt_ptr, prev_ptr, out_ptr, ROWS, D,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    kmask = offs_k < ROWS
    m = kmask[:, None] & (offs_d < D)[None, :]
    at = offs_k.to(tl.int64)[:, None] * D + offs_d[None, :]
    sums = tl.load(sums_ptr + at, mask=m, other=0.0)
    norm = tl.maximum(tl.sqrt(tl.sum(sums * sums, axis=1)), 1e-6)
    new = sums / norm[:, None]
    keep = tl.load(cnt_ptr + offs_k, mask=kmask, other=0) == 0
    prev = tl.load(prev_ptr + at, mask=m & keep[:, None], other=0.0).to(tl.float32)
    tl.store(out_ptr + at, tl.where(keep[:, None], prev, new).to(out_ptr.dtype.element_ty), mask=m)


def kmeans_centroids_ref(sums: torch.Tensor, counts: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """Plain-torch ``kmeans_centroids``."""
    unit = sums / sums.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    return torch.where(counts[..., None] > 0, unit, prev.float()).to(prev.dtype)


def kmeans_centroids(sums: torch.Tensor, counts: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """Next unit centroids: sums [S, K, D] fp32, counts [S, K] int32, prev [S, K, D] (the current
    centroids, whose dtype the result takes). Rows of an empty cluster keep ``prev``."""
    assert sums.dtype == torch.float32 and sums.shape == prev.shape and counts.shape == sums.shape[:2]
    if not use_triton(sums, counts, prev):
        return kmeans_centroids_ref(sums, counts, prev)
    sums, counts, prev = sums.contiguous(), counts.contiguous(), prev.contiguous()
    out = torch.empty_like(prev)
    rows, D = sums.shape[0] * sums.shape[1], sums.shape[2]
    if rows == 0:
        return out
    BLOCK_K = 16
    _kmeans_centroids_kernel[(cdiv(rows, BLOCK_K),)](sums, counts, prev, out, rows, D, BLOCK_K=BLOCK_K,
                                                     BLOCK_D=max(16, next_pow2(D)), num_warps=4)
    return out


def _check_assign(x, centroids, n_valid):
    assert x.dim() == 3 and centroids.dim() == 3, "x [S, N, D], centroids [S, K, D]"
    S, N, D = x.shape
    assert centroids.shape[0] == S and centroids.shape[2] == D, (x.shape, centroids.shape)
    assert x.dtype in FLOAT_DTYPES and centroids.dtype in FLOAT_DTYPES
    assert x.device == centroids.device
    if n_valid is not None:
        assert n_valid.shape == (S,) and n_valid.dtype == torch.int32 and n_valid.device == x.device
    return S, N, D, centroids.shape[1]


def kmeans_assign_ref(x: torch.Tensor, centroids: torch.Tensor,
                      n_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-torch assignment (fp32 scores, chunked over S to bound memory)."""
    S, N, D, K = _check_assign(x, centroids, n_valid)
    idx = torch.empty(S, N, device=x.device, dtype=torch.int64)
    step = max(1, (1 << 26) // max(1, N * K))
    for s0 in range(0, S, step):
        sc = torch.bmm(x[s0:s0 + step].float(), centroids[s0:s0 + step].float().transpose(1, 2))
        idx[s0:s0 + step] = sc.argmax(dim=-1)
    if n_valid is not None:
        idx.masked_fill_(torch.arange(N, device=x.device)[None, :] >= n_valid[:, None].long(), -1)
    return idx


def kmeans_assign(x: torch.Tensor, centroids: torch.Tensor,
                  n_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Max-inner-product assignment: x [S, N, D], centroids [S, K, D] (last dims contiguous;
    mixed dtypes are promoted), n_valid optional [S] int32.
    Returns idx [S, N] int64 (first k on exact ties; -1 for rows n >= n_valid[s])."""
    if not use_triton(x, centroids):
        return kmeans_assign_ref(x, centroids, n_valid)
    S, N, D, K = _check_assign(x, centroids, n_valid)
    assert K >= 1
    check_last_contiguous("x", x)
    check_last_contiguous("centroids", centroids)
    if x.dtype != centroids.dtype:
        dt = torch.promote_types(x.dtype, centroids.dtype)
        x, centroids = x.to(dt), centroids.to(dt)
    idx = torch.empty(S, N, device=x.device, dtype=torch.int64)
    if S * N == 0:
        return idx
    bn, bk = TUNE["block_n"], TUNE["block_k"]
    BLOCK_N = bn if N >= bn else max(16, next_pow2(N))
    BLOCK_K = bk if K >= bk else max(16, next_pow2(K))
    _kmeans_assign_kernel[(S, cdiv(N, BLOCK_N))](
        x, centroids, n_valid if n_valid is not None else idx, idx,
        x.stride(0), x.stride(1), centroids.stride(0), centroids.stride(1),
        N, K, D,
        HAS_NV=n_valid is not None, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        BLOCK_D=max(16, next_pow2(D)), PRECISION=dot_precision(x.dtype),
        num_warps=8 if BLOCK_N * BLOCK_K >= 8192 else 4, num_stages=TUNE["num_stages"],
    )
    return idx


def _check_update(x, idx, K):
    assert x.dim() == 3 and idx.shape == x.shape[:2], (x.shape, idx.shape)
    assert x.dtype in FLOAT_DTYPES and idx.dtype in (torch.int64, torch.int32)
    assert x.device == idx.device and K >= 1
    return x.shape


def kmeans_update_ref(x: torch.Tensor, idx: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch cluster sums/counts via index_add_ (invalid idx skipped)."""
    S, N, D = _check_update(x, idx, K)
    ok = (idx >= 0) & (idx < K)
    flat = (torch.arange(S, device=x.device)[:, None] * K + idx.long().clamp(0, K - 1))[ok]
    sums = torch.zeros(S * K, D, device=x.device, dtype=torch.float32)
    sums.index_add_(0, flat, x[ok].float())
    counts = torch.zeros(S * K, device=x.device, dtype=torch.int32)
    counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    return sums.view(S, K, D), counts.view(S, K)


def kmeans_update(x: torch.Tensor, idx: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sums and sizes: x [S, N, D] (last dim contiguous), idx [S, N] int64/int32
    (entries < 0 or >= K are skipped). Returns sums [S, K, D] float32, counts [S, K] int32.
    Float atomics make the summation order (hence the last bits) nondeterministic."""
    if not use_triton(x, idx):
        return kmeans_update_ref(x, idx, K)
    S, N, D = _check_update(x, idx, K)
    check_last_contiguous("x", x)
    assert idx.stride(1) == 1, "idx: last dim must be contiguous"
    sums = torch.zeros(S, K, D, device=x.device, dtype=torch.float32)
    counts = torch.zeros(S, K, device=x.device, dtype=torch.int32)
    if S * N == 0:
        return sums, counts
    BLOCK_N = 32
    _kmeans_update_kernel[(S, cdiv(N, BLOCK_N))](
        x, idx, sums, counts,
        x.stride(0), x.stride(1), idx.stride(0),
        N, K, D,
        BLOCK_N=BLOCK_N, BLOCK_D=max(16, next_pow2(D)), num_warps=4,
    )
    return sums, counts


__all__ = ["kmeans_assign", "kmeans_assign_ref", "kmeans_centroids", "kmeans_centroids_ref", "kmeans_update",
           "kmeans_update_ref"]
