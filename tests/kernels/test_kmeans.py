import pytest
import torch
from kernel_testutil import GPU, INTERP_DTYPES, GPU_DTYPES, gen, randn, rel_err

from retroinfer.kernels import (kmeans_assign, kmeans_assign_ref, kmeans_centroids, kmeans_centroids_ref, kmeans_update,
                               kmeans_update_ref, spherical_kmeans, spherical_kmeans_ref)

# (S, N, K, D, n_valid or None)
INTERP = [
    (1, 1, 1, 64, None),
    (3, 100, 40, 64, [100, 50, 0]),
    (2, 300, 70, 128, None),
    (2, 512, 64, 64, [512, 300]),                    # whole tiles: the unmasked loads
]
GPU_ONLY = [
    (128, 8192, 512, 128, None),                     # 16 segments x 8 heads, the build's size
    (16, 8192, 512, 128, [8192, 1, 0, 4097] * 4),
]


def params(interp, gpu_only):
    out = []
    for i, c in enumerate(interp):
        out += [pytest.param("cpu", dt, c, id=f"interp-{str(dt)[6:]}-{i}") for dt in INTERP_DTYPES]
        out += [pytest.param("cuda", dt, c, marks=GPU, id=f"cuda-{str(dt)[6:]}-{i}") for dt in GPU_DTYPES]
    for i, c in enumerate(gpu_only):
        out += [pytest.param("cuda", dt, c, marks=GPU, id=f"cuda-large-{str(dt)[6:]}-{i}")
                for dt in GPU_DTYPES]
    return out


@pytest.mark.parametrize("device,dtype,case", params(INTERP, GPU_ONLY))
def test_kmeans_assign_matches_ref(device, dtype, case):
    S, N, K, D, nv = case
    g = gen(device, "assign", dtype, case)
    x = randn(g, S, N, D, dtype=dtype)
    cen = torch.nn.functional.normalize(randn(g, S, K, D), dim=-1).to(dtype)
    n_valid = torch.tensor(nv, dtype=torch.int32, device=device) if nv is not None else None
    idx = kmeans_assign(x, cen, n_valid)
    ref = kmeans_assign_ref(x, cen, n_valid)
    assert idx.dtype == torch.int64 and idx.shape == (S, N)
    assert torch.equal(idx < 0, ref < 0)
    ok = ref >= 0
    if not ok.any():
        return
    # The chosen centroid must be a maximiser up to the rounding of the dot (near-ties may differ).
    sc = torch.einsum("snd,skd->snk", x.double(), cen.double())
    best = sc.gather(2, ref.clamp(min=0)[..., None])[..., 0]
    got = sc.gather(2, idx.clamp(min=0)[..., None])[..., 0]
    slack = 1e-5 if dtype == torch.float32 else 1e-2
    assert ((best - got)[ok] <= slack * (1 + best[ok].abs())).all()
    assert (idx[ok] == ref[ok]).double().mean() > 0.99


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=GPU)])
@pytest.mark.parametrize("copies,n", [(3, 50), (32, 256)])      # partial tiles; whole tiles, ties across them
def test_kmeans_assign_ties_pick_first(device, copies, n):
    g = gen(device, "ties", copies)
    # small integers: every dot is exact whatever the summation order, so copies tie exactly
    c = torch.randint(-4, 5, (1, 3, 64), generator=g, device=device).float()
    cen = torch.cat([c] * copies, 1)              # k and k + 3, k + 6, ... identical
    x = torch.randint(-4, 5, (1, n, 64), generator=g, device=device).float()
    idx = kmeans_assign(x, cen)
    assert (idx < 3).all() and torch.equal(idx, kmeans_assign_ref(x, cen))


@pytest.mark.parametrize("device,dtype,case", params(INTERP, GPU_ONLY))
def test_kmeans_update_matches_ref(device, dtype, case):
    S, N, K, D, nv = case
    g = gen(device, "update", dtype, case)
    x = randn(g, S, N, D, dtype=dtype)
    idx = torch.randint(-1, K, (S, N), generator=g, device=device)   # -1 = skipped row
    sums, counts = kmeans_update(x, idx, K)
    ref_sums, ref_counts = kmeans_update_ref(x, idx, K)
    assert sums.dtype == torch.float32 and sums.shape == (S, K, D)
    assert counts.dtype == torch.int32 and counts.shape == (S, K)
    assert torch.equal(counts, ref_counts)
    assert rel_err(sums, ref_sums) < 1e-5


@pytest.mark.parametrize("device,dtype,case", params(INTERP, GPU_ONLY))
def test_kmeans_centroids_matches_ref(device, dtype, case):
    S, _, K, D, _ = case
    g = gen(device, "centroids", dtype, case)
    sums = randn(g, S, K, D) * 30
    counts = torch.randint(0, 3, (S, K), generator=g, device=device).to(torch.int32)   # 0: empty cluster
    prev = randn(g, S, K, D, dtype=dtype)
    got = kmeans_centroids(sums, counts, prev)
    ref = kmeans_centroids_ref(sums, counts, prev)
    assert got.dtype == dtype and got.shape == prev.shape
    empty = counts == 0
    assert torch.equal(got[empty], prev[empty])
    assert rel_err(got[~empty].float(), ref[~empty].float()) < (1e-6 if dtype == torch.float32 else 1e-2)
    norms = got[~empty].float().norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-2)


def test_kmeans_refs_naive():
    g = gen("cpu", "kref")
    S, N, K, D = 2, 30, 5, 8
    x, cen = randn(g, S, N, D), randn(g, S, K, D)
    idx = kmeans_assign_ref(x, cen, torch.tensor([30, 20], dtype=torch.int32))
    sums, counts = kmeans_update_ref(x, idx, K)
    for s in range(S):
        for n in range(N):
            want = -1 if (s == 1 and n >= 20) else max(range(K), key=lambda k: float(x[s, n] @ cen[s, k]))
            assert int(idx[s, n]) == want
        for k in range(K):
            rows = x[s][idx[s] == k]
            assert int(counts[s, k]) == rows.shape[0]
            assert torch.allclose(sums[s, k], rows.sum(0), atol=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=GPU)])
@pytest.mark.parametrize("iters", [1, 2, 12])
def test_spherical_kmeans_stops_at_the_fixed_point_with_every_steps_result(device, iters):
    """The device-side loop gives the centroids of running every step, reports the changes of
    the host loop, and on clustered points each problem stops early."""
    g = gen(device, "spherical", iters)
    S, N, K, D = 3, 500, 12, 32
    centres = torch.nn.functional.normalize(randn(g, S, K, D), dim=-1) * 4
    pick = torch.randint(0, K, (S, N, 1), generator=g, device=device).expand(S, N, D)
    x = (centres.gather(1, pick) + 0.3 * randn(g, S, N, D)).contiguous()
    n_valid = torch.tensor([500, 450, 1], dtype=torch.int32, device=device)
    c0 = torch.nn.functional.normalize(x[:, :: N // K][:, :K], dim=-1)
    c, changes = spherical_kmeans(x, c0, n_valid, iters)
    every = c0
    for _ in range(iters):
        every = kmeans_centroids(*kmeans_update(x, kmeans_assign(x, every, n_valid), K), every)
    assert rel_err(c, every) < 1e-5
    assert torch.equal(changes, spherical_kmeans_ref(x, c0, n_valid, iters)[1])
    assert changes.shape == (iters, S) and (changes[0] == N).all()
    if iters == 12:
        for ch in changes.t().tolist():          # each problem: its fixed point, then nothing more
            stop = ch.index(0, 1)
            assert stop < iters - 1 and not any(ch[stop:])
