import pytest
import torch
from kernel_testutil import GPU, INTERP_DTYPES, GPU_DTYPES, gen, randn, rel_err

from retroinfer.kernels import cluster_order, cluster_reorder, cluster_reorder_ref

# (T, H, D, C): clusters per head; sizes drawn at random, some empty, some longer than a row tile
INTERP = [(1, 1, 64, 1), (37, 2, 64, 5), (300, 3, 128, 40)]
GPU_ONLY = [(131004, 8, 128, 8192), (5000, 4, 128, 7)]


def params():
    out = []
    for i, c in enumerate(INTERP):
        out += [pytest.param("cpu", dt, c, id=f"interp-{str(dt)[6:]}-{i}") for dt in INTERP_DTYPES]
        out += [pytest.param("cuda", dt, c, marks=GPU, id=f"cuda-{str(dt)[6:]}-{i}") for dt in GPU_DTYPES]
    for i, c in enumerate(GPU_ONLY):
        out += [pytest.param("cuda", dt, c, marks=GPU, id=f"cuda-large-{str(dt)[6:]}-{i}") for dt in GPU_DTYPES]
    return out


def layout(g, T, H, C, device):
    """A random assignment of each head's tokens to C clusters, in the layout build_index makes."""
    assign = torch.randint(0, C, (H, T), generator=g, device=device)
    assign[:, : min(T, 3)] = 0                                    # one cluster of several rows at least
    return (assign, *cluster_order(assign, C))


@pytest.mark.parametrize("device,dtype,case", params())
def test_cluster_reorder_matches_ref(device, dtype, case):
    T, H, D, C = case
    g = gen(device, "reorder", dtype, case)
    # token-major K and V as the model writes them; V a strided view, as the build may pass it
    k = randn(g, T, H, D, dtype=dtype)
    v = randn(g, H, T, D, dtype=dtype).transpose(0, 1)
    assign, order, offsets = layout(g, T, H, C, device)
    got = cluster_reorder(k, v, order, offsets)
    ref = cluster_reorder_ref(k, v, order, offsets)
    assert torch.equal(got.keys, ref.keys) and torch.equal(got.values, ref.values)   # a copy: exact
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel_err(got.key_means, ref.key_means) < tol and rel_err(got.value_means, ref.value_means) < tol
    # the layout itself: head h's rows of cluster c are its tokens with assign == c
    h, c = H - 1, int(assign[H - 1, 0])
    rows = got.keys[h, offsets[h, c]:offsets[h, c + 1]]
    assert torch.equal(rows, k[:, h][assign[h] == c])
    empty = offsets.diff(dim=1) == 0
    assert (got.key_means[empty] == 0).all()


def test_cluster_reorder_ref_naive():
    g = gen("cpu", "reorder-naive")
    T, H, D, C = 20, 2, 8, 4
    k, v = randn(g, T, H, D), randn(g, T, H, D)
    assign, order, offsets = layout(g, T, H, C, "cpu")
    out = cluster_reorder_ref(k, v, order, offsets)
    for h in range(H):
        for c in range(C):
            members = (assign[h] == c).nonzero().flatten()        # stable: in token order
            lo, hi = int(offsets[h, c]), int(offsets[h, c + 1])
            assert hi - lo == members.numel()
            assert torch.equal(out.values[h, lo:hi], v[members, h])
            want = k[members, h].mean(0) if members.numel() else torch.zeros(D)
            assert torch.allclose(out.key_means[h, c], want, atol=1e-6)
