"""select_zones: exact retrieval / estimation sets without a sort, checked against its torch
reference (as sets per row) and against the ranks of torch.topk (as multisets of scores, which do
not depend on how ties are broken)."""

import pytest
import torch
from kernel_testutil import GPU, gen

import retroinfer.kernels.select as sel
from retroinfer.kernels import select_zones, select_zones_ref

# (S, H, W, counts, retrieve, estimate, R, E, kind, num_splits, block); kind: "rand" uniform,
# "ties" a few distinct values, "signed" normal with -0.0 / +0.0 / -inf among the valid entries.
INTERP = [
    (1, 1, 1, [1], [1], [0], 1, 0, "rand", None, 1024),
    (2, 2, 300, [300, 257], [5, 0], [40, 257], 16, 257, "rand", 3, 64),       # r = 0; r + e = count
    (3, 1, 1000, [1000, 17, 0], [18, 17, 3], [232, 0, 5], 32, 256, "ties", 2, 128),   # e = 0, count = 0
    (2, 1, 777, [777, 500], [14, 9], [400, 491], 16, 512, "signed", 4, 64),   # W % block != 0
    (4, 1, 2500, [2500, 1, 2499, 1300], [45, 1, 40, 24], [580, 0, 9, 301], 48, 640, "ties", None, 1024),
    (1, 3, 600, [600], [100], [300], 64, 320, "rand", 2, 128),                 # retrieve > R: clipped
    # num_splits = 1: all stages in one launch
    (3, 1, 1000, [1000, 17, 0], [18, 17, 3], [232, 0, 5], 32, 256, "ties", 1, 128),
    (2, 2, 777, [777, 500], [14, 9], [400, 491], 16, 512, "signed", 1, 64),
]
GPU_ONLY = [   # 128K context, batch 8 (W = 8192) and 1M context, batch 1 (W = 65536)
    (8, 8, 8192, [8192, 0, 8000, 1, 4097, 8192, 8192, 2], [148, 0, 144, 1, 74, 148, 0, 1],
     [1900, 0, 1856, 0, 950, 8044, 1900, 1], 160, 1920, "rand", None, 1024),
    (8, 8, 8192, [8192] * 8, [148] * 8, [1900] * 8, 160, 1920, "ties", None, 1024),
    (1, 8, 65536, [65536], [1180], [15204], 1184, 15232, "rand", None, 1024),
    (2, 8, 65536, [65530, 40000], [1180, 720], [15203, 9280], 1184, 15232, "signed", 17, 2048),
    (32, 8, 8192, [8192] * 31 + [3000], [148] * 31 + [54], [1900] * 31 + [696], 160, 1920, "ties", 1, 1024),
]
PARAMS = [pytest.param(dev, c, method, marks=marks, id=f"{name}-{i}-{method}")
          for dev, name, cases, marks in (("cpu", "interp", INTERP, ()), ("cuda", "cuda", INTERP, GPU),
                                          ("cuda", "cuda-large", GPU_ONLY, GPU))
          for i, c in enumerate(cases) for method in ("row", "radix") if method == "radix" or c[2] <= 2 ** 14]


def make_case(device, case):
    S, H, W, counts, retrieve, estimate, R, E, kind, _, _ = case
    g = gen(device, "select", case)
    if kind == "rand":
        x = torch.rand(S, H, W, generator=g, device=device)
    elif kind == "ties":
        x = (torch.rand(S, H, W, generator=g, device=device) * 5).floor() / 4
    else:
        x = torch.randn(S, H, W, generator=g, device=device)
        pick = torch.rand(S, H, W, generator=g, device=device)
        x = torch.where(pick < 0.1, -0.0, torch.where(pick < 0.2, 0.0, x))
        x = torch.where(pick > 0.97, float("-inf"), x)
    cnt = torch.tensor(counts, dtype=torch.int32, device=device)
    pad = torch.arange(W, device=device) >= cnt.long()[:, None, None]
    x = x.masked_fill(pad, float("inf"))          # padding must never be selected, whatever it holds
    return (x, cnt, torch.tensor(retrieve, device=device), torch.tensor(estimate, device=device), R, E)


def as_sets(ids):
    return [[set(row.tolist()) - {-1} for row in slot] for slot in ids.cpu()]


@pytest.mark.parametrize("device,case,method", PARAMS)
def test_select_matches_ref_and_topk(device, case, method, monkeypatch):
    monkeypatch.setitem(sel.TUNE, "block", case[-1])
    x, cnt, ret_n, est_n, R, E = make_case(device, case)
    ret, est = select_zones(x, cnt, ret_n, est_n, R, E, num_splits=case[-2], method=method)
    ref_ret, ref_est = select_zones_ref(x, cnt, ret_n, est_n, R, E)
    assert ret.shape == (x.shape[0], x.shape[1], R) and est.shape == (x.shape[0], x.shape[1], E)
    assert ret.dtype == est.dtype == torch.int32
    assert as_sets(ret) == as_sets(ref_ret) and as_sets(est) == as_sets(ref_est)
    S, H, W = x.shape
    for s in range(S):
        n = min(int(cnt[s]), W)
        r = min(int(ret_n[s]), n, R)
        e = min(int(est_n[s]), n - r, E)
        for ids, k in ((ret[s], r), (est[s], e)):   # k valid ids first, then -1
            assert (ids[:, :k] >= 0).all() and (ids[:, :k] < n).all() and (ids[:, k:] == -1).all()
        if r + e == 0:
            continue
        top = x[s, :, :n].topk(r + e, dim=-1, sorted=True).values                   # [H, r + e]
        for got, want in ((ret[s, :, :r], top[:, :r]), (est[s, :, :e], top[:, r:])):
            vals = x[s].gather(1, got.long()).sort(dim=-1).values
            assert torch.equal(vals, want.sort(dim=-1).values), (case[:3], s)
        assert (torch.cat([ret[s, :, :r], est[s, :, :e]], -1).sort(-1).values.diff(dim=-1) > 0).all()
    # With pool offsets: the same positions, the retrieval ids moved by their slot's base
    base = torch.arange(1, S + 1, device=device) * 100003
    ret_b, est_b = select_zones(x, cnt, ret_n, est_n, R, E, base=base, num_splits=case[-2], method=method)
    assert torch.equal(ret_b, torch.where(ret >= 0, ret + base[:, None, None].int(), -1)) and torch.equal(est_b, est)
    ref_b = select_zones_ref(x, cnt, ret_n, est_n, R, E, base=base)[0]
    assert as_sets(ref_b) == as_sets(ret_b)


def test_select_ref_tie_rule():
    """Ties at a threshold go to the lower indices; -0.0 equals +0.0; padding is never taken."""
    x = torch.tensor([[[0.5, 1.0, 0.5, -0.0, 0.5, 0.0, 2.0, 9.0]]])
    ret, est = select_zones_ref(x, torch.tensor([7]), torch.tensor([2]), torch.tensor([4]), 3, 5)
    assert ret.tolist() == [[[6, 1, -1]]]
    assert est.tolist() == [[[0, 2, 4, 3, -1]]]


@pytest.mark.parametrize("method", ["row", "radix"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=GPU)])
def test_select_is_deterministic(device, method):
    """Same input, same output, position for position (the estimation sum order follows it)."""
    x, cnt, ret_n, est_n, R, E = make_case(device, INTERP[2])
    a = select_zones(x, cnt, ret_n, est_n, R, E, num_splits=2, method=method)
    b = select_zones(x, cnt, ret_n, est_n, R, E, num_splits=2, method=method)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# (S, H, G, W, counts, retrieve, estimate, R, E): the decode's shapes, scored from centroids
LOGIT_CASES = [
    (2, 2, 4, 300, [300, 0], [6, 0], [70, 0], 16, 128),
    (3, 2, 3, 1000, [1000, 17, 999], [18, 1, 18], [232, 4, 231], 32, 256),
    (2, 1, 7, 500, [500, 321], [9, 6], [116, 74], 16, 128),                   # Qwen's group of 7
]
LOGIT_GPU = [(16, 8, 4, 8192, [0] + [8188] * 8 + [0] * 7, [0] + [148] * 8 + [0] * 7,
              [0] + [1900] * 8 + [0] * 7, 160, 1920)]   # 128K, batch 8 in slots 1..8


@pytest.mark.parametrize("device,case", [pytest.param("cpu", c, id=f"interp-{i}") for i, c in enumerate(LOGIT_CASES)]
                         + [pytest.param("cuda", c, marks=GPU, id=f"cuda-{i}")
                            for i, c in enumerate(LOGIT_CASES + LOGIT_GPU)])
def test_select_from_logits(device, case, monkeypatch):
    """select_zones_logits, which scores the clusters inside the select, takes a top-r and a next-e
    set of the scores centroid_probs gives (up to the last bit of rounding), with pool ids; past
    the one-launch method's width it is select_zones on those scores, exactly."""
    from retroinfer.kernels.centroid_scores import centroid_logits, centroid_probs
    S, H, G, W, counts, retrieve, estimate, R, E = case
    g = gen(device, "select-logits", case)
    D = 64
    q = (torch.randn(S, H, G, D, generator=g, device=device) * 2).to(torch.float16)
    base = torch.arange(S, device=device) * (W + 5) + 3
    pool = torch.randn(H, S * (W + 5) + 3, D, generator=g, device=device).to(torch.float16)
    cnt = torch.tensor(counts, dtype=torch.int32, device=device)
    ret_n, est_n = torch.tensor(retrieve, device=device), torch.tensor(estimate, device=device)
    lg = centroid_logits(q, pool, cnt, D ** -0.5, base=base, width=W)
    sc = centroid_probs(lg, cnt)
    ret, est = sel.select_zones_logits(lg, cnt, ret_n, est_n, R, E, base=base)
    tol = 1e-6
    for s in range(S):
        n = min(counts[s], W)
        r, e = min(retrieve[s], n, R), min(estimate[s], n - min(retrieve[s], n, R), E)
        assert (ret[s, :, r:] == -1).all() and (est[s, :, e:] == -1).all()
        for h in range(H):
            rs, es = ret[s, h, :r].long() - int(base[s]), est[s, h, :e].long()
            assert ((rs >= 0) & (rs < n)).all() and ((es >= 0) & (es < n)).all()
            taken = torch.zeros(n, dtype=torch.bool, device=device)
            taken[rs] = True
            assert not taken[es].any()
            assert int(taken.sum()) == r
            x = sc[s, h, :n]
            rest = ~taken
            rest[es] = False
            if r and r < n:
                assert x[rs].min() >= x[~taken].max() - tol
            if e and int(rest.sum()):
                assert x[es].min() >= x[rest].max() - tol
    monkeypatch.setitem(sel.TUNE, "row_max", 16)       # too wide for the one-launch method now
    ret2, est2 = sel.select_zones_logits(lg, cnt, ret_n, est_n, R, E, base=base)
    want = select_zones(sc, cnt, ret_n, est_n, R, E, base=base)
    assert torch.equal(ret2, want[0]) and torch.equal(est2, want[1])
