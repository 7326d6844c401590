import pytest
import torch
from kernel_testutil import assert_close, cases, gen, poison_cuda_cache, randn

from retroinfer.kernels import centroid_scores, centroid_scores_ref

# (B, Hkv, G, C, D, counts)
INTERP = [
    (1, 1, 1, 1, 64, [1]),
    (2, 2, 4, 300, 64, [0, 257]),
    (3, 1, 7, 1000, 128, [1000, 17, 1]),
]
GPU_ONLY = [
    (1, 8, 4, 65536, 128, [65536]),                 # 1M tokens / 16
    (4, 8, 4, 8192, 128, [8192, 1, 0, 4097]),
    (2, 4, 7, 20000, 128, [19999, 12345]),
]


@pytest.mark.parametrize("device,dtype,case", cases(INTERP, GPU_ONLY))
def test_centroid_scores_matches_ref(device, dtype, case):
    B, Hkv, G, C, D, counts = case
    g = gen(device, "centroid", dtype, case)
    q = randn(g, B, Hkv, G, D, dtype=dtype) * 2          # peaky softmax
    cen = randn(g, B, Hkv, C, D, dtype=dtype)
    cnt = torch.tensor(counts, dtype=torch.int32, device=device)
    for b, n in enumerate(counts):
        cen[b, :, n:] = float("nan")                     # padding must never be read into a score
    scale = D ** -0.5
    poison_cuda_cache(device)
    s = centroid_scores(q, cen, cnt, scale)
    ref = centroid_scores_ref(q, cen, cnt, scale)
    assert s.shape == (B, Hkv, C) and s.dtype == torch.float32
    assert_close(s, ref, dtype, f"centroid_scores {case[:5]}")
    for b, n in enumerate(counts):
        assert (s[b, :, n:] == -1.0).all()
        if n:
            sums = s[b, :, :n].double().sum(-1)
            assert torch.allclose(sums, torch.full_like(sums, G), rtol=1e-4)
            assert (s[b, :, :n] >= 0).all()


def test_centroid_scores_ref_naive():
    g = gen("cpu", "cref")
    B, Hkv, G, C, D = 2, 2, 3, 10, 8
    q, cen = randn(g, B, Hkv, G, D), randn(g, B, Hkv, C, D)
    counts = torch.tensor([10, 4], dtype=torch.int32)
    s = centroid_scores_ref(q, cen, counts, 0.5)
    for b in range(B):
        n = int(counts[b])
        for h in range(Hkv):
            want = torch.zeros(C, dtype=torch.float64)
            for gi in range(G):
                z = torch.tensor([0.5 * float(q[b, h, gi].double() @ cen[b, h, c].double())
                                  for c in range(n)], dtype=torch.float64)
                want[:n] += torch.exp(z) / torch.exp(z).sum()
            want[n:] = -1.0
            assert torch.allclose(s[b, h].double(), want, atol=1e-6)
