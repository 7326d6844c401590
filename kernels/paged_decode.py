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

from ._online_softmax import softmax_state, softmax_step, split_blocks, store_split, tile_offsets
from ._triton_util import (FLOAT_DTYPES, LOG2E, cdiv, check_last_contiguous, dot_precision, lazy_jit,
                           next_pow2, pick_splits, tl, use_triton)
from .split_reduce import merge_splits, split_states

# Launch parameters (tokens per loop step, warps, pipeline depth, grid waves per SM), the fastest
# of a sweep with bench_kernels --only paged_decode.
TUNE = {"block_t": 32, "num_warps": 4, "num_stages": 3, "waves": 4}


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
    blk_begin, blk_end = split_blocks(length, BLOCK_T, NUM_SPLITS, split)

    offs_g, offs_d, offs_t, gmask, dmask = tile_offsets(G, D, BLOCK_G, BLOCK_D, BLOCK_T)
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + (hk * G + offs_g)[:, None] * stride_qh
                + offs_d[None, :], mask=gmask[:, None] & dmask[None, :], other=0.0)
    k_base = k_ptr + hk.to(tl.int64) * stride_kh
    v_base = v_ptr + hk.to(tl.int64) * stride_vh
    bt_row = bt_ptr + b.to(tl.int64) * stride_btb

    m_i, l_i, acc = softmax_state(BLOCK_G, BLOCK_D)
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
        m_i, l_i, acc = softmax_step(m_i, l_i, acc, s, tmask, v, PRECISION)
    store_split(po_ptr, pl_ptr, pid, split, G, D, NUM_SPLITS, m_i, l_i, acc, offs_g, offs_d, gmask, dmask)


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
    num_splits = pick_splits(B * Hkv, max_blocks, q.device, TUNE["waves"], num_splits)
    part_out, part_lse = split_states(B * Hq, num_splits, D, q.device)
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
