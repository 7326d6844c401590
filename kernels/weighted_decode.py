"""Wave-index attention over an execution buffer, with an optional log weight per key.

For row ``(b, h)`` with ``n = lengths[b, h]`` valid keys and query ``g`` of the GQA group:

    s_j = scale * q[b, h, g] . k[b, h, j] + log_w[b, h, j]          (j < n; log_w = 0 if None)
    lse = log(sum_j exp(s_j)),        out = sum_j exp(s_j - lse) * v[b, h, j]

so a key of weight ``w_j = exp(log_w_j)`` counts as ``w_j`` copies of itself (the estimation zone
stores one centroid per cluster with ``log_w = log(size)``). A row with no valid key gives
``out = 0, lse = -inf``; ``merge_states`` combines such partial states of several zones.

Triton: split-K like ``paged_decode`` (grid ``(B * Hkv, num_splits)``, each row's keys split evenly
from ``lengths`` on the device), then ``split_reduce.merge_splits``.
"""

from __future__ import annotations

import torch

from ._triton_util import (FLOAT_DTYPES, check_last_contiguous, dot_precision, lazy_jit, next_pow2,
                           pick_splits, tl, use_triton)
from .split_reduce import merge_splits

LOG2E = 1.4426950408889634

# Launch parameters (keys per loop step, warps, pipeline depth, grid waves per SM).
TUNE = {"block_n": 32, "num_warps": 4, "num_stages": 2, "waves": 4}  # H100 sweep


@lazy_jit
def _weighted_decode_split_kernel(
    q_ptr, k_ptr, v_ptr, len_ptr, w_ptr, po_ptr, pl_ptr,
    sm_scale_log2,
    stride_qb, stride_qh, stride_qg,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_lb, stride_lh,
    stride_wb, stride_wh,
    HKV, G, L, D, NUM_SPLITS,
    HAS_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid // HKV).to(tl.int64)
    h = (pid % HKV).to(tl.int64)
    length = tl.minimum(tl.load(len_ptr + b * stride_lb + h * stride_lh), L)
    n_blocks = tl.cdiv(length, BLOCK_N)
    per = tl.cdiv(n_blocks, NUM_SPLITS)
    blk_begin = split * per
    blk_end = tl.minimum(blk_begin + per, n_blocks)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    gmask = offs_g < G
    dmask = offs_d < D
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_g[:, None] * stride_qg + offs_d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    w_base = w_ptr + b * stride_wb + h * stride_wh

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for blk in range(blk_begin, blk_end):
        idx = blk * BLOCK_N + offs_n
        nmask = idx < length
        kv_mask = nmask[:, None] & dmask[None, :]
        k = tl.load(k_base + idx[:, None].to(tl.int64) * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + idx[:, None].to(tl.int64) * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale_log2
        if HAS_W:
            lw = tl.load(w_base + idx, mask=nmask, other=0.0)
            s = s + lw[None, :] * 1.4426950408889634
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all weights 0 so far
        alpha = tl.exp2(m_i - m_safe)
        pr = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(pr, axis=1)
        acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    row = pid.to(tl.int64) * G + offs_g
    tl.store(po_ptr + ((row * NUM_SPLITS + split) * D)[:, None] + offs_d[None, :], o,
             mask=gmask[:, None] & dmask[None, :])
    tl.store(pl_ptr + row * NUM_SPLITS + split, lse, mask=gmask)


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
                    log_w: torch.Tensor | None, scale: float,
                    num_splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial attention state of each (b, kv head, group query) over its valid keys.

    q: [B, Hkv, G, D]; k, v: [B, Hkv, L, D] (any strides, last dim contiguous); lengths:
    [B, Hkv] int32 (0..L); log_w: [B, Hkv, L] float32 or None, added to each scaled score.
    Returns ``out [B, Hkv, G, D]`` fp32 and ``lse [B, Hkv, G]`` fp32 (see the module docstring);
    rows with 0 keys give out = 0, lse = -inf. ``num_splits`` overrides the split-K factor.
    """
    if not use_triton(q, k, v):
        return weighted_decode_ref(q, k, v, lengths, log_w, scale)
    B, Hkv, G, D, L = _check(q, k, v, lengths, log_w)
    for name, t in (("q", q), ("k", k), ("v", v)) + ((("log_w", log_w),) if log_w is not None else ()):
        check_last_contiguous(name, t)
    BLOCK_N = TUNE["block_n"]
    max_blocks = max(1, -(-L // BLOCK_N))
    if num_splits is None:
        num_splits = pick_splits(B * Hkv, max_blocks, q.device, TUNE["waves"])
    num_splits = max(1, min(int(num_splits), max_blocks))
    R = B * Hkv * G
    out = torch.empty(B, Hkv, G, D, device=q.device, dtype=torch.float32)
    lse = torch.empty(B, Hkv, G, device=q.device, dtype=torch.float32)
    if R == 0:
        return out, lse
    part_out = torch.empty(R, num_splits, D, device=q.device, dtype=torch.float32)
    part_lse = torch.empty(R, num_splits, device=q.device, dtype=torch.float32)
    w = log_w if log_w is not None else lengths  # dummy pointer when HAS_W is False
    _weighted_decode_split_kernel[(B * Hkv, num_splits)](
        q, k, v, lengths, w, part_out, part_lse,
        float(scale) * LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        lengths.stride(0), lengths.stride(1),
        w.stride(0), w.stride(1),
        Hkv, G, L, D, num_splits,
        HAS_W=log_w is not None, BLOCK_N=BLOCK_N, BLOCK_G=max(16, next_pow2(G)),
        BLOCK_D=max(16, next_pow2(D)), PRECISION=dot_precision(q.dtype),
        num_warps=TUNE["num_warps"], num_stages=TUNE["num_stages"],
    )
    merge_splits(part_out, part_lse, out.view(R, D), lse.view(R))
    return out, lse


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


__all__ = ["weighted_decode", "weighted_decode_ref", "merge_states"]
