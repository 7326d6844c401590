"""Batched segment k-means steps (spherical k-means of the wave index build).

``S`` independent problems (segments x kv heads), each ``N`` points and ``K`` centroids in ``D``:

    kmeans_assign:  idx[s, n] = argmax_k x[s, n] . centroids[s, k]     (first k on ties;
                                 -1 for n >= n_valid[s])
    kmeans_update:  sums[s, k] = sum_{n: idx[s, n] = k} x[s, n]   (fp32),   counts[s, k] = |{n}|
                                 (idx < 0 or >= K is skipped)
    kmeans_centroids: the next unit centroids, sums[s, k] / |sums[s, k]| where counts[s, k] > 0,
                                 else the previous centroid (an empty cluster keeps its place)
    spherical_kmeans: the three, step after step, each problem until its assignment repeats
                                 (no host sync)

Normalising the centroids makes the assignment by inner product the spherical k-means assignment.

Triton: ``assign`` runs one program per (s, BLOCK_N points), sweeping K in tiles with a running
max per (point, tile column), reduced to the argmax once at the end; ``update`` adds each point
into its cluster's row with fp32 atomics (one read of x); ``centroids`` normalises BLOCK_K rows
per program (one launch instead of a chain of torch ops).
"""

from __future__ import annotations

import torch

from ._triton_util import (FLOAT_DTYPES, cdiv, check_last_contiguous, dot_precision, lazy_jit,
                           next_pow2, tl, use_triton)


# assign tiles and update rows per program, the fastest of a sweep with bench_kernels --only kmeans
TUNE = {"block_n": 256, "block_k": 32, "num_warps": 8, "num_stages": 3, "update_rows": 32, "update_warps": 4}


@lazy_jit
def _kmeans_assign_kernel(
    x_ptr, c_ptr, nv_ptr, idx_ptr, chg_ptr, gate, count_at,
    stride_xs, stride_xn, stride_cs, stride_ck,
    N, K, D,
    GATED: tl.constexpr, HAS_NV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    nmask = offs_n < N
    dmask = offs_d < D
    k_end = K
    if GATED:    # a problem past its fixed point: no tiles, no loads, no stores (see spherical_kmeans)
        k_end = tl.where(tl.load(chg_ptr + gate + s) != 0, K, 0)
        nmask = nmask & (tl.load(chg_ptr + gate + s + 0 * offs_n) != 0)   # (a vector: the interpreter's & wants one)
    # Whole tiles load unmasked (EVEN_N / EVEN_K): masked loads slow the inner loop.
    xmask = dmask[None, :] if EVEN_N and not GATED else nmask[:, None] & dmask[None, :]
    x = tl.load(x_ptr + s * stride_xs + offs_n[:, None].to(tl.int64) * stride_xn + offs_d[None, :],
                mask=xmask, other=0.0)
    # The running maximum is kept per (row, column of the tile) and reduced across columns once at
    # the end: a max-with-index reduction per tile would put a cross-thread reduction in the loop.
    best = tl.full([BLOCK_N, BLOCK_K], float("-inf"), tl.float32)
    best_k0 = tl.zeros([BLOCK_N, BLOCK_K], tl.int32)
    for k0 in range(0, k_end, BLOCK_K):
        kk = k0 + offs_k
        cmask = dmask[None, :] if EVEN_K else (kk < K)[:, None] & dmask[None, :]
        c = tl.load(c_ptr + s * stride_cs + kk[:, None] * stride_ck + offs_d[None, :], mask=cmask, other=0.0)
        sc = tl.dot(x, tl.trans(c), input_precision=PRECISION)
        if not EVEN_K:
            sc = tl.where((kk < K)[None, :], sc, float("-inf"))
        upd = sc > best                     # strict: a column keeps the first tile reaching its max
        best = tl.where(upd, sc, best)
        best_k0 = tl.where(upd, k0, best_k0)
    top = tl.max(best, axis=1)
    # the first k reaching the row's max
    out = tl.min(tl.where(best == top[:, None], best_k0 + offs_k[None, :], 2147483647), axis=1).to(tl.int64)
    if HAS_NV:
        nv = tl.load(nv_ptr + s)
        out = tl.where(offs_n < nv, out, -1)
    if GATED:    # count the points whose cluster changed (idx holds the previous step's)
        prev = tl.load(idx_ptr + s * N + offs_n, mask=nmask, other=0)
        tl.atomic_add(chg_ptr + count_at + s, tl.sum((nmask & (prev != out)).to(tl.int32), axis=0), sem="relaxed")
    tl.store(idx_ptr + s * N + offs_n, out, mask=nmask)


@lazy_jit
def _kmeans_update_kernel(
    x_ptr, idx_ptr, sums_ptr, cnt_ptr, chg_ptr, gate,
    stride_xs, stride_xn, stride_is,
    N, K, D,
    GATED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    nmask = offs_n < N
    dmask = offs_d < D
    if GATED:
        nmask = nmask & (tl.load(chg_ptr + gate + s + 0 * offs_n) != 0)
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
    sums_ptr, cnt_ptr, prev_ptr, out_ptr, chg_ptr, gate, ROWS, K, D,
    GATED: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    kmask = offs_k < ROWS
    if GATED:
        kmask = kmask & (tl.load(chg_ptr + gate + offs_k // K, mask=offs_k < ROWS, other=0) != 0)
    m = kmask[:, None] & (offs_d < D)[None, :]
    at = offs_k.to(tl.int64)[:, None] * D + offs_d[None, :]
    sums = tl.load(sums_ptr + at, mask=m, other=0.0)
    norm = tl.maximum(tl.sqrt(tl.sum(sums * sums, axis=1)), 1e-6)
    new = sums / norm[:, None]
    keep = tl.load(cnt_ptr + offs_k, mask=kmask, other=0) == 0
    prev = tl.load(prev_ptr + at, mask=m & keep[:, None], other=0.0).to(tl.float32)
    tl.store(out_ptr + at, tl.where(keep[:, None], prev, new).to(out_ptr.dtype.element_ty), mask=m)
    if GATED:    # the sums are used: zero them for the next step's update
        tl.store(sums_ptr + at, tl.zeros([BLOCK_K, BLOCK_D], tl.float32), mask=m)
        tl.store(cnt_ptr + offs_k, tl.zeros([BLOCK_K], tl.int32), mask=kmask)


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
    _centroids(sums, counts, prev, out, None)
    return out


def _centroids(sums, counts, prev, out, gate):
    rows, D = sums.shape[0] * sums.shape[1], sums.shape[2]
    if rows == 0:
        return
    chg, at = gate or (counts, 0)
    BLOCK_K = 16
    _kmeans_centroids_kernel[(cdiv(rows, BLOCK_K),)](sums, counts, prev, out, chg, at * sums.shape[0], rows,
                                                     sums.shape[1], D, GATED=gate is not None, BLOCK_K=BLOCK_K,
                                                     BLOCK_D=max(16, next_pow2(D)), num_warps=4)


def _check_assign(x, centroids, n_valid):
    assert x.dim() == 3 and centroids.dim() == 3, "x [S, N, D], centroids [S, K, D]"
    S, N, D = x.shape
    assert centroids.shape[0] == S and centroids.shape[2] == D, (x.shape, centroids.shape)
    assert x.dtype in FLOAT_DTYPES and centroids.dtype in FLOAT_DTYPES
    assert x.device == centroids.device
    if n_valid is not None:
        assert n_valid.shape == (S,) and n_valid.dtype == torch.int32 and n_valid.device == x.device
    assert centroids.shape[1] >= 1, "no centroids"
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
    _check_assign(x, centroids, n_valid)
    x, centroids = _assign_operands(x, centroids)
    idx = torch.empty(x.shape[:2], device=x.device, dtype=torch.int64)
    _assign(x, centroids, n_valid, idx, None)
    return idx


def _assign_operands(x, centroids):
    check_last_contiguous("x", x)
    check_last_contiguous("centroids", centroids)
    if x.dtype != centroids.dtype:
        dt = torch.promote_types(x.dtype, centroids.dtype)
        x, centroids = x.to(dt), centroids.to(dt)
    return x, centroids


def _assign(x, centroids, n_valid, idx, gate, step=0):
    (S, N, D), K = x.shape, centroids.shape[1]
    if S * N == 0:
        return
    chg, at = gate or (idx, 0)
    bn, bk = TUNE["block_n"], TUNE["block_k"]
    BLOCK_N = bn if N >= bn else max(16, next_pow2(N))
    BLOCK_K = bk if K >= bk else max(16, next_pow2(K))
    _kmeans_assign_kernel[(S, cdiv(N, BLOCK_N))](
        x, centroids, n_valid if n_valid is not None else idx, idx, chg, at * S, step * S,
        x.stride(0), x.stride(1), centroids.stride(0), centroids.stride(1),
        N, K, D,
        GATED=gate is not None, HAS_NV=n_valid is not None, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        BLOCK_D=max(16, next_pow2(D)), EVEN_N=N % BLOCK_N == 0, EVEN_K=K % BLOCK_K == 0,
        PRECISION=dot_precision(x.dtype),
        num_warps=TUNE["num_warps"] if BLOCK_N * BLOCK_K >= 4096 else 4, num_stages=TUNE["num_stages"],
    )


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
    _check_update(x, idx, K)
    check_last_contiguous("x", x)
    assert idx.stride(1) == 1, "idx: last dim must be contiguous"
    S, N, D = x.shape
    sums = torch.zeros(S, K, D, device=x.device, dtype=torch.float32)
    counts = torch.zeros(S, K, device=x.device, dtype=torch.int32)
    _update(x, idx, sums, counts, None)
    return sums, counts


def _update(x, idx, sums, counts, gate):
    (S, N, D), K = x.shape, sums.shape[1]
    if S * N == 0:
        return
    chg, at = gate or (idx, 0)
    BLOCK_N = TUNE["update_rows"]
    _kmeans_update_kernel[(S, cdiv(N, BLOCK_N))](
        x, idx, sums, counts, chg, at * S,
        x.stride(0), x.stride(1), idx.stride(0),
        N, K, D,
        GATED=gate is not None, BLOCK_N=BLOCK_N, BLOCK_D=max(16, next_pow2(D)), num_warps=TUNE["update_warps"],
    )


def spherical_kmeans_ref(x: torch.Tensor, centroids: torch.Tensor, n_valid: torch.Tensor | None,
                         iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch ``spherical_kmeans``: every problem steps until all are at their fixed point (a
    problem past its own changes nothing more, so this equals stopping each one there)."""
    S = x.shape[0]
    changes = torch.zeros(iters, S, dtype=torch.int32, device=x.device)
    prev = None
    for i in range(iters):
        idx = kmeans_assign_ref(x, centroids, n_valid)
        changes[i] = (idx != prev).sum(dim=1) if prev is not None else idx.shape[1]
        if prev is not None and not changes[i].any():
            break
        centroids = kmeans_centroids_ref(*kmeans_update_ref(x, idx, centroids.shape[1]), centroids)
        prev = idx
    return centroids, changes


def spherical_kmeans(x: torch.Tensor, centroids: torch.Tensor, n_valid: torch.Tensor | None,
                     iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``iters`` steps of assign / update / centroids from the unit ``centroids`` [S, K, D]
    (x, n_valid as kmeans_assign). Each problem stops once its assignment repeats: its remaining
    steps would give the same centroids again. Returns (centroids, changes [iters, S] int32: the
    points of each problem whose cluster changed at each step; the first step counts all of them,
    and a problem's row reads 0 from its fixed point on).

    The loop runs without a host synchronisation: each program reads its problem's change count
    and does nothing past the fixed point, so the launches queue up ahead of the GPU and a problem
    that settles early costs nothing more."""
    _check_assign(x, centroids, n_valid)
    if not use_triton(x, centroids):
        return spherical_kmeans_ref(x, centroids, n_valid, iters)
    x, centroids = _assign_operands(x, centroids)
    S, N, D = x.shape
    K = centroids.shape[1]
    c = centroids.clone()
    idx = torch.full((S, N), -2, device=x.device, dtype=torch.int64)    # no cluster: step 0 counts all
    # row iters is a sentinel that never reads 0: the gate of the steps that cannot be past it
    chg = torch.zeros(iters + 1, S, device=x.device, dtype=torch.int32)
    chg[iters].fill_(1)
    sums = torch.zeros(S, K, D, device=x.device, dtype=torch.float32)
    counts = torch.zeros(S, K, device=x.device, dtype=torch.int32)
    for i in range(iters):
        # step i of a problem computes nothing once its step i - 1 (i - 1 >= 1) changed nothing,
        # and does not move its centroids when step i itself changed nothing
        _assign(x, c, n_valid, idx, (chg, i - 1 if i >= 2 else iters), step=i)
        _update(x, idx, sums, counts, (chg, i if i >= 1 else iters))
        _centroids(sums, counts, c, c, (chg, i if i >= 1 else iters))
    return c, chg[:iters]


__all__ = ["kmeans_assign", "kmeans_assign_ref", "kmeans_centroids", "kmeans_centroids_ref", "kmeans_update",
           "kmeans_update_ref", "spherical_kmeans", "spherical_kmeans_ref"]
