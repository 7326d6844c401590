import pytest
import torch
from kernel_testutil import assert_close, cases, gen, poison_cuda_cache, randn, rel_err

from retroinfer.kernels import merge_states, weighted_decode, weighted_decode_ref
from retroinfer.kernels.split_reduce import merge_partials, merge_partials_ref

# (B, Hkv, G, L, D, lengths [B][Hkv], with log_w, layout)
# layout: "contig" [B, Hkv, L, D]; "bshd" a [B, L, Hkv, D] buffer permuted; "slice" the first L
# rows of a longer buffer.
INTERP = [
    (1, 1, 1, 1, 64, [[1]], False, "contig"),
    (2, 2, 4, 150, 64, [[0, 1], [17, 150]], True, "bshd"),
    (1, 3, 7, 300, 128, [[299, 0, 64]], True, "slice"),
    (2, 1, 4, 1000, 64, [[1000], [999]], True, "contig"),
]
GPU_ONLY = [
    (1, 8, 4, 20000, 128, [[20000, 19999, 1, 0, 4097, 12345, 64, 65]], True, "bshd"),
    (4, 8, 4, 4096, 128, [[4096] * 8, [0] * 8, [1, 2, 3, 4, 5, 6, 7, 8], [4000] * 8], True, "slice"),
    (2, 4, 7, 70000, 128, [[70000, 1, 33, 65536], [2, 0, 69999, 7]], False, "contig"),
]


def make_kv(g, B, Hkv, L, D, dtype, layout):
    if layout == "bshd":
        k = randn(g, B, L, Hkv, D, dtype=dtype).permute(0, 2, 1, 3)
        v = randn(g, B, L, Hkv, D, dtype=dtype).permute(0, 2, 1, 3)
    elif layout == "slice":
        k = randn(g, B, Hkv, L + 37, D, dtype=dtype)[:, :, :L]
        v = randn(g, B, Hkv, L + 37, D, dtype=dtype)[:, :, 5:L + 5]
    else:
        k = randn(g, B, Hkv, L, D, dtype=dtype)
        v = randn(g, B, Hkv, L, D, dtype=dtype)
    # keys past a row's length are NaN: they must be masked, not multiplied by 0
    return k, v


def poison_tail(k, v, lens):
    for b in range(k.shape[0]):
        for h in range(k.shape[1]):
            k[b, h, int(lens[b, h]):] = float("nan")
            v[b, h, int(lens[b, h]):] = float("nan")


@pytest.mark.parametrize("device,dtype,case", cases(INTERP, GPU_ONLY))
def test_weighted_decode_matches_ref(device, dtype, case):
    B, Hkv, G, L, D, lengths, with_w, layout = case
    g = gen(device, "weighted", dtype, case)
    q = randn(g, B, Hkv, G, D, dtype=dtype)
    k, v = make_kv(g, B, Hkv, L, D, dtype, layout)
    lens = torch.tensor(lengths, dtype=torch.int32, device=device)
    poison_tail(k, v, lens)
    log_w = None
    if with_w:
        log_w = randn(g, B, Hkv, L) * 2
        log_w[..., ::7] = float("-inf")              # zero-weight keys
        log_w[..., 3::11] += 5.0                     # heavy keys
    scale = D ** -0.5
    poison_cuda_cache(device)
    out, lse = weighted_decode(q, k, v, lens, log_w, scale)
    ref_out, ref_lse = weighted_decode_ref(q, k, v, lens, log_w, scale)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert out.shape == (B, Hkv, G, D) and lse.shape == (B, Hkv, G)
    assert_close(out, ref_out, dtype, f"weighted_decode out {case[:5]}")
    empty = ref_lse == float("-inf")
    assert torch.equal(lse == float("-inf"), empty)
    assert (out[empty] == 0).all()
    if (~empty).any():
        assert (lse[~empty] - ref_lse[~empty]).abs().max().item() < 1e-3  # scores are exact products in fp32


def test_weighted_decode_ref_matches_float64():
    """The oracle against an explicit float64 softmax, key by key."""
    g = gen("cpu", "wref")
    B, Hkv, G, L, D = 2, 2, 3, 20, 16
    q, k, v = randn(g, B, Hkv, G, D), randn(g, B, Hkv, L, D), randn(g, B, Hkv, L, D)
    log_w = randn(g, B, Hkv, L)
    lens = torch.tensor([[20, 0], [5, 13]], dtype=torch.int32)
    out, lse = weighted_decode_ref(q, k, v, lens, log_w, 0.7)
    for b in range(B):
        for h in range(Hkv):
            n = int(lens[b, h])
            for gi in range(G):
                if n == 0:
                    assert lse[b, h, gi] == float("-inf") and (out[b, h, gi] == 0).all()
                    continue
                s = [0.7 * float(q[b, h, gi].double() @ k[b, h, j].double()) + float(log_w[b, h, j])
                     for j in range(n)]
                s = torch.tensor(s, dtype=torch.float64)
                want_lse = torch.logsumexp(s, 0)
                want = (torch.exp(s - want_lse)[:, None] * v[b, h, :n].double()).sum(0)
                assert abs(float(lse[b, h, gi]) - float(want_lse)) < 1e-5
                assert rel_err(out[b, h, gi], want) < 1e-5


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_merge_states_splits_keys(device):
    """Attention over keys [0, a) merged with [a, n) equals attention over [0, n)."""
    g = gen(device, "merge")
    B, Hkv, G, L, D = 2, 3, 4, 90, 64
    q, k, v = randn(g, B, Hkv, G, D), randn(g, B, Hkv, L, D), randn(g, B, Hkv, L, D)
    log_w = randn(g, B, Hkv, L)
    full = torch.full((B, Hkv), L, dtype=torch.int32, device=device)
    a = 31
    head = torch.full_like(full, a)
    oa, la = weighted_decode(q, k, v, head, log_w, 0.125)
    ob, lb = weighted_decode(q, k[:, :, a:], v[:, :, a:], full - a, log_w[:, :, a:].contiguous(), 0.125)
    out, lse = merge_states(oa, la, ob, lb)
    ref_out, ref_lse = weighted_decode_ref(q, k, v, full, log_w, 0.125)
    assert rel_err(out, ref_out) < 1e-5 and rel_err(lse, ref_lse) < 1e-5


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("zones", [1, 2, 3])
def test_merge_partials_equals_merged_zones(device, zones):
    """Unmerged split states of up to three zones (different split counts, empty rows among them)
    merged in one launch equal each zone merged alone, then merge_states pairwise."""
    g = gen(device, "partials", zones)
    B, Hkv, G, D = 3, 2, 4, 64
    q = randn(g, B, Hkv, G, D)
    parts, states = [], []
    for z, (L, splits) in enumerate([(70, 3), (33, 1), (129, 5)][:zones]):
        k, v, log_w = randn(g, B, Hkv, L, D), randn(g, B, Hkv, L, D), randn(g, B, Hkv, L)
        lens = torch.randint(0, L + 1, (B, Hkv), generator=g, device=device).to(torch.int32)
        lens[0, 0] = 0                                   # row 0: empty in every zone
        parts.append(weighted_decode(q, k, v, lens, log_w, 0.3, num_splits=splits, partial=True))
        states.append(weighted_decode(q, k, v, lens, log_w, 0.3, num_splits=splits))
    ref_out, ref_lse = states[0]
    for o, l in states[1:]:
        ref_out, ref_lse = merge_states(ref_out, ref_lse, o, l)
    R = B * Hkv * G
    for merge in (merge_partials, merge_partials_ref):
        out = torch.full((R, D), float("nan"), device=device)
        lse = torch.empty(R, device=device)
        merge(parts, out, lse)
        assert rel_err(out, ref_out.view(R, D)) < 1e-5
        assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse.view(R)))
        fin = torch.isfinite(lse)
        assert rel_err(lse[fin], ref_lse.view(R)[fin]) < 1e-5
        assert (out[:G] == 0).all() and (lse[:G] == float("-inf")).all()
        # only some slots' rows, in the slots' order (the wave decode's batch among its slots)
        per, slots = Hkv * G, torch.tensor([2, 0], device=device)
        part_out, part_lse = torch.empty(2 * per, D, device=device), torch.empty(2 * per, device=device)
        merge(parts, part_out, part_lse, slots=slots)
        assert torch.equal(part_out, torch.cat([out[2 * per:], out[:per]]))
        assert torch.equal(part_lse, torch.cat([lse[2 * per:], lse[:per]]))


def test_merge_states_inf_sides():
    o1, o2 = torch.randn(3, 8), torch.randn(3, 8)
    l1 = torch.tensor([0.5, float("-inf"), float("-inf")])
    l2 = torch.tensor([float("-inf"), 1.5, float("-inf")])
    o2[0] = float("nan")                               # ignored: its weight is 0
    o1[1] = float("nan")
    out, lse = merge_states(o1, l1, o2, l2)
    assert torch.equal(out[0], o1[0]) and lse[0] == 0.5
    assert torch.equal(out[1], o2[1]) and lse[1] == 1.5
    assert (out[2] == 0).all() and lse[2] == float("-inf")
    # symmetric, and equal lse halves the weight
    out, lse = merge_states(o1[:1], l1[:1], o1[:1] * 3, l1[:1])
    assert torch.allclose(out, 2 * o1[:1]) and torch.allclose(lse, l1[:1] + torch.log(torch.tensor(2.0)))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("D,splits", [(80, (37, 1, 70)), (128, (129,)), (64, (33, 0, 5))])
def test_merge_partials_many_splits(device, D, splits):
    """Rows with hundreds of splits stream through the merge in chunks, D in several programs;
    empty splits (lse -inf, o 0) anywhere, one row empty in every set."""
    g = gen(device, "many-splits", D, splits)
    R = 7
    parts = []
    for n in splits:
        po, pl = randn(g, R, n, D), randn(g, R, n) * 3
        empty = torch.rand(R, n, generator=g, device=device) < 0.2
        empty[0] = True
        parts.append((po.masked_fill(empty[..., None], 0.0), pl.masked_fill(empty, float("-inf"))))
    outs = []
    for merge in (merge_partials, merge_partials_ref):
        out, lse = torch.full((R, D), float("nan"), device=device), torch.empty(R, device=device)
        merge(parts, out, lse)
        outs.append((out, lse))
    (out, lse), (ref_out, ref_lse) = outs
    assert rel_err(out, ref_out) < 1e-5 and torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    assert rel_err(lse[1:], ref_lse[1:]) < 1e-5 and (out[0] == 0).all()
