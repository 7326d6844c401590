"""Second stage of split-K (flash-decoding) attention: merge per-split partial softmax states.

Row ``r`` has ``S`` partial states ``(o_rs, lse_rs)`` where ``o_rs`` is the split's normalised
output and ``lse_rs = log(sum_{j in split s} exp(score_j))`` (``-inf`` for an empty split).
The merged state is

    lse_r = log(sum_s exp(lse_rs)),        o_r = sum_s exp(lse_rs - lse_r) * o_rs,

with ``o_r = 0, lse_r = -inf`` when every split is empty. Used by ``paged_decode`` and
``weighted_decode``; the CPU path of those never reaches here.
"""

from __future__ import annotations

import torch

from ._triton_util import lazy_jit, next_pow2, tl


@lazy_jit
def _merge_splits_kernel(
    po_ptr, pl_ptr, out_ptr, lse_ptr,
    NUM_SPLITS, D,
    stride_out,
    WRITE_LSE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    smask = offs_s < NUM_SPLITS
    dmask = offs_d < D
    lse = tl.load(pl_ptr + row * NUM_SPLITS + offs_s, mask=smask, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m_safe)
    sw = tl.sum(w, axis=0)
    po = tl.load(po_ptr + (row * NUM_SPLITS + offs_s)[:, None] * D + offs_d[None, :],
                 mask=smask[:, None] & dmask[None, :], other=0.0)
    # An empty split stores o = 0, so w * o stays finite; an all-empty row gives 0 / 1.
    o = tl.sum(w[:, None] * po, axis=0) / tl.where(sw == 0.0, 1.0, sw)
    tl.store(out_ptr + row * stride_out + offs_d, o.to(out_ptr.dtype.element_ty), mask=dmask)
    if WRITE_LSE:
        lse_r = tl.where(sw == 0.0, float("-inf"), m_safe + tl.log(tl.where(sw == 0.0, 1.0, sw)))
        tl.store(lse_ptr + row, lse_r)


def merge_splits(part_out: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor | None = None) -> None:
    """Merge ``part_out [R, S, D]`` fp32 / ``part_lse [R, S]`` fp32 into ``out [R, D]`` (any float
    dtype, rows may be strided) and optionally ``lse [R]`` fp32, in place."""
    R, S, D = part_out.shape
    assert part_out.dtype == torch.float32 and part_lse.dtype == torch.float32
    assert part_out.is_contiguous() and part_lse.is_contiguous() and part_lse.shape == (R, S)
    assert out.shape == (R, D) and out.stride(1) == 1
    if lse is not None:
        assert lse.shape == (R,) and lse.dtype == torch.float32 and lse.is_contiguous()
    if R == 0:
        return
    _merge_splits_kernel[(R,)](
        part_out, part_lse, out, lse if lse is not None else part_lse,
        S, D, out.stride(0),
        WRITE_LSE=lse is not None, BLOCK_S=next_pow2(max(S, 2)), BLOCK_D=next_pow2(max(D, 16)),
        num_warps=4 if D > 64 else 2,
    )
