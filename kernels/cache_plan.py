"""The GPU cluster cache's per-step bookkeeping (wave/cache.py) in one launch: hits, LRU victims
for the misses, and the map updates.

Per KV head ``h``, with ``ids[s, h, r]`` the clusters retrieved this step (-1: none; no cluster
twice per head), the maps ``slot_of [H, C + 1]`` (cluster -> slot or -1), ``cluster_of
[H, slots + 1]`` (slot -> cluster or -1), ``last_use [H, slots + 1]`` (slot -> step stamp, -1:
never) and the step counter ``clock [H]`` (the last column of each map is a sentinel, untouched):

1. ``clock[h] += 1``; a retrieved cluster with a slot is a hit: ``read = slot``, its stamp
   becomes ``clock[h]``;
2. ``take = min(misses, slots not hit this step)``; the victims are the ``take`` least recently
   used slots (lower stamp first, ties: lower slot first);
3. the misses, in (s, r) order, are admitted into the victims, in slot order: ``write = victim``,
   the victim's old cluster forgets its slot, the maps point at each other, the stamp is
   ``clock[h]``. Misses past ``take`` are not admitted (``write = -1``).

A hit's slot is never a victim (its stamp is the newest and ``take`` excludes it), so a write slot
is never read in the same step. Triton: one program per head; the victims come from a bisection
on the stamp (one count over the slots per step) and a scan, not a sort. No host synchronisation:
CUDA-graph capturable. ``stats`` ([2] int64, optional) accumulates retrieved and hit counts.
"""

from __future__ import annotations

import torch

from ._triton_util import jit_helper, lazy_jit, next_pow2, tl, use_triton

# Launch parameters: the caps of the chunks of ids and of slot stamps that one loop step takes (a
# smaller problem takes one chunk of its own size, at least MIN_BLOCK), and warps.
TUNE = {"block_ids": 2048, "block_slots": 4096, "num_warps": 8}
MIN_BLOCK = 16


@jit_helper
def _ids_chunk(ids_ptr, j0, offs_i, n, R, h, stride_is, stride_ih):
    """Entries ``j0 + offs_i`` of head h's ids in (s, r) order: (in range, s, r, cluster id or -1)."""
    j = j0 + offs_i
    m = j < n
    s = (j // R).to(tl.int64)
    r = j % R
    cid = tl.load(ids_ptr + s * stride_is + h * stride_ih + r, mask=m, other=-1).to(tl.int64)
    return m, s, r, cid


@lazy_jit
def _cache_plan_kernel(
    ids_ptr, slot_of_ptr, cluster_of_ptr, last_use_ptr, clock_ptr, victims_ptr,
    read_ptr, write_ptr, hit_ptr, stats_ptr,
    stride_is, stride_ih, S, H, R, C, SLOTS,
    BLOCK_I: tl.constexpr, BLOCK_S: tl.constexpr, HAS_STATS: tl.constexpr,
):
    h = tl.program_id(0).to(tl.int64)
    now = tl.load(clock_ptr + h) + 1
    tl.store(clock_ptr + h, now)
    so = slot_of_ptr + h * (C + 1)
    co = cluster_of_ptr + h * (SLOTS + 1)
    lu = last_use_ptr + h * (SLOTS + 1)
    vic = victims_ptr + h * SLOTS
    n = S * R
    offs_i = tl.arange(0, BLOCK_I)
    offs_s = tl.arange(0, BLOCK_S)

    # 1. hits
    n_valid = 0
    n_miss = 0
    for j0 in range(0, n, BLOCK_I):
        m, s, r, cid = _ids_chunk(ids_ptr, j0, offs_i, n, R, h, stride_is, stride_ih)
        valid = cid >= 0
        slot = tl.load(so + cid, mask=valid, other=-1)
        hit = valid & (slot >= 0)
        tl.store(lu + slot, now, mask=hit)
        out = (s * H + h) * R + r
        tl.store(read_ptr + out, tl.where(hit, slot, -1), mask=m)
        tl.store(hit_ptr + out, hit, mask=m)
        n_valid += tl.sum(valid.to(tl.int32))
        n_miss += tl.sum((valid & ~hit).to(tl.int32))
    tl.debug_barrier()

    # 2. victims: t = the smallest stamp with count(stamp <= t) >= take, then a scan in slot order
    n_avail = 0
    oldest = now
    for k0 in range(0, SLOTS, BLOCK_S):
        k = k0 + offs_s
        u = tl.load(lu + k, mask=k < SLOTS, other=now)
        n_avail += tl.sum((u < now).to(tl.int32))
        oldest = tl.minimum(oldest, tl.min(u, axis=0))
    take = tl.minimum(n_miss, n_avail)
    # count(<= lo) < take <= count(<= hi); a busy cache's stamps span few steps: few iterations
    lo = oldest - 1
    hi = now - 1
    if take == 0:
        hi = lo
    while hi - lo > 1:
        mid = (lo + hi) >> 1
        cnt = 0
        for k0 in range(0, SLOTS, BLOCK_S):
            k = k0 + offs_s
            u = tl.load(lu + k, mask=k < SLOTS, other=now)
            cnt += tl.sum((u <= mid).to(tl.int32))
        if cnt >= take:
            hi = mid
        else:
            lo = mid
    t = hi
    below = 0
    for k0 in range(0, SLOTS, BLOCK_S):
        k = k0 + offs_s
        u = tl.load(lu + k, mask=k < SLOTS, other=now)
        below += tl.sum((u < t).to(tl.int32))
    take_eq = take - below
    placed = 0
    ties = 0
    for k0 in range(0, SLOTS, BLOCK_S):
        k = k0 + offs_s
        u = tl.load(lu + k, mask=k < SLOTS, other=now)
        tie = u == t
        chosen = (u < t) | (tie & (ties + tl.cumsum(tie.to(tl.int32), axis=0) <= take_eq))
        p = placed + tl.cumsum(chosen.to(tl.int32), axis=0) - 1
        tl.store(vic + p, k, mask=chosen)
        placed += tl.sum(chosen.to(tl.int32))
        ties += tl.sum(tie.to(tl.int32))
    tl.debug_barrier()

    # 3. admissions
    ranked = 0
    for j0 in range(0, n, BLOCK_I):
        m, s, r, cid = _ids_chunk(ids_ptr, j0, offs_i, n, R, h, stride_is, stride_ih)
        out = (s * H + h) * R + r
        miss = (cid >= 0) & (tl.load(read_ptr + out, mask=m, other=0) < 0)
        rank = ranked + tl.cumsum(miss.to(tl.int32), axis=0) - 1
        admit = miss & (rank < take)
        victim = tl.load(vic + rank, mask=admit, other=0).to(tl.int64)
        old = tl.load(co + victim, mask=admit, other=-1)
        tl.store(so + old, -1, mask=admit & (old >= 0))
        tl.store(so + cid, victim.to(tl.int32), mask=admit)
        tl.store(co + victim, cid, mask=admit)
        tl.store(lu + victim, now, mask=admit)
        tl.store(write_ptr + out, tl.where(admit, victim, -1).to(tl.int32), mask=m)
        ranked += tl.sum(miss.to(tl.int32))
    if HAS_STATS:
        tl.atomic_add(stats_ptr, n_valid.to(tl.int64))
        tl.atomic_add(stats_ptr + 1, (n_valid - n_miss).to(tl.int64))


def _check(ids, slot_of, cluster_of, last_use, clock, stats):
    S, H, R = ids.shape
    assert slot_of.dim() == 2 and slot_of.shape[0] == H and slot_of.dtype == torch.int32
    assert cluster_of.shape == last_use.shape and cluster_of.shape[0] == H
    assert cluster_of.dtype == last_use.dtype == clock.dtype == torch.int64 and clock.shape == (H,)
    assert stats is None or (stats.shape == (2,) and stats.dtype == torch.int64)
    for t in (slot_of, cluster_of, last_use, clock):
        assert t.is_contiguous()
    return S, H, R, slot_of.shape[1] - 1, cluster_of.shape[1] - 1


def cache_plan_ref(ids, slot_of, cluster_of, last_use, clock, stats=None):
    """Plain-torch `cache_plan` (a stable sort for the victims); the CPU path and the test oracle."""
    S, H, R, C, slots = _check(ids, slot_of, cluster_of, last_use, clock, stats)
    clock += 1
    now = clock[:, None]
    flat = ids.transpose(0, 1).reshape(H, S * R).long()
    valid = flat >= 0
    slot = slot_of.gather(1, torch.where(valid, flat, C)).long()
    hit = valid & (slot >= 0)
    last_use.scatter_(1, torch.where(hit, slot, slots), now.expand(H, S * R))
    miss = valid & ~hit
    lu = last_use[:, :slots]
    take = torch.minimum(miss.sum(1), (lu < now).sum(1))[:, None]
    order = torch.sort(lu, dim=1, stable=True).indices
    chosen = torch.zeros_like(lu, dtype=torch.bool).scatter_(
        1, order, torch.arange(slots, device=lu.device).expand(H, slots) < take)
    victims = torch.full((H, slots + 1), slots, dtype=torch.long, device=lu.device)
    victims.scatter_(1, torch.where(chosen, chosen.cumsum(1) - 1, slots), torch.arange(slots, device=lu.device)
                     .expand(H, slots))
    rank = miss.cumsum(1) - 1
    admit = miss & (rank < take)
    victim = torch.where(admit, victims.gather(1, rank.clamp(0, slots)), slots)
    old = cluster_of.gather(1, victim)
    slot_of.scatter_(1, torch.where(admit & (old >= 0), old, C), -1)
    slot_of.scatter_(1, torch.where(admit, flat, C), victim.int())
    cluster_of.scatter_(1, victim, flat)
    last_use.scatter_(1, victim, now.expand(H, S * R))
    slot_of[:, C], cluster_of[:, slots], last_use[:, slots] = -1, -1, -1
    if stats is not None:
        stats += torch.stack([valid.sum(), hit.sum()])
    back = (lambda t: t.view(H, S, R).transpose(0, 1).contiguous())
    return back(torch.where(hit, slot, -1).int()), back(torch.where(admit, victim, -1).int()), back(hit)


def cache_plan(ids: torch.Tensor, slot_of: torch.Tensor, cluster_of: torch.Tensor, last_use: torch.Tensor,
               clock: torch.Tensor, stats: torch.Tensor | None = None):
    """One step of the cluster cache's bookkeeping (see the module docstring); updates the maps in
    place. ids: [S, H, R] int (-1: none). Returns (read, write) [S, H, R] int32 (-1: none) and the
    hit mask [S, H, R] bool."""
    if not use_triton(ids, slot_of, cluster_of, last_use, clock):
        return cache_plan_ref(ids, slot_of, cluster_of, last_use, clock, stats)
    S, H, R, C, slots = _check(ids, slot_of, cluster_of, last_use, clock, stats)
    assert ids.stride(2) == 1, "ids: last dim contiguous"
    dev = ids.device
    read = torch.empty(S, H, R, dtype=torch.int32, device=dev)
    write = torch.empty_like(read)
    hit = torch.empty(S, H, R, dtype=torch.bool, device=dev)
    victims = torch.empty(H, max(slots, 1), dtype=torch.int32, device=dev)
    _cache_plan_kernel[(H,)](
        ids, slot_of, cluster_of, last_use, clock, victims, read, write, hit,
        stats if stats is not None else clock,
        ids.stride(0), ids.stride(1), S, H, R, C, slots,
        BLOCK_I=min(TUNE["block_ids"], next_pow2(max(S * R, MIN_BLOCK))),
        BLOCK_S=min(TUNE["block_slots"], next_pow2(max(slots, MIN_BLOCK))),
        HAS_STATS=stats is not None, num_warps=TUNE["num_warps"],
    )
    return read, write, hit


__all__ = ["cache_plan", "cache_plan_ref"]
