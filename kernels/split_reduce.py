"""Second stage of split-K (flash-decoding) attention: merge per-split partial softmax states.

Row ``r`` has ``S`` partial states ``(o_rs, lse_rs)`` where ``o_rs`` is the split's normalised
output and ``lse_rs = log(sum_{j in split s} exp(score_j))`` (``-inf`` for an empty split).
The merged state is

    lse_r = log(sum_s exp(lse_rs)),        o_r = sum_s exp(lse_rs - lse_r) * o_rs,

with ``o_r = 0, lse_r = -inf`` when every split is empty. ``merge_partials`` merges up to three
sets of splits over the same rows in one launch: the wave decode's steady, retrieval and
estimation zones, each computed split-K by its own kernel, merge here with no per-zone step.
Used by ``paged_decode``, ``weighted_decode`` and the wave decode.
"""

from __future__ import annotations

import torch

from ._triton_util import cdiv, lazy_jit, next_pow2, tl, use_triton

MAX_SETS = 3


@lazy_jit
def _merge_splits_kernel(
    po0, pl0, S0, po1, pl1, S1, po2, pl2, S2, out_ptr, lse_ptr, slot_ptr,
    D, stride_out, PER,
    WRITE_LSE: tl.constexpr, BLOCK_S: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_SLOTS: tl.constexpr,
):
    # grid (output rows, D / BLOCK_D); the splits' outputs stream through in CHUNK-row tiles (a
    # whole [splits, D] tile in registers spills once a row has hundreds of splits)
    r_out = tl.program_id(0).to(tl.int64)
    row = r_out
    if HAS_SLOTS:   # output row i merges state row slots[i // PER] * PER + i % PER
        row = tl.load(slot_ptr + r_out // PER).to(tl.int64) * PER + r_out % PER
    offs_s = tl.arange(0, BLOCK_S)
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    # Sets past the last given have 0 splits: fully masked, they add nothing.
    l0 = tl.load(pl0 + row * S0 + offs_s, mask=offs_s < S0, other=float("-inf"))
    l1 = tl.load(pl1 + row * S1 + offs_s, mask=offs_s < S1, other=float("-inf"))
    l2 = tl.load(pl2 + row * S2 + offs_s, mask=offs_s < S2, other=float("-inf"))
    m = tl.maximum(tl.maximum(tl.max(l0, axis=0), tl.max(l1, axis=0)), tl.max(l2, axis=0))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    sw = tl.sum(tl.exp(l0 - m_safe), axis=0) + tl.sum(tl.exp(l1 - m_safe), axis=0) \
        + tl.sum(tl.exp(l2 - m_safe), axis=0)
    # An empty split stores o = 0, so w * o stays finite; an all-empty row gives 0 / 1.
    o = tl.zeros([BLOCK_D], tl.float32)
    for c in range(0, S0, CHUNK):
        sm = c + offs_c < S0
        w = tl.exp(tl.load(pl0 + row * S0 + c + offs_c, mask=sm, other=float("-inf")) - m_safe)
        o += tl.sum(w[:, None] * tl.load(po0 + (row * S0 + c + offs_c)[:, None] * D + offs_d[None, :],
                                         mask=sm[:, None] & dmask[None, :], other=0.0), axis=0)
    for c in range(0, S1, CHUNK):
        sm = c + offs_c < S1
        w = tl.exp(tl.load(pl1 + row * S1 + c + offs_c, mask=sm, other=float("-inf")) - m_safe)
        o += tl.sum(w[:, None] * tl.load(po1 + (row * S1 + c + offs_c)[:, None] * D + offs_d[None, :],
                                         mask=sm[:, None] & dmask[None, :], other=0.0), axis=0)
    for c in range(0, S2, CHUNK):
        sm = c + offs_c < S2
        w = tl.exp(tl.load(pl2 + row * S2 + c + offs_c, mask=sm, other=float("-inf")) - m_safe)
        o += tl.sum(w[:, None] * tl.load(po2 + (row * S2 + c + offs_c)[:, None] * D + offs_d[None, :],
                                         mask=sm[:, None] & dmask[None, :], other=0.0), axis=0)
    o = o / tl.where(sw == 0.0, 1.0, sw)
    tl.store(out_ptr + r_out * stride_out + offs_d, o.to(out_ptr.dtype.element_ty), mask=dmask)
    if WRITE_LSE:
        if tl.program_id(1) == 0:
            lse_r = tl.where(sw == 0.0, float("-inf"), m_safe + tl.log(tl.where(sw == 0.0, 1.0, sw)))
            tl.store(lse_ptr + r_out, lse_r)


def split_states(rows: int, splits: int, D: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Scratch for the first stage's partial states: ``part_out [rows, splits, D]`` and
    ``part_lse [rows, splits]``, fp32, uninitialised (every split of every row is written)."""
    return (torch.empty(rows, splits, D, device=device, dtype=torch.float32),
            torch.empty(rows, splits, device=device, dtype=torch.float32))


def _check(parts, out, lse, slots=None):
    assert 1 <= len(parts) <= MAX_SETS, f"1..{MAX_SETS} sets of partial states, got {len(parts)}"
    R, D = out.shape
    assert out.stride(1) == 1
    rows = parts[0][0].shape[0] if slots is not None else R
    if slots is not None:
        assert slots.dim() == 1 and not slots.is_floating_point() and R % max(1, slots.shape[0]) == 0, \
            (slots.shape, out.shape)
    for po, pl in parts:
        assert po.dtype == torch.float32 and pl.dtype == torch.float32
        assert po.is_contiguous() and pl.is_contiguous()
        assert po.shape[0] == rows and po.shape[2] == D and pl.shape == po.shape[:2], (po.shape, pl.shape, out.shape)
    if lse is not None:
        assert lse.shape == (R,) and lse.dtype == torch.float32 and lse.is_contiguous()
    return R, D


def _slot_rows(slots, per: int) -> torch.Tensor:
    return (slots.long()[:, None] * per + torch.arange(per, device=slots.device)).flatten()


def merge_partials_ref(parts, out: torch.Tensor, lse: torch.Tensor | None = None,
                       slots: torch.Tensor | None = None) -> None:
    """Plain-torch ``merge_partials`` (the CPU path and the test oracle)."""
    R, _ = _check(parts, out, lse, slots)
    po = torch.cat([p for p, _ in parts], 1)
    pl = torch.cat([p for _, p in parts], 1)
    if slots is not None:
        rows = _slot_rows(slots, R // max(1, slots.shape[0]))
        po, pl = po[rows], pl[rows]
    m = pl.max(dim=1).values
    m_safe = torch.where(torch.isinf(m) & (m < 0), 0.0, m)
    w = torch.exp(pl - m_safe[:, None])
    sw = w.sum(1)
    out.copy_((w[..., None] * po).sum(1) / torch.where(sw == 0, 1.0, sw)[:, None])
    if lse is not None:
        lse.copy_(torch.where(sw == 0, float("-inf"), m_safe + torch.log(torch.where(sw == 0, 1.0, sw))))


def merge_partials(parts, out: torch.Tensor, lse: torch.Tensor | None = None,
                   slots: torch.Tensor | None = None) -> None:
    """Merge sets of partial states ``parts = [(part_out [R, S_i, D] fp32, part_lse [R, S_i] fp32),
    ...]`` (1 to 3 sets, contiguous) into ``out [R, D]`` (any float dtype, rows may be strided)
    and optionally ``lse [R]`` fp32, in place: one launch whatever the number of sets.
    ``slots`` ([B] int, B dividing R, P = R / B): output row ``i`` merges the states' row
    ``slots[i // P] * P + i % P`` (the states cover every slot; the output only the batch's)."""
    if not use_triton(out, *(t for p in parts for t in p)):
        return merge_partials_ref(parts, out, lse, slots)
    R, D = _check(parts, out, lse, slots)
    if R == 0:
        return
    sets = list(parts) + [parts[0]] * (MAX_SETS - len(parts))
    counts = [p.shape[1] for p, _ in parts] + [0] * (MAX_SETS - len(parts))
    block_d = min(64, next_pow2(max(D, 16)))
    _merge_splits_kernel[(R, cdiv(D, block_d))](
        sets[0][0], sets[0][1], counts[0], sets[1][0], sets[1][1], counts[1], sets[2][0], sets[2][1], counts[2],
        out, lse if lse is not None else sets[0][1], slots if slots is not None else sets[0][1],
        D, out.stride(0), R // max(1, slots.shape[0]) if slots is not None else 1,
        WRITE_LSE=lse is not None, BLOCK_S=next_pow2(max(*counts, 2)), CHUNK=32, BLOCK_D=block_d,
        HAS_SLOTS=slots is not None, num_warps=2,
    )


def merge_splits(part_out: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor | None = None) -> None:
    """Merge ``part_out [R, S, D]`` fp32 / ``part_lse [R, S]`` fp32 into ``out [R, D]`` (any float
    dtype, rows may be strided) and optionally ``lse [R]`` fp32, in place."""
    merge_partials([(part_out, part_lse)], out, lse)
