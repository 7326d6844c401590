"""Exact top-r and next-e selection per row, without a sort (the wave zones' cluster choice).

For row ``(s, h)`` of ``scores [S, H, W]`` with ``n = min(counts[s], W)`` valid entries (the rest
are never selected, whatever they hold), ``r = min(retrieve[s], n, R)`` and
``e = min(estimate[s], n - r, E)``, rank the valid entries by score, descending, ties by index
(lower first). Then

    ret[s, h, :r]  = the ids of ranks 0 .. r-1            ret[s, h, r:] = -1
    est[s, h, :e]  = the ids of ranks r .. r+e-1          est[s, h, e:] = -1

as sets: the order inside each set is unspecified (deterministic, not ranked). Scores are fp32,
never NaN; -0.0 equals +0.0.

Triton, on order-preserving int32 keys (fp32 bits, magnitude bits flipped for negatives), two
methods:

* ``row`` (rows up to ``TUNE["row_max"]`` entries): one program per row, one launch. The row's keys
  stay in registers; 32 bisection steps on the key value find the rank-r and the rank-(r+e)
  thresholds together (each step one count over the row, no histogram atomics); scans then place
  the selected ids, ties by index. ``select_zones_logits`` runs it on the logits pass of
  ``centroid_scores`` instead of finished scores: the row's softmax scores are formed in registers
  (no probs kernel, no scores written and read back).
* ``radix`` (longer rows, which one program would take too long over): 4 passes of 8-bit digits.
  Grid ``(S * H, splits)``, each program one contiguous chunk of its row's valid entries; the same
  kernel body runs 6 stages (launches):

* ``STAGE`` 0..3: histogram (256 bins) of digit ``STAGE`` of the keys whose higher digits equal
  those of the rank-r and the rank-(r+e) threshold found so far, added into ``hist`` atomically;
* ``STAGE`` 4: per chunk, the keys above each threshold and equal to it;
* ``STAGE`` 5: compaction; a chunk's output positions and its first tie's rank come from the
  counts of the chunks before it, so the output is deterministic; positions past r / e get -1.

Every program rebuilds the thresholds from the earlier stages' histograms (a scan of 2 x 256
counts per pass), so no stage writes state that another program of the same launch reads. No host
synchronisation and fixed output shapes: CUDA-graph capturable.
"""

from __future__ import annotations

import torch

from ._triton_util import (cdiv, check_last_contiguous, jit_helper, lazy_jit, next_pow2, pick_splits, tl,
                           use_triton)
from .centroid_scores import centroid_probs

# Launch parameters, the fastest of a sweep with bench_kernels --only select.
TUNE = {"block": 2048, "num_warps": 8, "waves": 4,   # radix: entries per loop step, warps, grid waves per SM
        "row_max": 16384,          # longest row for the one-launch method (at most 2**14: packed counts)
        "row_keys": 16}            # row method: keys per thread (sets its warps)


def _row_warps(block: int) -> int:
    return max(4, min(32, block // (32 * TUNE["row_keys"])))


@jit_helper
def _row_counts(row, HKV, cnt_ptr, ret_n_ptr, est_n_ptr, W, R, E):
    """Row ``row = s * HKV + h``'s (s, h, valid entries n, retrieval count r, estimation count e)."""
    s = (row // HKV).to(tl.int64)
    h = (row % HKV).to(tl.int64)
    n = tl.maximum(tl.minimum(tl.load(cnt_ptr + s).to(tl.int32), W), 0)
    r = tl.minimum(tl.maximum(tl.load(ret_n_ptr + s).to(tl.int32), 0), tl.minimum(n, R))
    e = tl.minimum(tl.maximum(tl.load(est_n_ptr + s).to(tl.int32), 0), tl.minimum(n - r, E))
    return s, h, n, r, e


@jit_helper
def _order_key(b):
    """int32 keys whose signed order is the float order of the fp32 bits ``b`` (-0.0 = +0.0)."""
    b = tl.where(b == -2147483648, 0, b)                                  # -0.0 -> +0.0
    return tl.where(b < 0, b ^ 0x7FFFFFFF, b)                             # flip negatives' magnitude


@lazy_jit
def _select_row_kernel(
    sc_ptr, cnt_ptr, ret_n_ptr, est_n_ptr, base_ptr, ret_ptr, est_ptr, pm_ptr, pl_ptr,
    stride_ss, stride_sh, stride_rs, stride_rh, stride_es, stride_eh, HKV, W, R, E, G, NUM_SPLITS,
    BLOCK: tl.constexpr, HAS_BASE: tl.constexpr, FROM_LOGITS: tl.constexpr, BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0)
    s, h, n, r, e = _row_counts(row, HKV, cnt_ptr, ret_n_ptr, est_n_ptr, W, R, E)

    offs = tl.arange(0, BLOCK)
    valid = offs < n
    if FROM_LOGITS:   # the scores of centroid_probs, from the logits pass (sc_ptr: z [rows * G, W])
        offs_s = tl.arange(0, BLOCK_S)
        x = tl.zeros([BLOCK], tl.float32)
        for g in range(G):
            zr = row.to(tl.int64) * G + g
            pm = tl.load(pm_ptr + zr * NUM_SPLITS + offs_s, mask=offs_s < NUM_SPLITS, other=float("-inf"))
            pl = tl.load(pl_ptr + zr * NUM_SPLITS + offs_s, mask=offs_s < NUM_SPLITS, other=0.0)
            m = tl.max(pm, axis=0)
            m_safe = tl.where(m == float("-inf"), 0.0, m)
            l_sum = tl.sum(pl * tl.exp2(pm - m_safe), axis=0)
            inv = tl.where(l_sum > 0.0, 1.0 / tl.where(l_sum > 0.0, l_sum, 1.0), 0.0)
            z = tl.load(sc_ptr + zr * W + offs, mask=valid, other=float("-inf"))
            x += tl.exp2(z - m_safe) * inv
        b = x.to(tl.int32, bitcast=True)
    else:
        b = tl.load(sc_ptr + s * stride_ss + h * stride_sh + offs, mask=valid, other=0.0).to(tl.int32, bitcast=True)
    # invalid entries: below every threshold tried (a valid key never is: those are NaN bits)
    key = tl.where(valid, _order_key(b), -2147483648)

    # The rank-r and rank-(r+e) keys: the largest t_r with count(key >= t_r) >= r, and t_k for
    # r + e. Invariant: count(>= lo) >= need > count(>= hi). Both counts come from one reduction
    # (t_k's in the high 16 bits; rows of at most 2**14 entries keep them apart).
    need_r = r
    need_k = r + e
    lo_r = tl.full([], -2147483648, tl.int64)
    hi_r = tl.full([], 2147483648, tl.int64)
    lo_k = lo_r
    hi_k = hi_r
    for _ in tl.static_range(32):
        mid_r = (lo_r + hi_r) >> 1
        mid_k = (lo_k + hi_k) >> 1
        c = tl.sum((key >= mid_r.to(tl.int32)).to(tl.int32) + ((key >= mid_k.to(tl.int32)).to(tl.int32) << 16))
        ok_r = (c & 0xFFFF) >= need_r
        ok_k = (c >> 16) >= need_k
        lo_r = tl.where(ok_r, mid_r, lo_r)
        hi_r = tl.where(ok_r, hi_r, mid_r)
        lo_k = tl.where(ok_k, mid_k, lo_k)
        hi_k = tl.where(ok_k, hi_k, mid_k)
    t_r = lo_r.to(tl.int32)
    t_k = lo_k.to(tl.int32)

    # Keys equal to a threshold: all of them are taken unless there are more than needed, then
    # the lowest indices (a scan, only in that rare case).
    gt = tl.sum((key > t_r).to(tl.int32) + ((key > t_k).to(tl.int32) << 16))
    eq = tl.sum((key == t_r).to(tl.int32) + ((key == t_k).to(tl.int32) << 16))
    take_r = need_r - (gt & 0xFFFF)
    take_k = need_k - (gt >> 16)
    in_r = key >= t_r
    in_k = key >= t_k
    if (take_r < (eq & 0xFFFF)) | (take_k < (eq >> 16)):
        tie_r = key == t_r
        tie_k = key == t_k
        c_tie = tl.cumsum(tie_r.to(tl.int32) + (tie_k.to(tl.int32) << 16), axis=0)
        in_r = (key > t_r) | (tie_r & ((c_tie & 0xFFFF) <= take_r))
        in_k = (key > t_k) | (tie_k & ((c_tie >> 16) <= take_k))
    in_r = in_r & valid            # need 0: t = 2**31 - 1, above every valid key
    in_e = in_k & valid & ~in_r
    pos = tl.cumsum(in_r.to(tl.int32) + (in_e.to(tl.int32) << 16), axis=0)
    p_r = (pos & 0xFFFF) - 1
    p_e = (pos >> 16) - 1
    ret_row = ret_ptr + s * stride_rs + h * stride_rh
    est_row = est_ptr + s * stride_es + h * stride_eh
    ret_base = 0
    if HAS_BASE:   # pool ids
        ret_base = tl.load(base_ptr + s).to(tl.int32)
    tl.store(ret_row + p_r, offs + ret_base, mask=in_r & (p_r < R))
    tl.store(est_row + p_e, offs, mask=in_e & (p_e < E))
    tl.store(ret_row + offs, -1, mask=(offs >= r) & (offs < R))
    tl.store(est_row + offs, -1, mask=(offs >= e) & (offs < E))


@lazy_jit
def _select_kernel(
    sc_ptr, cnt_ptr, ret_n_ptr, est_n_ptr, base_ptr, hist_ptr, part_ptr, ret_ptr, est_ptr,
    stride_ss, stride_sh, stride_rs, stride_rh, stride_es, stride_eh,
    HKV, W, R, E, ROWS, NUM_SPLITS,
    STAGE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_SPLITS: tl.constexpr, HAS_BASE: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    s, h, n, r, e = _row_counts(row, HKV, cnt_ptr, ret_n_ptr, est_n_ptr, W, R, E)

    # Thresholds so far. Lane 0: rank r (retrieval), lane 1: rank r + e. `pre` holds the digits
    # found (unsigned key bits), `need` how many keys sharing them are still to be taken.
    two = tl.arange(0, 2)
    bins = tl.arange(0, 256)
    need = tl.where(two == 0, r, r + e)
    pre = tl.zeros([2], tl.int32)
    for q in tl.static_range(4):
        if q < STAGE:
            hq = tl.load(hist_ptr + (q * ROWS + row) * 512 + two[:, None] * 256 + bins[None, :])
            above = tl.sum(hq, axis=1)[:, None] - tl.cumsum(hq, axis=1)   # keys of a larger digit
            d = tl.sum((above + hq >= need[:, None]).to(tl.int32), axis=1) - 1
            need -= tl.sum(tl.where(bins[None, :] == d[:, None], above, 0), axis=1)
            pre = pre | (d << (24 - 8 * q))
    pre_r = tl.sum(tl.where(two == 0, pre, 0))
    pre_k = tl.sum(tl.where(two == 1, pre, 0))

    n_blocks = tl.cdiv(n, BLOCK)
    per = tl.cdiv(n_blocks, NUM_SPLITS)
    lo = split * per * BLOCK
    hi = tl.minimum(lo + per * BLOCK, n)
    offs = tl.arange(0, BLOCK)
    sc_row = sc_ptr + s * stride_ss + h * stride_sh

    if STAGE < 4:
        SHIFT = 24 - 8 * STAGE
        acc_r = tl.zeros([256], tl.int32)
        acc_k = tl.zeros([256], tl.int32)
        for start in range(lo, hi, BLOCK):
            idx = start + offs
            valid = idx < hi
            b = tl.load(sc_row + idx, mask=valid, other=0.0).to(tl.int32, bitcast=True)
            u = _order_key(b) ^ -2147483648                               # unsigned order = float order
            digit = (u >> SHIFT) & 255    # int32 shifts are arithmetic: masked here, compared for equality below
            if STAGE == 0:
                acc_r += tl.histogram(digit, 256, mask=valid)
            else:
                acc_r += tl.histogram(digit, 256, mask=valid & ((u >> (SHIFT + 8)) == (pre_r >> (SHIFT + 8))))
                acc_k += tl.histogram(digit, 256, mask=valid & ((u >> (SHIFT + 8)) == (pre_k >> (SHIFT + 8))))
        out = hist_ptr + (STAGE * ROWS + row) * 512 + bins
        tl.atomic_add(out, acc_r)
        tl.atomic_add(out + 256, acc_r if STAGE == 0 else acc_k)
    else:
        t_r = pre_r ^ -2147483648                                         # back to signed keys
        t_k = pre_k ^ -2147483648
        need_r = tl.sum(tl.where(two == 0, need, 0))
        need_k = tl.sum(tl.where(two == 1, need, 0))
        part = part_ptr + row * NUM_SPLITS * 4
        if STAGE == 4:
            gt_r = 0
            eq_r = 0
            gt_k = 0
            eq_k = 0
        else:   # counts of the chunks before this one
            sp = tl.arange(0, BLOCK_SPLITS)
            before = sp < split
            gt_r = tl.sum(tl.load(part + sp * 4 + 0, mask=before, other=0))
            eq_r = tl.sum(tl.load(part + sp * 4 + 1, mask=before, other=0))
            gt_k = tl.sum(tl.load(part + sp * 4 + 2, mask=before, other=0))
            eq_k = tl.sum(tl.load(part + sp * 4 + 3, mask=before, other=0))
        ret_base = 0
        if HAS_BASE:   # pool ids
            ret_base = tl.load(base_ptr + s).to(tl.int32)
        taken_r = gt_r + tl.minimum(eq_r, need_r)       # ranks < r before this chunk
        pos_r = taken_r
        pos_e = gt_k + tl.minimum(eq_k, need_k) - taken_r
        for start in range(lo, hi, BLOCK):
            idx = start + offs
            valid = idx < hi
            b = tl.load(sc_row + idx, mask=valid, other=0.0).to(tl.int32, bitcast=True)
            key = _order_key(b)                                           # signed order = float order
            tie_r = valid & (key == t_r)
            tie_k = valid & (key == t_k)
            if STAGE == 4:
                gt_r += tl.sum((valid & (key > t_r)).to(tl.int32))
                gt_k += tl.sum((valid & (key > t_k)).to(tl.int32))
            else:
                c_r = tl.cumsum(tie_r.to(tl.int32), axis=0)              # inclusive tie ranks
                c_k = tl.cumsum(tie_k.to(tl.int32), axis=0)
                in_r = valid & ((key > t_r) | (tie_r & (eq_r + c_r <= need_r)))
                in_k = valid & ((key > t_k) | (tie_k & (eq_k + c_k <= need_k)))
                in_e = in_k & ~in_r
                p_r = pos_r + tl.cumsum(in_r.to(tl.int32), axis=0) - 1
                p_e = pos_e + tl.cumsum(in_e.to(tl.int32), axis=0) - 1
                tl.store(ret_ptr + s * stride_rs + h * stride_rh + p_r, idx + ret_base, mask=in_r & (p_r < R))
                tl.store(est_ptr + s * stride_es + h * stride_eh + p_e, idx, mask=in_e & (p_e < E))
                pos_r += tl.sum(in_r.to(tl.int32))
                pos_e += tl.sum(in_e.to(tl.int32))
            eq_r += tl.sum(tie_r.to(tl.int32))
            eq_k += tl.sum(tie_k.to(tl.int32))
        if STAGE == 4:
            tl.store(part + split * 4 + tl.arange(0, 4),
                     tl.where(tl.arange(0, 4) == 0, gt_r, tl.where(tl.arange(0, 4) == 1, eq_r,
                              tl.where(tl.arange(0, 4) == 2, gt_k, eq_k))))
        else:   # padding, spread over the row's programs
            for t in range(r + split * BLOCK, R, NUM_SPLITS * BLOCK):
                tl.store(ret_ptr + s * stride_rs + h * stride_rh + t + offs, -1, mask=t + offs < R)
            for t in range(e + split * BLOCK, E, NUM_SPLITS * BLOCK):
                tl.store(est_ptr + s * stride_es + h * stride_eh + t + offs, -1, mask=t + offs < E)


def _check(scores, counts, retrieve, estimate, R, E):
    assert scores.dim() == 3 and scores.dtype == torch.float32, (scores.shape, scores.dtype)
    S, H, W = scores.shape
    for name, t in (("counts", counts), ("retrieve", retrieve), ("estimate", estimate)):
        assert t.shape == (S,) and not t.is_floating_point(), f"{name}: {t.shape} {t.dtype}"
        assert t.device == scores.device, f"{name} on {t.device}, scores on {scores.device}"
    assert 0 <= R <= W and 0 <= E <= W, (R, E, W)
    return S, H, W


def select_zones_ref(scores, counts, retrieve, estimate, R: int, E: int, base=None):
    """Plain-torch ``select_zones`` (a stable sort); the CPU path and the test oracle."""
    S, H, W = _check(scores, counts, retrieve, estimate, R, E)
    dev = scores.device
    n = counts.long().clamp(0, W)
    r = torch.minimum(retrieve.long().clamp(min=0), n.clamp(max=R))
    e = torch.minimum(estimate.long().clamp(min=0), (n - r).clamp(max=E))
    col = torch.arange(W, device=dev)
    x = scores.masked_fill(col >= n[:, None, None], float("-inf"))     # invalid: last (highest index)
    order = torch.sort(x + 0.0, dim=-1, descending=True, stable=True).indices.to(torch.int32)
    if W == 0:
        order = order.new_zeros(S, H, 1)

    def ranks(first, width, count):
        j = torch.arange(width, device=dev)
        pos = (first[:, None] + j).clamp(max=order.shape[-1] - 1)[:, None, :].expand(S, H, width)
        return torch.where((j < count[:, None])[:, None, :], order.gather(2, pos), -1)
    ret = ranks(torch.zeros_like(r), R, r)
    if base is not None:
        ret = torch.where(ret >= 0, ret + base.to(ret.dtype)[:, None, None], -1)
    return ret, ranks(r, E, e)


def select_zones(scores: torch.Tensor, counts: torch.Tensor, retrieve: torch.Tensor,
                 estimate: torch.Tensor, R: int, E: int, base: torch.Tensor | None = None,
                 num_splits: int | None = None, method: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Retrieval and estimation ids of every row, without a sort (see the module docstring).

    scores: [S, H, W] float32 (last dim contiguous); counts, retrieve, estimate: [S] int.
    R, E (<= W): static widths of the outputs. Returns ``ret [S, H, R]`` and ``est [S, H, E]``
    int32 local ids (0 .. W-1), padded with -1; with ``base`` ([S] int) the retrieval ids are
    ``base[s] +`` the local id (pool ids, still int32). ``method``: "row" or "radix" (default: "row" up
    to ``TUNE["row_max"]`` entries per row); ``num_splits`` overrides radix's programs per row.
    """
    if not use_triton(scores, counts, retrieve, estimate):
        return select_zones_ref(scores, counts, retrieve, estimate, R, E, base)
    S, H, W = _check(scores, counts, retrieve, estimate, R, E)
    check_last_contiguous("scores", scores)
    dev = scores.device
    ret = torch.empty(S, H, R, device=dev, dtype=torch.int32)
    est = torch.empty(S, H, E, device=dev, dtype=torch.int32)
    rows = S * H
    if rows == 0 or R + E == 0:
        return ret, est
    counts, retrieve, estimate = counts.contiguous(), retrieve.contiguous(), estimate.contiguous()
    base = _check_base(base, S, dev)
    if method is None:
        method = "row" if W <= TUNE["row_max"] else "radix"
    assert method in ("row", "radix"), method
    if method == "row":
        _launch_row(scores, counts, retrieve, estimate, base, ret, est, None)
        return ret, est
    block = TUNE["block"]
    max_blocks = max(1, cdiv(W, block))
    num_splits = pick_splits(rows, max_blocks, dev, TUNE["waves"], num_splits)
    hist = torch.zeros(4, rows, 2, 256, device=dev, dtype=torch.int32)
    part = torch.empty(rows, num_splits, 4, device=dev, dtype=torch.int32)
    for stage in range(6):
        _select_kernel[(rows, num_splits)](
            scores, counts, retrieve, estimate, base if base is not None else counts, hist, part, ret, est,
            scores.stride(0), scores.stride(1), ret.stride(0), ret.stride(1), est.stride(0), est.stride(1),
            H, W, R, E, rows, num_splits,
            STAGE=stage, BLOCK=block, BLOCK_SPLITS=next_pow2(max(num_splits, 2)), HAS_BASE=base is not None,
            num_warps=TUNE["num_warps"],
        )
    return ret, est


def _check_base(base, S: int, dev) -> torch.Tensor | None:
    """The slots' pool offsets [S] int (or None), contiguous."""
    if base is None:
        return None
    assert base.shape == (S,) and not base.is_floating_point() and base.device == dev, (base.shape, base.dtype)
    return base.contiguous()


def _launch_row(scores, counts, retrieve, estimate, base, ret, est, logits) -> None:
    """The one-launch method; `logits` (a CentroidLogits, `scores` its z) has it compute the scores."""
    S, H, R = ret.shape
    E, W = est.shape[2], (logits.shape[3] if logits is not None else scores.shape[2])
    assert W <= 2 ** 14, f"method 'row' takes rows of at most 16384 entries, not {W}"
    block = next_pow2(max(W, 16))
    splits = logits.pm.shape[1] if logits is not None else 1
    pm, pl = (logits.pm, logits.pl) if logits is not None else (counts, counts)
    _select_row_kernel[(S * H,)](
        scores, counts, retrieve, estimate, base if base is not None else counts, ret, est, pm, pl,
        scores.stride(0), scores.stride(1), ret.stride(0), ret.stride(1), est.stride(0), est.stride(1),
        H, W, R, E, logits.shape[2] if logits is not None else 1, splits,
        BLOCK=block, HAS_BASE=base is not None, FROM_LOGITS=logits is not None,
        BLOCK_S=next_pow2(max(splits, 2)), num_warps=_row_warps(block),
    )


def select_zones_logits(logits, counts: torch.Tensor, retrieve: torch.Tensor, estimate: torch.Tensor,
                        R: int, E: int, base: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``select_zones(centroid_probs(logits, counts), ...)`` with the scores computed inside the
    one-launch method when a row fits it: one kernel and one pass over the scores fewer. The
    selection is exact for the scores as this kernel rounds them (the probs kernel may round the
    last bit differently). ``logits``: a ``centroid_scores.CentroidLogits`` of shape [S, H, G, W]."""
    S, H, G, W = logits.shape
    if not use_triton(logits.z, counts) or W > TUNE["row_max"] or S * H == 0 or R + E == 0:
        return select_zones(centroid_probs(logits, counts), counts, retrieve, estimate, R, E, base=base)
    assert 0 <= R <= W and 0 <= E <= W, (R, E, W)
    dev = logits.z.device
    ret = torch.empty(S, H, R, device=dev, dtype=torch.int32)
    est = torch.empty(S, H, E, device=dev, dtype=torch.int32)
    base = _check_base(base, S, dev)
    _launch_row(logits.z, counts.contiguous(), retrieve.contiguous(), estimate.contiguous(), base, ret, est, logits)
    return ret, est


__all__ = ["select_zones", "select_zones_logits", "select_zones_ref"]
