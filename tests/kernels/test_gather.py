import pytest
import torch
from kernel_testutil import GPU, gen

from retroinfer.kernels import gather_clusters, gather_clusters_ref

SENTINEL = 12345.0

# (Hkv, N, D, C, R, Lmax, dst_start, dst layout, pad ids with -1)
INTERP = [
    (1, 16, 64, 1, 1, 32, 0, "contig", False),
    (2, 300, 64, 20, 6, 200, 5, "contig", True),
    (3, 500, 128, 40, 12, 120, 17, "lhd", False),      # clips at Lmax
    (2, 1000, 64, 64, 63, 1100, 0, "slice", False),   # 63 of 64 clusters, R % chunk != 0
]
GPU_ONLY = [
    (8, 131072, 128, 8192, 148, 4096, 68, "lhd", True),
    (8, 131072, 128, 8192, 1000, 4096, 100, "contig", False),  # heavy clipping
]


def make_case(device, dtype, case):
    Hkv, N, D, C, R, Lmax, dst_start, layout, pad = case
    g = gen("cpu", "gather", dtype, case)
    src_k = torch.randn(Hkv, N, D, generator=g).to(device=device, dtype=dtype)
    src_v = torch.randn(Hkv, N, D, generator=g).to(device=device, dtype=dtype)
    cuts = [torch.sort(torch.randperm(N - 1, generator=g)[:C - 1] + 1)[0] for _ in range(Hkv)]
    offsets = torch.stack([torch.cat([torch.zeros(1).long(), c, torch.full((1,), N)]) for c in cuts])
    ids = torch.stack([torch.randperm(C, generator=g)[:R] for _ in range(Hkv)])   # duplicate-free
    if pad:
        ids[:, -2:] = -1
    if layout == "lhd":             # execution buffer stored [Lmax, Hkv, D]
        dst_k = torch.full((Lmax, Hkv, D), SENTINEL, dtype=dtype, device=device).transpose(0, 1)
    elif layout == "slice":         # a window of a wider buffer
        dst_k = torch.full((Hkv, Lmax + 50, D), SENTINEL, dtype=dtype, device=device)[:, 10:Lmax + 10]
    else:
        dst_k = torch.full((Hkv, Lmax, D), SENTINEL, dtype=dtype, device=device)
    dst_v = torch.full_like(dst_k, SENTINEL)
    return (src_k, src_v, offsets.int().to(device), ids.to(device), dst_k, dst_v, dst_start)


def params():
    out = []
    for i, c in enumerate(INTERP):
        out.append(pytest.param("cpu", torch.float16, c, id=f"interp-{i}"))
        out.append(pytest.param("cuda", torch.bfloat16, c, marks=GPU, id=f"cuda-{i}"))
    for i, c in enumerate(GPU_ONLY):
        out.append(pytest.param("cuda", torch.bfloat16, c, marks=GPU, id=f"cuda-large-{i}"))
    return out


@pytest.mark.parametrize("device,dtype,case", params())
def test_gather_matches_ref(device, dtype, case):
    args = make_case(device, dtype, case)
    ref_args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
    lens = gather_clusters(*args)
    ref_lens = gather_clusters_ref(*ref_args)
    assert lens.dtype == torch.int32 and lens.shape == (case[0],)
    assert torch.equal(lens, ref_lens)
    assert torch.equal(args[4], ref_args[4]) and torch.equal(args[5], ref_args[5])
    Lmax, dst_start = case[5], case[6]
    for h in range(case[0]):        # rows outside [dst_start, dst_start + len) untouched
        n = int(lens[h])
        assert n <= Lmax - dst_start
        assert (args[4][h, :dst_start] == SENTINEL).all() and (args[4][h, dst_start + n:] == SENTINEL).all()
        assert (args[4][h, dst_start:dst_start + n] != SENTINEL).all()


def test_gather_ref_naive():
    args = make_case("cpu", torch.float32, (2, 200, 16, 12, 5, 90, 3, "contig", True))
    src_k, src_v, offsets, ids, dst_k, dst_v, dst_start = args
    lens = gather_clusters_ref(*args)
    for h in range(2):
        rows = [r for c in ids[h].tolist() if c >= 0 for r in range(offsets[h, c], offsets[h, c + 1])]
        rows = rows[:90 - dst_start]
        assert int(lens[h]) == len(rows)
        assert torch.equal(dst_k[h, dst_start:dst_start + len(rows)], src_k[h, rows])
        assert torch.equal(dst_v[h, dst_start:dst_start + len(rows)], src_v[h, rows])


@pytest.mark.parametrize("device,dtype", [pytest.param("cpu", torch.float16, id="interp"),
                                          pytest.param("cuda", torch.bfloat16, marks=GPU, id="cuda")])
def test_gather_cached_matches_ref(device, dtype):
    """Hits read their head rows from the cache (filled with other values than the pool, so the
    source shows), misses with a write slot land in the cache, the source-row count is right."""
    from retroinfer.kernels.gather import gather_clusters_cached, gather_clusters_cached_ref
    B, Hkv, N, D, C, R, slots, slot_rows = 3, 2, 900, 64, 40, 7, 9, 16
    g = gen("cpu", "gather-cached", dtype, (B, Hkv))
    src_k = torch.randn(Hkv, N, D, generator=g).to(dtype)
    src_v = torch.randn(Hkv, N, D, generator=g).to(dtype)
    cuts = [torch.sort(torch.randperm(N - 1, generator=g)[:C - 1] + 1)[0] for _ in range(Hkv)]
    offsets = torch.stack([torch.cat([torch.zeros(1).long(), c, torch.full((1,), N)]) for c in cuts]).int()
    ids = torch.stack([torch.stack([torch.randperm(C, generator=g)[:R] for _ in range(Hkv)]) for _ in range(B)])
    ids[0, :, -2:] = -1
    perm = torch.stack([torch.stack([torch.randperm(slots, generator=g) for _ in range(Hkv)]) for _ in range(B)])
    choice = torch.randint(0, 3, (B, Hkv, R), generator=g)          # 0: plain miss, 1: hit, 2: admit
    slot = perm[..., :R] if R <= slots else None
    read = torch.where(choice == 1, slot, -1).int()
    write = torch.where(choice == 2, slot, -1).int()
    for b in range(1, B):        # one batch row per slot set: no two rows of a head share a slot
        read[b], write[b] = -1, -1
    cache_k = torch.randn(Hkv, slots, slot_rows, D, generator=g).to(dtype)
    cache_v = torch.randn(Hkv, slots, slot_rows, D, generator=g).to(dtype)
    Lmax = 600
    dst = [torch.full((B, Hkv, Lmax, D), SENTINEL, dtype=dtype) for _ in range(2)]
    args = [src_k, src_v, offsets, ids, cache_k, cache_v, read, write, dst[0], dst[1], 5]
    ref_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    if device == "cuda":
        args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    args[3] = args[3].int()     # the engine's ids: int32 pool ids from select_zones
    tally = torch.tensor([5, 6, 7, 8], device=device)
    lens, host = gather_clusters_cached(*args, tally=tally)
    ref_lens, ref_host = gather_clusters_cached_ref(*ref_args)
    assert torch.equal(lens.cpu(), ref_lens) and torch.equal(host.cpu(), ref_host)
    assert tally.tolist() == [5, 6, 7 + int(ref_lens.sum()), 8 + int(ref_host.sum())]
    for i in (4, 5, 8, 9):       # cache k/v, dst k/v
        assert torch.equal(args[i].cpu(), ref_args[i]), i
    assert (choice[0] == 1).any() and (choice[0] == 2).any()


@pytest.mark.parametrize("device,dtype,case", params())
def test_cluster_rows_name_the_gathered_rows(device, dtype, case):
    """cluster_rows (kernel and reference) names exactly the pool rows that the gather copies, and
    attention reading the pool through them equals attention over the gathered buffer."""
    from retroinfer.kernels import cluster_rows, cluster_rows_ref, weighted_decode
    Hkv, N, D, C, R, Lmax, _, _, _ = case
    src_k, src_v, offsets, ids, dst_k, dst_v, _ = make_case(device, dtype, case[:6] + (0, "contig") + case[8:])
    B = 2
    ids = torch.stack([ids, ids.flip(1)])                           # [B, Hkv, R], another order
    dk = torch.stack([dst_k, dst_k.clone()])
    dv = torch.stack([dst_v, dst_v.clone()])
    from retroinfer.kernels.gather import gather_clusters_batched
    tally = torch.zeros(4, dtype=torch.long, device=device)
    lens = gather_clusters_batched(src_k, src_v, offsets, ids, dk, dv, 0, tally=tally)
    C = offsets.shape[1] - 1
    assert tally.tolist() == [int(((ids >= 0) & (ids < C)).sum()), 0, int(lens.sum()), int(lens.sum())]
    rows = torch.full((B, Hkv, Lmax), -7, dtype=torch.int32, device=device)
    n = cluster_rows(offsets, ids, rows)
    ref_rows = torch.full_like(rows, -7)
    assert torch.equal(n, lens) and torch.equal(cluster_rows_ref(offsets, ids, ref_rows), lens)
    assert torch.equal(rows, ref_rows)
    hh = torch.arange(Hkv, device=device)[None, :, None]
    valid = torch.arange(Lmax, device=device) < n[..., None]
    assert (rows[~valid] == -7).all()
    assert torch.equal(torch.where(valid[..., None], src_k[hh, rows.clamp(min=0).long()], 0),
                       torch.where(valid[..., None], dk, 0))
    q = torch.randn(B, Hkv, 4, D, generator=gen("cpu", "rows-q", case)).to(device=device, dtype=dtype)
    got = weighted_decode(q, src_k, src_v, n, None, D ** -0.5, rows=rows)
    want = weighted_decode(q, dk, dv, lens, None, D ** -0.5)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
