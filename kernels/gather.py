"""Gather retrieved clusters' keys/values into the execution buffer.

Per kv head ``h``, cluster ``c`` owns rows ``offsets[h, c] : offsets[h, c + 1]`` of the head's
cluster-sorted ``src``. For the selected ``cluster_ids[h, 0..R)`` (in that order) with sizes
``n_r`` and exclusive prefix sums ``e_r = n_0 + ... + n_{r-1}``:

    dst[h, dst_start + e_r + i] = src[h, offsets[h, id_r] + i]     for i < n_r,
                                                                   kept only where the row < Lmax
    lengths[h] = min(sum_r n_r, Lmax - dst_start)                   (rows written)

A negative cluster id selects nothing (size 0), so callers may pad ``cluster_ids`` with -1.
With a GPU cluster cache (``gather_clusters_cached``), a cluster cached in slot ``s`` reads its
first ``SLOT_ROWS`` rows from ``cache[h, s]`` instead of ``src``, and a missed cluster given a victim
slot ``w`` also writes its first ``SLOT_ROWS`` rows to ``cache[h, w]`` as it copies them: admission
rides on the gather, no second pass over the execution buffer.

Triton: one launch, grid ``(Hkv, R / CHUNK)``; each program recomputes its head's sizes and
exclusive prefix sums from ``cluster_ids`` and ``offsets`` (``tl.cumsum`` over R), then copies its
CHUNK clusters' rows in tiles of 16 (no torch ops, no host sync: CUDA-graph safe).
"""

from __future__ import annotations

import torch

from ._triton_util import (FLOAT_DTYPES, cdiv, check_last_contiguous, lazy_jit, next_pow2, num_sms, tl,
                           use_triton)


@lazy_jit
def _gather_clusters_kernel(
    sk_ptr, sv_ptr, off_ptr, cid_ptr, len_ptr, dk_ptr, dv_ptr,
    ck_ptr, cv_ptr, rslot_ptr, wslot_ptr, host_ptr, tally_ptr,
    stride_skh, stride_skn, stride_svh, stride_svn,
    stride_oh, stride_ch,
    stride_dkh, stride_dkn, stride_dvh, stride_dvn,
    stride_cah, stride_cas,
    R, C, L_MAX, D, dst_start, HEADS,
    CHUNK: tl.constexpr, BLOCK_SEL: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_CACHE: tl.constexpr, SLOT_ROWS: tl.constexpr, HAS_TALLY: tl.constexpr,
):
    h = tl.program_id(0).to(tl.int64)      # row of cluster_ids / dst / lengths
    hs = h % HEADS                         # row of src / offsets (batched: (b, h) -> h)
    chunk = tl.program_id(1)
    # Every program derives the head's layout itself: sizes of all R selected clusters and their
    # exclusive prefix sums (R is small; this saves separate torch launches and any host sync).
    offs = tl.arange(0, BLOCK_SEL)
    ids = tl.load(cid_ptr + h * stride_ch + offs, mask=offs < R, other=-1)
    valid = (ids >= 0) & (ids < C)
    ids = tl.where(valid, ids, 0)
    lo = tl.load(off_ptr + hs * stride_oh + ids, mask=valid, other=0)
    hi = tl.load(off_ptr + hs * stride_oh + ids + 1, mask=valid, other=0)
    sizes = hi - lo
    excl = tl.cumsum(sizes, axis=0) - sizes
    if chunk == 0:
        length = tl.minimum(tl.sum(sizes, axis=0), L_MAX - dst_start)
        tl.store(len_ptr + h, length)
        if HAS_TALLY:   # running totals [4] int64: clusters, -, rows gathered, rows read from src
            tl.atomic_add(tally_ptr + 2, length.to(tl.int64))
            if not HAS_CACHE:   # (with a cache, its plan counts the clusters and hits)
                tl.atomic_add(tally_ptr, tl.sum(valid.to(tl.int64), axis=0))
                tl.atomic_add(tally_ptr + 3, length.to(tl.int64))
    if HAS_CACHE:   # slots are [rows, R] int32 like the ids; -1: not cached / not admitted
        rslot = tl.load(rslot_ptr + h * stride_ch + offs, mask=offs < R, other=-1)
        wslot = tl.load(wslot_ptr + h * stride_ch + offs, mask=offs < R, other=-1)
        if chunk == 0:   # rows this gather reads from the source pool (over PCIe when it is host memory)
            host = tl.sum(tl.where(rslot >= 0, tl.maximum(sizes - SLOT_ROWS, 0), sizes), axis=0)
            tl.store(host_ptr + h, host)
            if HAS_TALLY:
                tl.atomic_add(tally_ptr + 3, host.to(tl.int64))

    offs_r = tl.arange(0, BLOCK_ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    for j in range(CHUNK):
        sel = offs == chunk * CHUNK + j
        n = tl.sum(tl.where(sel, sizes, 0), axis=0)
        src0 = tl.sum(tl.where(sel, lo, 0), axis=0)
        dst0 = dst_start + tl.sum(tl.where(sel, excl, 0), axis=0)
        if HAS_CACHE:
            rs = tl.sum(tl.where(sel, rslot, 0), axis=0).to(tl.int64)
            ws = tl.sum(tl.where(sel, wslot, 0), axis=0).to(tl.int64)
        for i in range(0, n, BLOCK_ROWS):
            rows = i + offs_r
            m = ((rows < n) & (dst0 + rows < L_MAX))[:, None] & dmask[None, :]
            src_rows = (src0 + rows).to(tl.int64)[:, None]
            dst_rows = (dst0 + rows).to(tl.int64)[:, None]
            src_k = sk_ptr + hs * stride_skh + src_rows * stride_skn + offs_d[None, :]
            src_v = sv_ptr + hs * stride_svh + src_rows * stride_svn + offs_d[None, :]
            if HAS_CACHE:   # SLOT_ROWS is a multiple of BLOCK_ROWS: a tile is all cache or all source
                cache_rows = hs * stride_cah + rows.to(tl.int64)[:, None] * D + offs_d[None, :]
                if (rs >= 0) & (i < SLOT_ROWS):
                    src_k = ck_ptr + rs * stride_cas + cache_rows
                    src_v = cv_ptr + rs * stride_cas + cache_rows
            k = tl.load(src_k, mask=m)
            v = tl.load(src_v, mask=m)
            tl.store(dk_ptr + h * stride_dkh + dst_rows * stride_dkn + offs_d[None, :], k, mask=m)
            tl.store(dv_ptr + h * stride_dvh + dst_rows * stride_dvn + offs_d[None, :], v, mask=m)
            if HAS_CACHE:
                if (ws >= 0) & (i < SLOT_ROWS):
                    tl.store(ck_ptr + ws * stride_cas + cache_rows, k, mask=m)
                    tl.store(cv_ptr + ws * stride_cas + cache_rows, v, mask=m)


@lazy_jit
def _cluster_rows_kernel(
    off_ptr, cid_ptr, len_ptr, out_ptr,
    stride_oh, stride_ch, stride_outh,
    R, C, L_MAX, HEADS,
    CHUNK: tl.constexpr, BLOCK_SEL: tl.constexpr, BLOCK_ROWS: tl.constexpr,
):
    """Row numbers only: a program's CHUNK clusters are written side by side, a [CHUNK, BLOCK_ROWS]
    tile per step (the data gather walks its clusters one by one: it is bound by the copy)."""
    h = tl.program_id(0).to(tl.int64)
    hs = h % HEADS
    first = tl.program_id(1) * CHUNK
    offs = tl.arange(0, BLOCK_SEL)
    ids = tl.load(cid_ptr + h * stride_ch + offs, mask=offs < R, other=-1)
    valid = (ids >= 0) & (ids < C)
    ids = tl.where(valid, ids, 0)
    sizes = tl.load(off_ptr + hs * stride_oh + ids + 1, mask=valid, other=0) - \
        tl.load(off_ptr + hs * stride_oh + ids, mask=valid, other=0)
    if first == 0:
        tl.store(len_ptr + h, tl.minimum(tl.sum(sizes, axis=0), L_MAX))
    before = tl.sum(tl.where(offs < first, sizes, 0), axis=0)
    oc = first + tl.arange(0, CHUNK)
    cid = tl.load(cid_ptr + h * stride_ch + oc, mask=oc < R, other=-1)
    ok = (cid >= 0) & (cid < C)
    cid = tl.where(ok, cid, 0)
    lo = tl.load(off_ptr + hs * stride_oh + cid, mask=ok, other=0)
    n = tl.load(off_ptr + hs * stride_oh + cid + 1, mask=ok, other=0) - lo
    dst0 = before + tl.cumsum(n, axis=0) - n
    offs_r = tl.arange(0, BLOCK_ROWS)
    for i in range(0, tl.max(n, axis=0), BLOCK_ROWS):
        rows = i + offs_r
        dst = dst0[:, None] + rows[None, :]
        tl.store(out_ptr + h * stride_outh + dst, lo[:, None] + rows[None, :],
                 mask=(rows[None, :] < n[:, None]) & (dst < L_MAX))


def _plan(offsets, cluster_ids):
    """Sizes of the selected clusters [Hkv, R] (0 for ids outside [0, C)) and their exclusive
    prefix sums [Hkv, R] int32."""
    C = offsets.shape[1] - 1
    ok = (cluster_ids >= 0) & (cluster_ids < C)
    cid = torch.where(ok, cluster_ids, torch.zeros_like(cluster_ids)).long()
    sizes = (offsets.gather(1, cid + 1) - offsets.gather(1, cid)) * ok
    ends = torch.cumsum(sizes, dim=1, dtype=torch.int32)
    return sizes, ends - sizes.to(torch.int32)


def _check(src_k, src_v, offsets, cluster_ids, dst_k, dst_v, dst_start):
    assert src_k.dim() == 3 and src_v.shape == src_k.shape, "src_k/src_v [Hkv, N, D]"
    Hkv, N, D = src_k.shape
    assert dst_k.dim() == 3 and dst_v.shape == dst_k.shape and dst_k.shape[0] == Hkv and dst_k.shape[2] == D
    assert offsets.dim() == 2 and offsets.shape[0] == Hkv and offsets.dtype == torch.int32
    assert cluster_ids.dim() == 2 and cluster_ids.shape[0] == Hkv and cluster_ids.dtype == torch.int64
    assert src_k.dtype in FLOAT_DTYPES and src_v.dtype == src_k.dtype
    assert dst_k.dtype == src_k.dtype and dst_v.dtype == src_k.dtype
    assert 0 <= dst_start <= dst_k.shape[1], f"dst_start {dst_start} outside [0, Lmax={dst_k.shape[1]}]"
    devs = {t.device for t in (src_k, src_v, offsets, cluster_ids, dst_k, dst_v)}
    assert len(devs) == 1, f"tensors on several devices: {devs}"
    return Hkv, D, dst_k.shape[1]


def _source_rows(offsets, cluster_ids):
    """Per head, the source rows of the selected clusters in selection order: a list of Hkv
    int64 tensors (the torch references' plan of what the kernel copies)."""
    sizes, excl = _plan(offsets, cluster_ids)
    src0 = offsets.gather(1, cluster_ids.long().clamp(0, max(offsets.shape[1] - 2, 0))).long()
    out = []
    for h in range(offsets.shape[0]):
        n = int(sizes[h].sum())
        rows = torch.repeat_interleave(src0[h] - excl[h].long(), sizes[h].long(), output_size=n)
        out.append(rows + torch.arange(n, device=rows.device))
    return out


def gather_clusters_ref(src_k, src_v, offsets, cluster_ids, dst_k, dst_v, dst_start: int) -> torch.Tensor:
    """Plain-torch gather (loop over heads); the CPU path and the test oracle."""
    Hkv, D, Lmax = _check(src_k, src_v, offsets, cluster_ids, dst_k, dst_v, dst_start)
    lengths = torch.empty(Hkv, dtype=torch.int32, device=dst_k.device)
    for h, rows in enumerate(_source_rows(offsets, cluster_ids)):
        rows = rows[:Lmax - dst_start]
        w = rows.shape[0]
        dst_k[h, dst_start:dst_start + w] = src_k[h, rows]
        dst_v[h, dst_start:dst_start + w] = src_v[h, rows]
        lengths[h] = w
    return lengths


def gather_clusters(src_k: torch.Tensor, src_v: torch.Tensor, offsets: torch.Tensor,
                    cluster_ids: torch.Tensor, dst_k: torch.Tensor, dst_v: torch.Tensor,
                    dst_start: int) -> torch.Tensor:
    """Copy the selected clusters' rows contiguously into ``dst`` from row ``dst_start``.

    src_k, src_v: [Hkv, N, D]; offsets: [Hkv, C+1] int32; cluster_ids: [Hkv, R] int64 (-1 =
    nothing); dst_k, dst_v: [Hkv, Lmax, D] (views allowed; last dims contiguous everywhere).
    Rows past Lmax are dropped. Returns lengths [Hkv] int32, rows written per head (no host sync
    on CUDA).
    """
    if not use_triton(src_k, src_v, dst_k, dst_v):
        return gather_clusters_ref(src_k, src_v, offsets, cluster_ids, dst_k, dst_v, dst_start)
    Hkv, D, Lmax = _check(src_k, src_v, offsets, cluster_ids, dst_k, dst_v, dst_start)
    for name, t in (("src_k", src_k), ("src_v", src_v), ("dst_k", dst_k), ("dst_v", dst_v),
                    ("offsets", offsets), ("cluster_ids", cluster_ids)):
        check_last_contiguous(name, t)
    return _launch(src_k, src_v, offsets, cluster_ids, dst_k, dst_v, dst_start, Hkv)


def _launch(src_k, src_v, offsets, ids, dst_k, dst_v, dst_start: int, heads: int, cache=None, tally=None):
    """One launch over `rows` = ids.shape[0] destination rows; row x reads source head x % heads.
    ids [rows, R]; dst [rows, Lmax, D]; cache: (cache_k, cache_v, read_slot, write_slot) or None;
    tally: [4] int64 running totals or None (see `gather_clusters_cached`).
    Returns lengths [rows] int32 (and, with a cache, the rows read from the source [rows] int32)."""
    rows, R = ids.shape
    Lmax, D = dst_k.shape[1], dst_k.shape[2]
    if rows * R == 0:
        lengths = torch.zeros(rows, dtype=torch.int32, device=dst_k.device)
        return lengths if cache is None else (lengths, lengths.clone())
    # every row's first program writes its length (and host rows): no memset
    lengths = torch.empty(rows, dtype=torch.int32, device=dst_k.device)
    host = torch.empty(rows, dtype=torch.int32, device=dst_k.device) if cache is not None else lengths
    ck, cv, rslot, wslot = cache if cache is not None else (dst_k, dst_v, ids, ids)
    # clusters per program: about 4 waves of programs over the GPU
    chunk = min(16, next_pow2(max(1, rows * R // (4 * num_sms(dst_k.device)))))
    _gather_clusters_kernel[(rows, cdiv(R, chunk))](
        src_k, src_v, offsets, ids, lengths, dst_k, dst_v, ck, cv, rslot, wslot, host,
        tally if tally is not None else lengths,
        src_k.stride(0), src_k.stride(1), src_v.stride(0), src_v.stride(1),
        offsets.stride(0), ids.stride(0),
        dst_k.stride(0), dst_k.stride(1), dst_v.stride(0), dst_v.stride(1),
        ck.stride(0) if cache is not None else 0, ck.stride(1) if cache is not None else 0,
        R, offsets.shape[1] - 1, Lmax, D, int(dst_start), heads,
        CHUNK=chunk, BLOCK_SEL=next_pow2(max(R, 2)), BLOCK_ROWS=16, BLOCK_D=max(16, next_pow2(D)),
        HAS_CACHE=cache is not None, SLOT_ROWS=ck.shape[2] if cache is not None else 0,
        HAS_TALLY=tally is not None,
        num_warps=4,
    )
    return lengths if cache is None else (lengths, host)


def _zero_copy(src_k, src_v, dst_k) -> bool:
    """A host pool gathered onto the GPU: the kernel reads it over PCIe, so it must be pinned."""
    if dst_k.is_cuda and not src_k.is_cuda:
        assert src_k.is_pinned() and src_v.is_pinned(), "a host pool must be pinned for zero-copy reads"
        return True
    return False


def gather_clusters_batched(src_k: torch.Tensor, src_v: torch.Tensor, offsets: torch.Tensor,
                            cluster_ids: torch.Tensor, dst_k: torch.Tensor, dst_v: torch.Tensor,
                            dst_start: int, tally: torch.Tensor | None = None) -> torch.Tensor:
    """`gather_clusters` for B batch rows sharing one source pool in one launch.

    src_k, src_v: [Hkv, N, D] (a pool holding every row's clusters); offsets: [Hkv, C+1] int32
    (absolute rows in the pool); cluster_ids: [B, Hkv, R] int64 (absolute cluster ids, -1 =
    nothing); dst_k, dst_v: [B, Hkv, Lmax, D] contiguous. Returns lengths [B, Hkv] int32.
    The pool may be pinned host memory while dst is on the GPU: the kernel then reads it over
    PCIe itself (zero-copy through unified addressing), only the selected rows. ``tally`` ([4]
    int64): adds the clusters, 0, and the rows gathered (twice: every one came from the source).
    """
    B, Hkv, R = cluster_ids.shape
    D, Lmax = src_k.shape[2], dst_k.shape[2]
    assert dst_k.shape == (B, Hkv, Lmax, D) and dst_k.is_contiguous() and dst_v.is_contiguous()
    zero_copy = _zero_copy(src_k, src_v, dst_k)
    if not zero_copy and not use_triton(src_k, src_v, dst_k, dst_v):
        lengths = torch.stack([gather_clusters_ref(src_k, src_v, offsets, cluster_ids[b], dst_k[b], dst_v[b],
                                                   dst_start) for b in range(B)]) if B else \
            torch.zeros(0, Hkv, dtype=torch.int32, device=dst_k.device)
        if tally is not None:
            n = lengths.sum()
            tally += torch.stack([((cluster_ids >= 0) & (cluster_ids < offsets.shape[1] - 1)).sum(), 0 * n, n, n])
        return lengths
    if not zero_copy:
        _check(src_k, src_v, offsets, cluster_ids[0], dst_k[0], dst_v[0], dst_start)
    rows = B * Hkv
    lengths = _launch(src_k, src_v, offsets, cluster_ids.reshape(rows, R).contiguous(),
                      dst_k.view(rows, Lmax, D), dst_v.view(rows, Lmax, D), dst_start, Hkv, tally=tally)
    return lengths.view(B, Hkv)


def cluster_rows_ref(offsets: torch.Tensor, cluster_ids: torch.Tensor, rows_out: torch.Tensor) -> torch.Tensor:
    """Plain-torch ``cluster_rows`` (the CPU path and the test oracle)."""
    B, Hkv, _ = cluster_ids.shape
    lengths = torch.zeros(B, Hkv, dtype=torch.int32, device=rows_out.device)
    for b in range(B):
        for h, rows in enumerate(_source_rows(offsets, cluster_ids[b].long())):
            rows = rows[:rows_out.shape[2]]
            rows_out[b, h, :rows.shape[0]] = rows.to(torch.int32)
            lengths[b, h] = rows.shape[0]
    return lengths


def cluster_rows(offsets: torch.Tensor, cluster_ids: torch.Tensor, rows_out: torch.Tensor) -> torch.Tensor:
    """The pool rows of the selected clusters, in selection order: what ``gather_clusters_batched``
    would copy, as row numbers (4 bytes a row instead of 2 x D values) for attention that reads
    a GPU-resident pool in place.

    offsets: [Hkv, C+1] int32; cluster_ids: [B, Hkv, R] int (-1 = nothing); rows_out: [B, Hkv,
    Lmax] int32 contiguous, filled in the first ``lengths[b, h]`` entries (rows past Lmax dropped).
    Returns lengths [B, Hkv] int32.
    """
    B, Hkv, R = cluster_ids.shape
    assert offsets.dim() == 2 and offsets.shape[0] == Hkv and offsets.dtype == torch.int32
    assert rows_out.shape[:2] == (B, Hkv) and rows_out.dtype == torch.int32 and rows_out.is_contiguous()
    if not use_triton(offsets, cluster_ids, rows_out):
        return cluster_rows_ref(offsets, cluster_ids, rows_out)
    rows, Lmax = B * Hkv, rows_out.shape[2]
    if rows * R == 0:
        return torch.zeros(B, Hkv, dtype=torch.int32, device=rows_out.device)
    lengths = torch.empty(rows, dtype=torch.int32, device=rows_out.device)   # each row's first program
    offsets, ids = offsets.contiguous(), cluster_ids.reshape(rows, R).contiguous()
    chunk = min(32, next_pow2(max(2, rows * R // (4 * num_sms(rows_out.device)))))
    _cluster_rows_kernel[(rows, cdiv(R, chunk))](
        offsets, ids, lengths, rows_out, offsets.stride(0), ids.stride(0), rows_out.stride(1),
        R, offsets.shape[1] - 1, Lmax, Hkv,
        CHUNK=chunk, BLOCK_SEL=next_pow2(max(R, 2)), BLOCK_ROWS=16, num_warps=4,
    )
    return lengths.view(B, Hkv)


def gather_clusters_cached_ref(src_k, src_v, offsets, cluster_ids, cache_k, cache_v, read_slot, write_slot,
                               dst_k, dst_v, dst_start: int):
    """Plain-torch `gather_clusters_cached` (the CPU path and the test oracle)."""
    B, Hkv, R = cluster_ids.shape
    slot_rows = cache_k.shape[2]
    lengths = torch.zeros(B, Hkv, dtype=torch.int32, device=dst_k.device)
    host = torch.zeros_like(lengths)
    C = offsets.shape[1] - 1
    for b in range(B):
        for h in range(Hkv):
            row = dst_start
            for r in range(R):
                c = int(cluster_ids[b, h, r])
                if not 0 <= c < C:
                    continue
                lo, n = int(offsets[h, c]), int(offsets[h, c + 1] - offsets[h, c])
                rs, ws = int(read_slot[b, h, r]), int(write_slot[b, h, r])
                k, v = src_k[h, lo:lo + n].to(dst_k.device), src_v[h, lo:lo + n].to(dst_k.device)
                if rs >= 0:
                    m = min(n, slot_rows)
                    k, v = torch.cat([cache_k[h, rs, :m], k[m:]]), torch.cat([cache_v[h, rs, :m], v[m:]])
                    host[b, h] += n - m
                else:
                    host[b, h] += n
                w = max(0, min(n, dst_k.shape[2] - row))
                dst_k[b, h, row:row + w], dst_v[b, h, row:row + w] = k[:w], v[:w]
                if ws >= 0:
                    m = min(w, slot_rows)
                    cache_k[h, ws, :m], cache_v[h, ws, :m] = k[:m], v[:m]
                row += n
            lengths[b, h] = min(row, dst_k.shape[2]) - dst_start
    return lengths, host


def gather_clusters_cached(src_k: torch.Tensor, src_v: torch.Tensor, offsets: torch.Tensor,
                           cluster_ids: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                           read_slot: torch.Tensor, write_slot: torch.Tensor,
                           dst_k: torch.Tensor, dst_v: torch.Tensor, dst_start: int,
                           tally: torch.Tensor | None = None):
    """`gather_clusters_batched` through a GPU cluster cache.

    cache_k, cache_v: [Hkv, slots, SLOT_ROWS, D] contiguous (SLOT_ROWS a multiple of 16);
    read_slot, write_slot: [B, Hkv, R] int32 — the slot holding a cluster's first SLOT_ROWS rows
    (read them from there), the slot to admit a missed cluster into (write them there), or -1.
    A write slot must not be read in the same call, and dst must hold every selected row (an
    admitted cluster is copied whole). Returns (lengths, rows read from src) [B, Hkv] int32;
    ``tally`` ([4] int64, optional) gets their totals added to entries 2 and 3.
    """
    B, Hkv, R = cluster_ids.shape
    D, Lmax = src_k.shape[2], dst_k.shape[2]
    assert dst_k.shape == (B, Hkv, Lmax, D) and dst_k.is_contiguous() and dst_v.is_contiguous()
    assert cache_k.shape[0] == Hkv and cache_k.shape[3] == D and cache_k.shape[2] % 16 == 0
    assert cache_k.is_contiguous() and cache_v.is_contiguous() and cache_v.shape == cache_k.shape
    assert read_slot.shape == write_slot.shape == cluster_ids.shape
    if not _zero_copy(src_k, src_v, dst_k) and not use_triton(src_k, src_v, dst_k, dst_v, cache_k, cache_v):
        lengths, host = gather_clusters_cached_ref(src_k, src_v, offsets, cluster_ids, cache_k, cache_v,
                                                   read_slot, write_slot, dst_k, dst_v, dst_start)
        if tally is not None:
            tally[2:] += torch.stack([lengths.sum(), host.sum()])
        return lengths, host
    rows = B * Hkv
    flat = (lambda t: t.reshape(rows, R).contiguous())
    lengths, host = _launch(src_k, src_v, offsets, flat(cluster_ids), dst_k.view(rows, Lmax, D),
                            dst_v.view(rows, Lmax, D), dst_start, Hkv,
                            cache=(cache_k, cache_v, flat(read_slot.int()), flat(write_slot.int())), tally=tally)
    return lengths.view(B, Hkv), host.view(B, Hkv)


__all__ = ["cluster_rows", "cluster_rows_ref", "gather_clusters", "gather_clusters_batched", "gather_clusters_cached",
           "gather_clusters_cached_ref", "gather_clusters_ref"]
