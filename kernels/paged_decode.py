"""Full-attention decode over a paged KV cache (flash-decoding: split-K + merge).

For sequence ``b``, query head ``h`` (kv head ``h // G``, ``G = Hq // Hkv``) and the first
``n = lengths[b]`` tokens of the sequence, token ``t`` living in page ``block_table[b, t // page]``
at row ``t % page``:

    s_t = scale * q[b, h] . k_t,        out[b, h] = sum_t softmax(s)_t * v_t.

Stage 1: grid ``(B * Hkv, num_splits)``; a program takes the ``G`` query heads of one kv head
(padded to >= 16 rows for ``tl.dot``) over one contiguous range of that sequence's tokens, in
steps of BLOCK_T tokens whose pages are looked up per token. Each sequence is split evenly from
``lengths`` read on the device (no host sync: CUDA-graph safe). A program writes its normalised
partial output and log-sum-exp to fp32 scratch; stage 2 (``split_reduce.merge_splits``) merges.
"""

from __future__ import annotations

import torch

from ._triton_util import (FLOAT_DTYPES, cdiv, check_last_contiguous, dot_precision, lazy_jit,
                           next_pow2, pick_splits, tl, use_triton)
from .split_reduce import merge_splits

LOG2E = 1.4426950408889634

# Launch parameters (tokens per loop step, warps, pipeline depth, grid waves per SM).
TUNE = {"block_t": 32, "num_warps": 4, "num_stages": 3, "waves": 4}  # H100 sweep: 2.9-3.0 TB/s


@lazy_jit
def _paged_decode_split_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, len_ptr, po_ptr, pl_ptr,
    sm_scale_log2,
    stride_qb, stride_qh,
    stride_kp, stride_ks, stride_kh,
    stride_vp, stride_vs, stride_vh,
    stride_btb,
    HKV, G, D, NUM_SPLITS,
    PAGE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // HKV
    hk = pid % HKV
    length = tl.load(len_ptr + b)
    n_blocks = tl.cdiv(length, BLOCK_T)
    per = tl.cdiv(n_blocks, NUM_SPLITS)
    blk_begin = split * per
    blk_end = tl.minimum(blk_begin + per, n_blocks)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_t = tl.arange(0, BLOCK_T)
    gmask = offs_g < G
    dmask = offs_d < D
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + (hk * G + offs_g)[:, None] * stride_qh
                + offs_d[None, :], mask=gmask[:, None] & dmask[None, :], other=0.0)
    k_base = k_ptr + hk.to(tl.int64) * stride_kh
    v_base = v_ptr + hk.to(tl.int64) * stride_vh
    bt_row = bt_ptr + b.to(tl.int64) * stride_btb

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for blk in range(blk_begin, blk_end):
        tok = blk * BLOCK_T + offs_t
        tmask = tok < length
        # page of each token (BLOCK_T may span several pages or part of one)
        page = tl.load(bt_row + tok // PAGE, mask=tmask, other=0).to(tl.int64)
        row_k = page * stride_kp + (tok % PAGE) * stride_ks
        row_v = page * stride_vp + (tok % PAGE) * stride_vs
        kv_mask = tmask[:, None] & dmask[None, :]
        k = tl.load(k_base + row_k[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + row_v[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale_log2
        s = tl.where(tmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
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


def _check(q, k_pages, v_pages, block_table, lengths):
    assert q.dim() == 3 and k_pages.dim() == 4, "q [B, Hq, D], k_pages [P, page, Hkv, D]"
    B, Hq, D = q.shape
    P, page, Hkv, Dk = k_pages.shape
    assert v_pages.shape == k_pages.shape and Dk == D, (q.shape, k_pages.shape, v_pages.shape)
    assert Hq % Hkv == 0, f"Hq={Hq} not a multiple of Hkv={Hkv}"
    assert q.dtype in FLOAT_DTYPES and k_pages.dtype == q.dtype and v_pages.dtype == q.dtype
    assert block_table.dim() == 2 and block_table.shape[0] == B and block_table.dtype == torch.int32
    assert lengths.shape == (B,) and lengths.dtype == torch.int32
    assert page >= 16 and page & (page - 1) == 0, f"page_size {page} must be a power of two >= 16"
    devs = {t.device for t in (q, k_pages, v_pages, block_table, lengths)}
    assert len(devs) == 1, f"tensors on several devices: {devs}"
    return B, Hq, D, page, Hkv


def paged_decode_ref(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                     block_table: torch.Tensor, lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain-torch paged decode (fp32 math); the CPU path and the test oracle."""
    B, Hq, D, page, Hkv = _check(q, k_pages, v_pages, block_table, lengths)
    G = Hq // Hkv
    out = torch.empty_like(q)
    lens = lengths.tolist()
    for b in range(B):
        n = lens[b]
        pages = block_table[b, :cdiv(n, page)].long()
        k = k_pages[pages].reshape(-1, Hkv, D)[:n].float()  # [n, Hkv, D]
        v = v_pages[pages].reshape(-1, Hkv, D)[:n].float()
        qb = q[b].float().view(Hkv, G, D)
        s = torch.einsum("hgd,nhd->hgn", qb, k) * scale
        p = torch.softmax(s, dim=-1)
        out[b] = torch.einsum("hgn,nhd->hgd", p, v).reshape(Hq, D).to(q.dtype)
    return out


def paged_decode(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                 block_table: torch.Tensor, lengths: torch.Tensor, scale: float,
                 num_splits: int | None = None) -> torch.Tensor:
    """Decode attention of one new query token per sequence over its paged KV.

    q: [B, Hq, D]; k_pages, v_pages: [P, page_size, Hkv, D] (one layer's pool, last dim
    contiguous); block_table: [B, max_pages] int32 page ids in order; lengths: [B] int32 (>= 1,
    <= max_pages * page_size); Hq % Hkv == 0, query head h reads kv head h // (Hq // Hkv).
    Returns out [B, Hq, D] in q.dtype, ``softmax(scale * q k^T) v`` over the first lengths[b]
    tokens, accumulated in fp32. ``num_splits`` overrides the split-K factor (default: fill the
    GPU ~4 times over from B * Hkv and the block table's capacity; never more than its
    blocks of BLOCK_T tokens).
    """
    if not use_triton(q, k_pages, v_pages):
        return paged_decode_ref(q, k_pages, v_pages, block_table, lengths, scale)
    B, Hq, D, page, Hkv = _check(q, k_pages, v_pages, block_table, lengths)
    for name, t in (("q", q), ("k_pages", k_pages), ("v_pages", v_pages), ("block_table", block_table)):
        check_last_contiguous(name, t)
    lengths = lengths.contiguous()
    G = Hq // Hkv
    block_t = TUNE["block_t"]
    max_blocks = cdiv(block_table.shape[1] * page, block_t)
    if num_splits is None:
        num_splits = pick_splits(B * Hkv, max_blocks, q.device, TUNE["waves"])
    num_splits = max(1, min(int(num_splits), max_blocks))
    part_out = torch.empty(B * Hq, num_splits, D, device=q.device, dtype=torch.float32)
    part_lse = torch.empty(B * Hq, num_splits, device=q.device, dtype=torch.float32)
    out = torch.empty(B, Hq, D, device=q.device, dtype=q.dtype)
    if B == 0:
        return out
    _paged_decode_split_kernel[(B * Hkv, num_splits)](
        q, k_pages, v_pages, block_table, lengths, part_out, part_lse,
        float(scale) * LOG2E,
        q.stride(0), q.stride(1),
        k_pages.stride(0), k_pages.stride(1), k_pages.stride(2),
        v_pages.stride(0), v_pages.stride(1), v_pages.stride(2),
        block_table.stride(0),
        Hkv, G, D, num_splits,
        PAGE=page, BLOCK_T=block_t, BLOCK_G=max(16, next_pow2(G)), BLOCK_D=max(16, next_pow2(D)),
        PRECISION=dot_precision(q.dtype),
        num_warps=TUNE["num_warps"], num_stages=TUNE["num_stages"],
    )
    merge_splits(part_out, part_lse, out.view(B * Hq, D))
    return out


__all__ = ["paged_decode", "paged_decode_ref"]
