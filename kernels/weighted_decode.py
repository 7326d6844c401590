"""Wave-index attention over an execution buffer, with an optional log weight per key.

For row ``(b, h)`` with ``n = lengths[b, h]`` valid keys and query ``g`` of the GQA group:

    s_j = scale * q[b, h, g] . k[b, h, j] + log_w[b, h, j]          (j < n; log_w = 0 if None)
    lse = log(sum_j exp(s_j)),        out = sum_j exp(s_j - lse) * v[b, h, j]

so a key of weight ``w_j = exp(log_w_j)`` counts as ``w_j`` copies of itself (the estimation zone
stores one centroid per cluster with ``log_w = log(size)``). A row with no valid key gives
``out = 0, lse = -inf``; ``merge_states`` combines such states of several zones (torch), and
``split_reduce.merge_partials`` combines several zones' unmerged splits (``partial=True``) in one launch.

Triton: split-K like ``paged_decode`` (grid ``(B * Hkv, num_splits)``, each row's keys split evenly
from ``lengths`` on the device), then ``split_reduce.merge_splits``.

``estimate_decode`` is the same math over the estimation zone read in place from the cluster pool:
row ``(s, h)``'s keys, values and log weights are ``centroids[h, c]``, ``value_mean[h, c]``,
``log_size[h, c]`` for the cluster ids ``c`` its id list names, so no execution buffer is built.
"""

from __future__ import annotations

import torch

from ._online_softmax import (softmax_state, softmax_step, split_blocks, split_program, store_split,
                              tile_offsets, with_log_weight)
from ._triton_util import (FLOAT_DTYPES, LOG2E, cdiv, check_last_contiguous, dot_precision,
                           interpret_requested, lazy_jit, next_pow2, pick_splits, tl, use_triton)
from .split_reduce import merge_splits, split_states

# Launch parameters (keys per loop step, warps, pipeline depth, grid waves per SM), the fastest
# of a sweep with bench_kernels --only weighted_decode.
TUNE = {"block_n": 32, "num_warps": 4, "num_stages": 2, "waves": 4}
TUNE_ESTIMATE = dict(TUNE)  # estimate_decode's: weighted_decode's (the same loop; not swept on its own)


@lazy_jit
def _weighted_decode_split_kernel(
    q_ptr, k_ptr, v_ptr, len_ptr, w_ptr, rows_ptr, po_ptr, pl_ptr,
    sm_scale_log2,
    stride_qb, stride_qh, stride_qg,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_lb, stride_lh,
    stride_wb, stride_wh,
    stride_rb, stride_rh,
    HKV, G, L, D, NUM_SPLITS,
    HAS_W: tl.constexpr, HAS_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    pid, split, b, h = split_program(HKV)
    length = tl.minimum(tl.load(len_ptr + b * stride_lb + h * stride_lh), L)
    blk_begin, blk_end = split_blocks(length, BLOCK_N, NUM_SPLITS, split)

    offs_g, offs_d, offs_n, gmask, dmask = tile_offsets(G, D, BLOCK_G, BLOCK_D, BLOCK_N)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_g[:, None] * stride_qg + offs_d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    w_base = w_ptr + b * stride_wb + h * stride_wh
    r_base = rows_ptr + b * stride_rb + h * stride_rh

    m_i, l_i, acc = softmax_state(BLOCK_G, BLOCK_D)
    for blk in range(blk_begin, blk_end):
        idx = blk * BLOCK_N + offs_n
        nmask = idx < length
        kv_mask = nmask[:, None] & dmask[None, :]
        src = idx.to(tl.int64)
        if HAS_ROWS:    # key j is row rows[b, h, j] of the head's pool
            src = tl.load(r_base + idx, mask=nmask, other=0).to(tl.int64)
        k = tl.load(k_base + src[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + src[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale_log2
        if HAS_W:
            s = with_log_weight(s, tl.load(w_base + idx, mask=nmask, other=0.0))
        m_i, l_i, acc = softmax_step(m_i, l_i, acc, s, nmask, v, PRECISION)
    store_split(po_ptr, pl_ptr, pid, split, G, D, NUM_SPLITS, m_i, l_i, acc, offs_g, offs_d, gmask, dmask)


@lazy_jit
def _estimate_decode_split_kernel(
    q_ptr, c_ptr, vm_ptr, ls_ptr, ids_ptr, cnt_ptr, base_ptr, start_ptr, po_ptr, pl_ptr, z_ptr,
    sm_scale_log2, stride_z,
    stride_qs, stride_qh, stride_qg,
    stride_ch, stride_cn,
    stride_vh, stride_vn,
    stride_lh, stride_ln,
    stride_is, stride_ih, stride_ik,
    HKV, G, K, WIDTH, D, NUM_SPLITS,
    HAS_BASE: tl.constexpr, HAS_START: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    FROM_LOGITS: tl.constexpr,
):
    pid, split, s, h = split_program(HKV)
    r0 = 0
    if HAS_START:
        r0 = tl.load(start_ptr + s).to(tl.int32)
    n = tl.load(cnt_ptr + s).to(tl.int32)
    n = tl.maximum(tl.minimum(tl.minimum(n, WIDTH), K - r0), 0)
    blk_begin, blk_end = split_blocks(n, BLOCK_N, NUM_SPLITS, split)

    offs_g, offs_d, offs_n, gmask, dmask = tile_offsets(G, D, BLOCK_G, BLOCK_D, BLOCK_N)
    q = tl.load(q_ptr + s * stride_qs + h * stride_qh + offs_g[:, None] * stride_qg + offs_d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)
    if UPCAST:     # interpreter only: its bf16 tl.dot is wrong
        q = q.to(tl.float32)
    cbase = 0
    if HAS_BASE:
        cbase = tl.load(base_ptr + s).to(tl.int64)
    id_row = ids_ptr + s * stride_is + h * stride_ih
    c_row = c_ptr + h * stride_ch
    v_row = vm_ptr + h * stride_vh
    l_row = ls_ptr + h * stride_lh

    m_i, l_i, acc = softmax_state(BLOCK_G, BLOCK_D)
    for blk in range(blk_begin, blk_end):
        idx = blk * BLOCK_N + offs_n
        nmask = idx < n
        lid = tl.load(id_row + (r0 + idx).to(tl.int64) * stride_ik, mask=nmask, other=0).to(tl.int64)
        cid = lid + cbase
        kv_mask = nmask[:, None] & dmask[None, :]
        v = tl.load(v_row + cid[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        lw = tl.load(l_row + cid * stride_ln, mask=nmask, other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        if FROM_LOGITS:   # q . c already scored (scaled, log2 units) by centroid_logits: no key read
            zq = z_ptr + (pid.to(tl.int64) * G + offs_g)[:, None] * stride_z + lid[None, :]
            sc = with_log_weight(tl.load(zq, mask=gmask[:, None] & nmask[None, :], other=0.0), lw)
        else:
            k = tl.load(c_row + cid[:, None] * stride_cn + offs_d[None, :], mask=kv_mask, other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
            sc = with_log_weight(tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale_log2, lw)
        m_i, l_i, acc = softmax_step(m_i, l_i, acc, sc, nmask, v, PRECISION)
    store_split(po_ptr, pl_ptr, pid, split, G, D, NUM_SPLITS, m_i, l_i, acc, offs_g, offs_d, gmask, dmask)


def _check(q, k, v, lengths, log_w):
    assert q.dim() == 4 and k.dim() == 4, "q [B, Hkv, G, D], k/v [B, Hkv, L, D]"
    B, Hkv, G, D = q.shape
    L = k.shape[2]
    assert k.shape == (B, Hkv, L, D) and v.shape == k.shape, (q.shape, k.shape, v.shape)
    assert q.dtype in FLOAT_DTYPES and k.dtype == q.dtype and v.dtype == q.dtype
    assert lengths.shape == (B, Hkv) and lengths.dtype == torch.int32
    if log_w is not None:
        assert log_w.shape == (B, Hkv, L) and log_w.dtype == torch.float32, (log_w.shape, log_w.dtype)
    devs = {t.device for t in (q, k, v, lengths) + ((log_w,) if log_w is not None else ())}
    assert len(devs) == 1, f"tensors on several devices: {devs}"
    return B, Hkv, G, D, L


def weighted_decode_ref(q, k, v, lengths, log_w, scale):
    """Plain-torch weighted decode (fp32 math); the CPU path and the test oracle."""
    B, Hkv, G, D, L = _check(q, k, v, lengths, log_w)
    s = torch.einsum("bhgd,bhnd->bhgn", q.float(), k.float()) * scale
    if log_w is not None:
        s = s + log_w[:, :, None, :]
    valid = torch.arange(L, device=q.device)[None, None, :] < lengths[:, :, None].long()
    s = s.masked_fill(~valid[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)                               # -inf on empty rows
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    v = v.float().masked_fill(~valid[..., None], 0.0)              # rows past n may hold garbage
    out = torch.einsum("bhgn,bhnd->bhgd", p, v)
    return out, lse


def weighted_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
                    log_w: torch.Tensor | None, scale: float, num_splits: int | None = None,
                    partial: bool = False, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial attention state of each (b, kv head, group query) over its valid keys.

    q: [B, Hkv, G, D]; k, v: [B, Hkv, L, D] (any strides, last dim contiguous); lengths:
    [B, Hkv] int32 (0..L); log_w: [B, Hkv, L] float32 or None, added to each scaled score.
    Returns ``out [B, Hkv, G, D]`` fp32 and ``lse [B, Hkv, G]`` fp32 (see the module docstring);
    rows with 0 keys give out = 0, lse = -inf. ``num_splits`` overrides the split-K factor.
    ``partial``: return the unmerged split states ``[B * Hkv * G, splits, D]``, ``[.., splits]``
    instead, for ``merge_partials`` to merge with other zones' in one launch.
    ``rows``: [B, Hkv, L] int32: k, v are a pool [Hkv, N, D] and key j of row (b, h) is
    ``k[h, rows[b, h, j]]`` (``gather.cluster_rows``: the retrieval zone read in place).
    """
    if rows is not None:
        assert k.dim() == 3 and v.shape == k.shape and rows.dim() == 3 and rows.dtype == torch.int32, \
            (k.shape, v.shape, rows.shape, rows.dtype)
        assert rows.stride(2) == 1 and rows.device == k.device and log_w is None, "rows: no log weights"
        if not use_triton(q, k, v, rows):
            hh = torch.arange(k.shape[0], device=k.device)[None, :, None]
            pos = torch.where(torch.arange(rows.shape[2], device=k.device) < lengths[..., None], rows, 0).long()
            return _as_partial(weighted_decode_ref(q, k[hh, pos], v[hh, pos], lengths, log_w, scale), partial)
        k, v = k[None].expand(rows.shape[0], -1, -1, -1), v[None].expand(rows.shape[0], -1, -1, -1)   # stride_b 0
        assert rows.shape[:2] == k.shape[:2], (rows.shape, k.shape)
    elif not use_triton(q, k, v):
        return _as_partial(weighted_decode_ref(q, k, v, lengths, log_w, scale), partial)
    B, Hkv, G, D, L = _check(q, k, v, lengths, log_w)
    if rows is not None:
        L = rows.shape[2]
    for name, t in (("q", q), ("k", k), ("v", v)) + ((("log_w", log_w),) if log_w is not None else ()):
        check_last_contiguous(name, t)
    num_splits, part_out, part_lse = _split_scratch(TUNE, B * Hkv, G, L, D, q.device, num_splits)
    if B * Hkv * G == 0:
        return _finish(part_out, part_lse, (B, Hkv, G, D), partial)
    w = log_w if log_w is not None else lengths  # dummy pointer when HAS_W is False
    r = rows if rows is not None else lengths[..., None]
    _weighted_decode_split_kernel[(B * Hkv, num_splits)](
        q, k, v, lengths, w, r, part_out, part_lse,
        float(scale) * LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        lengths.stride(0), lengths.stride(1),
        w.stride(0), w.stride(1),
        r.stride(0), r.stride(1),
        Hkv, G, L, D, num_splits,
        HAS_W=log_w is not None, HAS_ROWS=rows is not None, BLOCK_N=TUNE["block_n"], BLOCK_G=max(16, next_pow2(G)),
        BLOCK_D=max(16, next_pow2(D)), PRECISION=dot_precision(q.dtype),
        num_warps=TUNE["num_warps"], num_stages=TUNE["num_stages"],
    )
    return _finish(part_out, part_lse, (B, Hkv, G, D), partial)


def _split_scratch(tune: dict, programs: int, G: int, keys: int, D: int, device: torch.device,
                   num_splits: int | None):
    """Split count and partial-state scratch of a launch of ``programs`` programs of ``G`` queries
    over at most ``keys`` keys each, in blocks of ``tune["block_n"]``."""
    splits = pick_splits(programs, max(1, cdiv(keys, tune["block_n"])), device, tune["waves"], num_splits)
    return (splits, *split_states(programs * G, splits, D, device))


def _as_partial(state, partial: bool):
    """A merged (out, lse) as one split of partial states, when those are asked for."""
    out, lse = state
    return (out.reshape(-1, 1, out.shape[-1]).float().contiguous(), lse.reshape(-1, 1).float().contiguous()) \
        if partial else state


def _finish(part_out, part_lse, shape, partial: bool):
    if partial:
        return part_out, part_lse
    out = torch.empty(shape, device=part_out.device, dtype=torch.float32)
    lse = torch.empty(shape[:-1], device=part_out.device, dtype=torch.float32)
    if out.numel():
        merge_splits(part_out, part_lse, out.view(-1, shape[-1]), lse.view(-1))
    return out, lse


def _check_estimate(q, centroids, value_mean, log_size, ids, count, base, start, width):
    assert q.dim() == 4 and centroids.dim() == 3 and ids.dim() == 3, \
        "q [S, Hkv, G, D], centroids / value_mean [Hkv, N, D], ids [S, Hkv, K]"
    S, Hkv, G, D = q.shape
    N = centroids.shape[1]
    assert centroids.shape == (Hkv, N, D) and value_mean.shape == centroids.shape, \
        (q.shape, centroids.shape, value_mean.shape)
    assert log_size.shape == (Hkv, N) and log_size.dtype == torch.float32, (log_size.shape, log_size.dtype)
    assert q.dtype in FLOAT_DTYPES and centroids.dtype in FLOAT_DTYPES and value_mean.dtype == centroids.dtype
    K = ids.shape[2]
    assert ids.shape[:2] == (S, Hkv) and not ids.is_floating_point(), (ids.shape, ids.dtype)
    width = K if width is None else int(width)
    assert 0 <= width <= K, (width, K)
    for name, t in (("count", count), ("base", base), ("start", start)):
        if t is not None:
            assert t.shape == (S,) and not t.is_floating_point(), f"{name}: {t.shape} {t.dtype}"
    devs = {t.device for t in (q, centroids, value_mean, log_size, ids, count, base, start) if t is not None}
    assert len(devs) == 1, f"tensors on several devices: {devs}"
    return S, Hkv, G, D, K, width


def estimate_decode_ref(q, centroids, value_mean, log_size, ids, count, scale, *, base=None, start=None,
                        width=None):
    """Plain-torch ``estimate_decode``: gathers the rows, then ``weighted_decode_ref`` (fp32 math);
    the CPU path and the test oracle."""
    S, Hkv, G, D, K, width = _check_estimate(q, centroids, value_mean, log_size, ids, count, base, start, width)
    dev = q.device
    r0 = start.long() if start is not None else torch.zeros(S, dtype=torch.long, device=dev)
    n = torch.minimum(count.long().clamp(max=width), K - r0).clamp(min=0)              # [S]
    j = torch.arange(width, device=dev)
    valid = (j[None, :] < n[:, None])[:, None, :]                                         # [S, 1, E]
    pos = (r0[:, None] + j).clamp(0, max(K - 1, 0))[:, None, :].expand(S, Hkv, width)
    cid = ids.gather(2, pos).long() if K else ids.new_zeros(S, Hkv, width).long()
    if base is not None:
        cid = cid + base.long()[:, None, None]
    cid = torch.where(valid, cid, 0)                   # entries past the count are never looked up
    hh = torch.arange(Hkv, device=dev)[None, :, None]
    k, v, log_w = centroids[hh, cid], value_mean[hh, cid], log_size[hh, cid]
    lengths = n.to(torch.int32)[:, None].expand(S, Hkv).contiguous()
    return weighted_decode_ref(q.to(centroids.dtype), k, v, lengths, log_w, scale)


def estimate_decode(q: torch.Tensor, centroids: torch.Tensor, value_mean: torch.Tensor,
                    log_size: torch.Tensor, ids: torch.Tensor, count: torch.Tensor, scale: float, *,
                    base: torch.Tensor | None = None, start: torch.Tensor | None = None,
                    width: int | None = None, num_splits: int | None = None,
                    partial: bool = False, logits=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Estimation-zone attention read in place from the cluster pool (no gather, no buffer).

    q: [S, Hkv, G, D]; centroids, value_mean: [Hkv, N, D] (the layer's pool, last dim contiguous);
    log_size: [Hkv, N] float32; ids: [S, Hkv, K] int32/int64 cluster ids; count: [S] int;
    base, start: [S] int or None (0). Row ``(s, h)`` has ``n_s = clamp(min(count[s], width,
    K - start[s]), 0)`` entries; entry ``j < n_s`` is cluster

        c = base[s] + ids[s, h, start[s] + j]

    with key ``centroids[h, c]``, value ``value_mean[h, c]`` and log weight ``log_size[h, c]``.
    Ids past ``n_s`` are never read (they may be garbage). Returns ``out [S, Hkv, G, D]`` fp32 and
    ``lse [S, Hkv, G]`` fp32, exactly ``weighted_decode(q, K, V, n, log_w, scale)`` on the gathered
    rows; ``n_s = 0`` gives out = 0, lse = -inf (``merge_states`` then ignores the zone).
    The wave decode passes ``select_zones``' estimation ids [S, Hkv, E] (local, -1 past the
    count), ``base`` = first cluster of the slot, ``count`` = estimation count, ``width`` = E.
    ``width`` (default K) is the static cap that sizes the split grid (CUDA-graph safe: nothing is
    read back to the host); q is cast to the pool dtype. ``num_splits`` overrides the split factor;
    ``partial`` as in ``weighted_decode``. ``logits``: the ``centroid_scores.CentroidLogits`` of
    these q and centroids, whose z the ids index (local ids, z's width): the kernel reads each
    cluster's logits there instead of its centroid (the CPU path recomputes them).
    """
    if not use_triton(q, centroids, value_mean, log_size, ids, count):
        return _as_partial(estimate_decode_ref(q, centroids, value_mean, log_size, ids, count, scale, base=base,
                                               start=start, width=width), partial)
    S, Hkv, G, D, K, width = _check_estimate(q, centroids, value_mean, log_size, ids, count, base, start, width)
    if logits is not None:
        assert tuple(logits.shape[:3]) == (S, Hkv, G) and logits.z.stride(1) == 1, (logits.shape, q.shape)
    q = q.to(centroids.dtype)
    for name, t in (("q", q), ("centroids", centroids), ("value_mean", value_mean)):
        check_last_contiguous(name, t)
    count = count.contiguous()
    base = base.contiguous() if base is not None else None
    start = start.contiguous() if start is not None else None
    num_splits, part_out, part_lse = _split_scratch(TUNE_ESTIMATE, S * Hkv, G, width, D, q.device, num_splits)
    if S * Hkv * G == 0:
        return _finish(part_out, part_lse, (S, Hkv, G, D), partial)
    upcast = q.dtype == torch.bfloat16 and interpret_requested()
    _estimate_decode_split_kernel[(S * Hkv, num_splits)](
        q, centroids, value_mean, log_size, ids, count,
        base if base is not None else count, start if start is not None else count,
        part_out, part_lse, logits.z if logits is not None else part_lse,
        float(scale) * LOG2E, logits.z.stride(0) if logits is not None else 0,
        q.stride(0), q.stride(1), q.stride(2),
        centroids.stride(0), centroids.stride(1),
        value_mean.stride(0), value_mean.stride(1),
        log_size.stride(0), log_size.stride(1),
        ids.stride(0), ids.stride(1), ids.stride(2),
        Hkv, G, K, width, D, num_splits,
        HAS_BASE=base is not None, HAS_START=start is not None, UPCAST=upcast,
        BLOCK_N=TUNE_ESTIMATE["block_n"], BLOCK_G=max(16, next_pow2(G)), BLOCK_D=max(16, next_pow2(D)),
        PRECISION="ieee" if upcast else dot_precision(q.dtype), FROM_LOGITS=logits is not None,
        num_warps=TUNE_ESTIMATE["num_warps"], num_stages=TUNE_ESTIMATE["num_stages"],
    )
    return _finish(part_out, part_lse, (S, Hkv, G, D), partial)


def merge_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                 lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-sum-exp merge of two partial softmax states (torch; a few elementwise kernels).

    out_*: [..., D], lse_*: [...]. ``lse = log(exp(lse_a) + exp(lse_b))`` and
    ``out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b``; a side with lse = -inf contributes
    nothing (its out is ignored, even if NaN); both -inf gives out = 0, lse = -inf. fp32 results.
    """
    assert out_a.shape == out_b.shape and lse_a.shape == lse_b.shape == out_a.shape[:-1]
    lse_a = lse_a.float()
    lse_b = lse_b.float()
    m = torch.maximum(lse_a, lse_b)
    m_safe = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
    wa = torch.exp(lse_a - m_safe)
    wb = torch.exp(lse_b - m_safe)
    sw = wa + wb
    inv = torch.where(sw > 0, 1.0 / sw, torch.zeros_like(sw))
    oa = torch.where((wa > 0)[..., None], out_a.float(), 0.0)
    ob = torch.where((wb > 0)[..., None], out_b.float(), 0.0)
    out = (oa * (wa * inv)[..., None]) + (ob * (wb * inv)[..., None])
    return out, m_safe + torch.log(sw)


__all__ = ["estimate_decode", "estimate_decode_ref", "weighted_decode", "weighted_decode_ref", "merge_states"]
