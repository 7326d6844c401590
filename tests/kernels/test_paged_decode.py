import math

import pytest
import torch
from kernel_testutil import assert_close, cases, gen, poison_cuda_cache, randn, rel_err

from retroinfer.kernels import paged_decode, paged_decode_ref

# (B, Hq, Hkv, D, page_size, lengths)
INTERP = [
    (1, 4, 4, 64, 16, [1]),                 # G = 1, a single token
    (3, 8, 2, 64, 16, [1, 17, 100]),        # G = 4, partial pages
    (2, 7, 1, 128, 32, [33, 200]),          # G = 7
    (2, 14, 2, 128, 16, [1000, 5]),         # G = 7, many pages, uneven batch
    (1, 2, 2, 64, 64, [4097]),              # G = 1, engine page size
    (1, 4, 2, 64, 128, [300]),              # page larger than a loop step
]
GPU_ONLY = [
    (1, 32, 8, 128, 64, [131072]),                      # Llama-3-8B shape at 128K
    (8, 32, 8, 128, 64, [32768, 1, 17, 4097, 30001, 12345, 64, 65]),
    (4, 28, 4, 128, 16, [9999, 1, 2048, 777]),          # Qwen2-7B-like G = 7
]


def make_paged(g, B, Hkv, D, page, lengths, dtype, device, spare_pages=3):
    """Pool of NaN pages (rows past a sequence's length stay NaN: they must be masked), a random
    page order per sequence, and -1 in unused block-table slots (they must not be read)."""
    n_pages = [math.ceil(n / page) for n in lengths]
    max_pages = max(n_pages) + 1
    P = sum(n_pages) + spare_pages
    perm = torch.randperm(P, generator=torch.Generator().manual_seed(P * 7 + B))
    bt = torch.full((B, max_pages), -1, dtype=torch.int32)
    k_pages = torch.full((P, page, Hkv, D), float("nan"), dtype=dtype, device=device)
    v_pages = torch.full_like(k_pages, float("nan"))
    start = 0
    for b, (n, np_) in enumerate(zip(lengths, n_pages)):
        bt[b, :np_] = perm[start:start + np_].int()
        start += np_
        t = torch.arange(n)
        rows = (bt[b, t // page].long() * page + t % page).to(device)
        k_pages.view(P * page, Hkv, D)[rows] = randn(g, n, Hkv, D, dtype=dtype)
        v_pages.view(P * page, Hkv, D)[rows] = randn(g, n, Hkv, D, dtype=dtype)
    lens = torch.tensor(lengths, dtype=torch.int32, device=device)
    return k_pages, v_pages, bt.to(device), lens


@pytest.mark.parametrize("device,dtype,case", cases(INTERP, GPU_ONLY))
def test_paged_decode_matches_ref(device, dtype, case):
    B, Hq, Hkv, D, page, lengths = case
    g = gen(device, "paged", dtype, case)
    q = randn(g, B, Hq, D, dtype=dtype)
    k_pages, v_pages, bt, lens = make_paged(g, B, Hkv, D, page, lengths, dtype, device)
    scale = D ** -0.5
    poison_cuda_cache(device)
    out = paged_decode(q, k_pages, v_pages, bt, lens, scale)
    ref = paged_decode_ref(q, k_pages, v_pages, bt, lens, scale)
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out, ref, dtype, f"paged_decode {case}")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("num_splits", [1, 3, 1000])
def test_paged_decode_num_splits(device, num_splits):
    B, Hq, Hkv, D, page, lengths = 2, 8, 2, 64, 16, [150, 40]
    g = gen(device, "splits", num_splits)
    q = randn(g, B, Hq, D)
    k_pages, v_pages, bt, lens = make_paged(g, B, Hkv, D, page, lengths, torch.float32, device)
    out = paged_decode(q, k_pages, v_pages, bt, lens, 0.1, num_splits=num_splits)
    assert_close(out, paged_decode_ref(q, k_pages, v_pages, bt, lens, 0.1), torch.float32)


def test_paged_decode_ref_matches_sdpa():
    """The oracle itself against torch SDPA (float64) over KV gathered token by token."""
    B, Hq, Hkv, D, page, lengths = 3, 12, 4, 32, 16, [1, 40, 97]
    g = gen("cpu", "ref-sdpa")
    q = randn(g, B, Hq, D)
    k_pages, v_pages, bt, lens = make_paged(g, B, Hkv, D, page, lengths, torch.float32, "cpu")
    ref = paged_decode_ref(q, k_pages, v_pages, bt, lens, 0.3)
    for b, n in enumerate(lengths):
        k = torch.stack([k_pages[bt[b, t // page], t % page] for t in range(n)], 1).double()
        v = torch.stack([v_pages[bt[b, t // page], t % page] for t in range(n)], 1).double()
        k = k.repeat_interleave(Hq // Hkv, 0)       # [Hq, n, D]
        v = v.repeat_interleave(Hq // Hkv, 0)
        want = torch.nn.functional.scaled_dot_product_attention(
            q[b].double()[:, None], k, v, scale=0.3)[:, 0]
        assert rel_err(ref[b], want) < 1e-6
