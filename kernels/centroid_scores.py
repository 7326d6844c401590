"""Cluster ranking score with the GQA reduction (wave index retrieval / estimation choice).

For batch row ``b``, kv head ``h``, the ``n = counts[b]`` valid centroids ``c < n``:

    z_{g,c} = scale * q[b, h, g] . centroids[b, h, c]
    scores[b, h, c] = sum_g softmax_c(z_g)[c]       (softmax over the valid c only)
    scores[b, h, c] = -1.0                          (c >= n: padding ranks last)

Triton, two passes: (1) grid ``(B * Hkv, num_splits)``: logits of a split's centroids into fp32
scratch ``[B * Hkv, G, C]`` (G * 4 bytes per centroid, far less than re-reading D * 2) plus the
split's running max and sum of exponentials per query; (2) grid ``(B * Hkv, C / BLOCK)``: merge the
splits' (max, sum) per query, then ``sum_g exp(z - max_g) / sum_g`` per centroid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._online_softmax import split_blocks, split_program, tile_offsets
from ._triton_util import (FLOAT_DTYPES, LOG2E, cdiv, check_last_contiguous, dot_precision, lazy_jit,
                           next_pow2, pick_splits, tl, use_triton)

TUNE = {"block_c": 64, "num_warps": 4, "num_stages": 3, "waves": 4}   # logits pass (bench_kernels sweep)


@lazy_jit
def _centroid_logits_kernel(
    q_ptr, c_ptr, cnt_ptr, base_ptr, z_ptr, pm_ptr, pl_ptr,
    sm_scale_log2,
    stride_qb, stride_qh, stride_qg,
    stride_cb, stride_ch, stride_cc,
    HKV, G, C, D, NUM_SPLITS,
    BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    HAS_BASE: tl.constexpr,
):
    pid, split, b, h = split_program(HKV)
    n = tl.minimum(tl.load(cnt_ptr + b), C)
    blk_begin, blk_end = split_blocks(n, BLOCK_C, NUM_SPLITS, split)

    offs_g, offs_d, offs_c, gmask, dmask = tile_offsets(G, D, BLOCK_G, BLOCK_D, BLOCK_C)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_g[:, None] * stride_qg + offs_d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)
    if HAS_BASE:   # ragged pool: row b's centroids start at base[b]
        c_base = c_ptr + h * stride_ch + tl.load(base_ptr + b).to(tl.int64) * stride_cc
    else:
        c_base = c_ptr + b * stride_cb + h * stride_ch
    z_rows = z_ptr + (pid.to(tl.int64) * G + offs_g)[:, None] * C

    # Running max and sum per tile position, reduced over the columns once after the loop: no
    # cross-thread reduction inside it.
    m_v = tl.full([BLOCK_G, BLOCK_C], float("-inf"), tl.float32)
    l_v = tl.zeros([BLOCK_G, BLOCK_C], tl.float32)
    for blk in range(blk_begin, blk_end):
        idx = blk * BLOCK_C + offs_c
        cmask = idx < n
        cen = tl.load(c_base + idx[:, None].to(tl.int64) * stride_cc + offs_d[None, :],
                      mask=cmask[:, None] & dmask[None, :], other=0.0)
        z = tl.dot(q, tl.trans(cen), input_precision=PRECISION) * sm_scale_log2
        z = tl.where(cmask[None, :], z, float("-inf"))
        tl.store(z_rows + idx[None, :], z, mask=gmask[:, None] & cmask[None, :])
        m_new = tl.maximum(m_v, z)
        m_s = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_v = l_v * tl.exp2(m_v - m_s) + tl.exp2(z - m_s)
        m_v = m_new
    m_i = tl.max(m_v, axis=1)
    l_i = tl.sum(l_v * tl.exp2(m_v - tl.where(m_i == float("-inf"), 0.0, m_i)[:, None]), axis=1)
    row = pid.to(tl.int64) * G + offs_g
    tl.store(pm_ptr + row * NUM_SPLITS + split, m_i, mask=gmask)
    tl.store(pl_ptr + row * NUM_SPLITS + split, l_i, mask=gmask)


@lazy_jit
def _centroid_probs_kernel(
    z_ptr, pm_ptr, pl_ptr, cnt_ptr, out_ptr,
    stride_ob, stride_oh,
    HKV, G, C, NUM_SPLITS,
    BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0)
    cblk = tl.program_id(1)
    b = (pid // HKV).to(tl.int64)
    h = (pid % HKV).to(tl.int64)
    n = tl.minimum(tl.load(cnt_ptr + b), C)
    offs_g = tl.arange(0, BLOCK_G)
    offs_s = tl.arange(0, BLOCK_S)
    offs_c = cblk * BLOCK_C + tl.arange(0, BLOCK_C)
    gmask = offs_g < G
    row = pid.to(tl.int64) * G + offs_g
    sm = gmask[:, None] & (offs_s < NUM_SPLITS)[None, :]
    pm = tl.load(pm_ptr + row[:, None] * NUM_SPLITS + offs_s[None, :], mask=sm, other=float("-inf"))
    pl = tl.load(pl_ptr + row[:, None] * NUM_SPLITS + offs_s[None, :], mask=sm, other=0.0)
    m = tl.max(pm, axis=1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    l_sum = tl.sum(pl * tl.exp2(pm - m_safe[:, None]), axis=1)
    inv = tl.where(l_sum > 0.0, 1.0 / tl.where(l_sum > 0.0, l_sum, 1.0), 0.0)
    cmask = offs_c < n
    z = tl.load(z_ptr + row[:, None] * C + offs_c[None, :], mask=gmask[:, None] & cmask[None, :],
                other=float("-inf"))
    p = tl.exp2(z - m_safe[:, None]) * inv[:, None]
    score = tl.sum(p, axis=0)
    score = tl.where(cmask, score, -1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_c, score, mask=offs_c < C)


def _check(q, centroids, counts):
    assert q.dim() == 4 and centroids.dim() == 4, "q [B, Hkv, G, D], centroids [B, Hkv, C, D]"
    B, Hkv, G, D = q.shape
    C = centroids.shape[2]
    assert centroids.shape == (B, Hkv, C, D), (q.shape, centroids.shape)
    assert q.dtype in FLOAT_DTYPES and centroids.dtype in FLOAT_DTYPES
    assert counts.shape == (B,) and counts.dtype == torch.int32
    assert q.device == centroids.device == counts.device
    return B, Hkv, G, D, C


def centroid_scores_ref(q: torch.Tensor, centroids: torch.Tensor, counts: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """Plain-torch ranking scores (fp32 math); the CPU path and the test oracle."""
    B, Hkv, G, D, C = _check(q, centroids, counts)
    z = torch.einsum("bhgd,bhcd->bhgc", q.float(), centroids.float()) * scale
    valid = torch.arange(C, device=q.device)[None, :] < counts[:, None].long()   # [B, C]
    z = z.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = torch.softmax(z, dim=-1).nan_to_num_(0.0)                                 # 0 valid -> 0
    return p.sum(dim=2).masked_fill_(~valid[:, None, :], -1.0)


def _ragged_view(centroids: torch.Tensor, base: torch.Tensor, width: int) -> torch.Tensor:
    """[B, Hkv, width, D] copy of each row's window of the pool (reference path)."""
    idx = (base[:, None].long() + torch.arange(width, device=base.device)).clamp(max=centroids.shape[1] - 1)
    return centroids[:, idx].transpose(0, 1)


def _dense_form(q, centroids, counts, base, width):
    """(q, centroids [B, Hkv, width, D]) for the ragged form (a pool and per-row `base`): a copy
    of each row's window on the torch path, a B-fold view of the pool for the kernel."""
    if base is None:
        return q, centroids
    assert centroids.dim() == 3 and width is not None and base.shape == counts.shape
    if not use_triton(q, centroids):
        return q, _ragged_view(centroids, base, width)
    assert width <= centroids.shape[1], (width, centroids.shape)
    q = q.to(centroids.dtype)      # never promote the pool: the view is B-fold
    return q, centroids[None].expand(q.shape[0], -1, -1, -1)[:, :, :width]


@dataclass
class CentroidLogits:
    """The logits pass's output: ``z [B * Hkv * G, C]`` fp32, ``scale * log2(e) * q . c`` (-inf
    past the count), and per split of C the running max ``pm`` and sum of ``exp2(z - pm)`` ``pl``
    ``[B * Hkv * G, splits]``. Row ``(b * Hkv + h) * G + g`` is query head g of kv head h."""
    z: torch.Tensor
    pm: torch.Tensor
    pl: torch.Tensor
    shape: tuple[int, int, int, int]      # (B, Hkv, G, C)


def centroid_logits(q: torch.Tensor, centroids: torch.Tensor, counts: torch.Tensor, scale: float,
                    num_splits: int | None = None, base: torch.Tensor | None = None,
                    width: int | None = None) -> CentroidLogits:
    """The first pass of ``centroid_scores`` (same arguments): every centroid's logit for every
    query head, and the softmax normalisers per split. ``centroid_probs`` finishes the scores;
    ``select.select_zones_logits`` finishes them inside the zone choice."""
    q, centroids = _dense_form(q, centroids, counts, base, width)
    B, Hkv, G, D, C = _check(q, centroids, counts)
    if not use_triton(q, centroids):   # torch: one split
        z = torch.einsum("bhgd,bhcd->bhgc", q.float(), centroids.float()).mul_(float(scale) * LOG2E)
        z = z.masked_fill(torch.arange(C, device=q.device) >= counts.long()[:, None, None, None], float("-inf"))
        z = z.reshape(B * Hkv * G, C)
        pm = z.amax(1, keepdim=True) if C else z.new_full((B * Hkv * G, 1), float("-inf"))
        pl = torch.exp2(z - torch.where(pm == float("-inf"), 0.0, pm)).sum(1, keepdim=True)
        return CentroidLogits(z, pm, pl, (B, Hkv, G, C))
    check_last_contiguous("q", q)
    check_last_contiguous("centroids", centroids)
    if q.dtype != centroids.dtype:
        dt = torch.promote_types(q.dtype, centroids.dtype)
        q, centroids = q.to(dt), centroids.to(dt)
    counts = counts.contiguous()
    BLOCK_C, BLOCK_G = TUNE["block_c"], max(16, next_pow2(G))
    max_blocks = max(1, cdiv(C, BLOCK_C))
    num_splits = pick_splits(B * Hkv, max_blocks, q.device, TUNE["waves"], num_splits)
    z = torch.empty(B * Hkv * G, C, device=q.device, dtype=torch.float32)
    pm = torch.empty(B * Hkv * G, num_splits, device=q.device, dtype=torch.float32)
    pl = torch.empty_like(pm)
    if B * Hkv * C:
        _centroid_logits_kernel[(B * Hkv, num_splits)](
            q, centroids, counts, base if base is not None else counts, z, pm, pl,
            float(scale) * LOG2E,
            q.stride(0), q.stride(1), q.stride(2),
            centroids.stride(0), centroids.stride(1), centroids.stride(2),
            Hkv, G, C, D, num_splits,
            BLOCK_C=BLOCK_C, BLOCK_G=BLOCK_G, BLOCK_D=max(16, next_pow2(D)),
            PRECISION=dot_precision(q.dtype), num_warps=TUNE["num_warps"], num_stages=TUNE["num_stages"],
            HAS_BASE=base is not None,
        )
    return CentroidLogits(z, pm, pl, (B, Hkv, G, C))


def centroid_probs(logits: CentroidLogits, counts: torch.Tensor) -> torch.Tensor:
    """The second pass of ``centroid_scores``: scores [B, Hkv, C] float32, -1.0 on padding."""
    B, Hkv, G, C = logits.shape
    z, pm, pl = logits.z, logits.pm, logits.pl
    if not use_triton(z):
        m = pm.amax(1, keepdim=True)
        m_safe = torch.where(m == float("-inf"), 0.0, m)
        l_sum = (pl * torch.exp2(pm - m_safe)).sum(1, keepdim=True)
        p = torch.exp2(z - m_safe) * torch.where(l_sum > 0, 1.0 / torch.where(l_sum > 0, l_sum, 1.0), 0.0)
        scores = p.view(B, Hkv, G, C).sum(2)
        return scores.masked_fill_(torch.arange(C, device=z.device) >= counts.long()[:, None, None], -1.0)
    scores = torch.empty(B, Hkv, C, device=z.device, dtype=torch.float32)
    if B * Hkv * C == 0:
        return scores
    BLOCK_C2 = 256
    num_splits = pm.shape[1]
    _centroid_probs_kernel[(B * Hkv, cdiv(C, BLOCK_C2))](
        z, pm, pl, counts.contiguous(), scores,
        scores.stride(0), scores.stride(1),
        Hkv, G, C, num_splits,
        BLOCK_C=BLOCK_C2, BLOCK_G=next_pow2(G), BLOCK_S=next_pow2(max(num_splits, 2)),
        num_warps=4,
    )
    return scores


def centroid_scores(q: torch.Tensor, centroids: torch.Tensor, counts: torch.Tensor,
                    scale: float, num_splits: int | None = None, base: torch.Tensor | None = None,
                    width: int | None = None) -> torch.Tensor:
    """Ranking score of every cluster, summed over the GQA group (see the module docstring).

    q: [B, Hkv, G, D]; centroids: [B, Hkv, C, D] (last dim contiguous; row b valid for
    c < counts[b]); counts: [B] int32. Returns scores [B, Hkv, C] float32, -1.0 on padding.
    Mixed q / centroids dtypes are promoted to a common one before the dot.
    Ragged form: `centroids` is a pool [Hkv, N, D] and `base` [B] int64 says where row b's
    clusters start in it; `width` (>= max counts) is C, the width of the scores.
    """
    if not use_triton(q, centroids):
        q, centroids = _dense_form(q, centroids, counts, base, width)
        return centroid_scores_ref(q, centroids, counts, scale)
    return centroid_probs(centroid_logits(q, centroids, counts, scale, num_splits, base, width), counts)


__all__ = ["CentroidLogits", "centroid_logits", "centroid_probs", "centroid_scores", "centroid_scores_ref"]
