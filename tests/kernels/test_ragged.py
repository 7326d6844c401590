"""Ragged (pool + per-row base) forms of centroid_scores and the batched cluster gather."""
import pytest
import torch

from retroinfer.kernels.centroid_scores import centroid_scores, centroid_scores_ref
from retroinfer.kernels.gather import gather_clusters_batched, gather_clusters_ref

from kernel_testutil import GPU

DEVICES = ["cpu", pytest.param("cuda", marks=GPU)]


@pytest.mark.parametrize("device", DEVICES)
def test_centroid_scores_ragged_equals_dense(device):
    g = torch.Generator().manual_seed(11)
    B, H, G, D, N = 3, 2, 4, 64, 300
    pool = torch.randn(H, N, D, generator=g).to(device)
    q = torch.randn(B, H, G, D, generator=g).to(device)
    base = torch.tensor([0, 37, 250], dtype=torch.int64, device=device)
    counts = torch.tensor([20, 0, 50], dtype=torch.int32, device=device)
    width = 64
    got = centroid_scores(q, pool, counts, 0.125, base=base, width=width)
    for b in range(B):
        dense = pool[:, base[b]:base[b] + width]
        dense = torch.nn.functional.pad(dense, (0, 0, 0, width - dense.shape[1]))
        ref = centroid_scores_ref(q[b:b + 1], dense[None], counts[b:b + 1], 0.125)
        assert torch.allclose(got[b:b + 1], ref, atol=1e-4), b


@pytest.mark.parametrize("device", DEVICES)
def test_gather_batched_equals_per_row(device):
    g = torch.Generator().manual_seed(12)
    H, N, D, C, R, L = 2, 500, 32, 40, 5, 200
    src_k = torch.randn(H, N, D, generator=g).to(device)
    src_v = torch.randn(H, N, D, generator=g).to(device)
    sizes = torch.randint(0, 20, (H, C), generator=g)
    offsets = torch.zeros(H, C + 1, dtype=torch.int32)
    offsets[:, 1:] = sizes.cumsum(1)
    offsets = offsets.to(device)
    ids = torch.stack([torch.stack([torch.randperm(C, generator=g)[:R] for _ in range(H)]) for _ in range(3)])
    ids[1, 0, 2:] = -1
    ids = ids.to(device)
    dk = torch.full((3, H, L, D), float("nan"), device=device)
    dv = torch.full_like(dk, float("nan"))
    lens = gather_clusters_batched(src_k, src_v, offsets, ids, dk, dv, 7)
    for b in range(3):
        rk, rv = torch.zeros(H, L, D, device=device), torch.zeros(H, L, D, device=device)
        rl = gather_clusters_ref(src_k, src_v, offsets, ids[b], rk, rv, 7)
        assert torch.equal(lens[b], rl)
        for h in range(H):
            n = int(rl[h])
            assert torch.equal(dk[b, h, 7:7 + n], rk[h, 7:7 + n]) and torch.equal(dv[b, h, 7:7 + n], rv[h, 7:7 + n])
