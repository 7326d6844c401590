"""estimate_decode: the estimation zone read in place from the cluster pool, checked against its
torch reference, against weighted_decode on explicitly gathered rows, and against the execution-
buffer path it replaces in wave attention's decode."""

import pytest
import torch
from kernel_testutil import GPU_DTYPES, assert_close, cases, gen, poison_cuda_cache, randn

from retroinfer.kernels import (estimate_decode, estimate_decode_ref, merge_states, weighted_decode,
                                weighted_decode_ref)

# (S, Hkv, G, D, pool clusters N, id width K, width E, count [S], start [S] or None, per-slot base,
#  ids dtype). With a base, slot s owns clusters [s * N // S, (s + 1) * N // S) and ids are local.
INTERP = [
    (1, 1, 1, 64, 5, 1, 1, [1], None, False, torch.int64),
    (2, 2, 4, 64, 120, 48, 40, [0, 40], [8, 0], True, torch.int64),               # empty, full width
    (3, 1, 7, 128, 240, 75, 70, [70, 1, 69], [5, 0, 6], True, torch.int64),     # E % block != 0
    (2, 2, 4, 64, 400, 300, 300, [300, 257], None, False, torch.int32),         # global ids, splits
    (2, 1, 4, 64, 100, 40, 33, [100, 50], [0, 20], True, torch.int64),           # count clipped
]
GPU_ONLY = [   # Llama-3-8B at 128K (C = 8192 per sequence, E = 0.232 C) and at 1M
    (8, 8, 4, 128, 8 * 8192, 2080, 1920, [1901, 0, 1920, 1, 64, 65, 1000, 1901], [148] * 8, True,
     torch.int64),
    (1, 8, 4, 128, 65536, 16416, 15232, [15204], [1180], True, torch.int64),
    (2, 4, 7, 64, 30000, 20000, 20000, [20000, 19999], None, False, torch.int64),
]
PARAMS = cases(INTERP, GPU_ONLY) + [   # bf16 under the interpreter: the kernel upcasts before tl.dot
    pytest.param("cpu", torch.bfloat16, c, id=f"interp-bfloat16-{i}") for i, c in enumerate(INTERP)]


def make_case(device, dtype, case):
    S, H, G, D, N, K, E, count, start, per_slot, id_dtype = case
    g = gen(device, "estimate", dtype, case)
    q = randn(g, S, H, G, D, dtype=dtype) * 2
    cen = randn(g, H, N, D, dtype=dtype)
    vm = randn(g, H, N, D, dtype=dtype)
    log_size = torch.rand(H, N, generator=g, device=device) * 4
    span = N // S if per_slot else N
    assert K <= span, "ids are distinct clusters of the slot's span"
    base = torch.arange(S, device=device) * span if per_slot else None
    ids = torch.stack([torch.stack([torch.randperm(span, generator=g, device=device)[:K]
                                    for _ in range(H)]) for _ in range(S)])
    cnt = torch.tensor(count, device=device)
    st = torch.tensor(start, device=device) if start is not None else None
    r0 = st if st is not None else torch.zeros_like(cnt)
    n = torch.minimum(cnt.clamp(max=E), K - r0).clamp(min=0)
    # Ids outside [start, start + n) are garbage, and every cluster no valid id names is NaN:
    # the kernel must read neither.
    pos = torch.arange(K, device=device)
    live = (pos >= r0[:, None]) & (pos < (r0 + n)[:, None])                      # [S, K]
    used = torch.zeros(H, N, dtype=torch.bool, device=device)
    for s in range(S):
        for h in range(H):
            c = ids[s, h][live[s]] + (base[s] if base is not None else 0)
            used[h, c] = True
    ids[:, :, ::2] = torch.where(live[:, None, ::2], ids[:, :, ::2], -1)
    ids[:, :, 1::2] = torch.where(live[:, None, 1::2], ids[:, :, 1::2], 1 << 40)
    cen[~used], vm[~used], log_size[~used] = float("nan"), float("nan"), float("nan")
    return q, cen, vm, log_size, ids.to(id_dtype), cnt, base, st, n


def gather_rows(cen, vm, log_size, ids, base, start, n, E):
    """The zone as an explicit execution buffer: NaN rows past each count."""
    S, H, _ = ids.shape
    D = cen.shape[-1]
    k = torch.full((S, H, E, D), float("nan"), dtype=cen.dtype, device=cen.device)
    v, lw = k.clone(), torch.full((S, H, E), float("nan"), device=cen.device)
    for s in range(S):
        r, m = (int(start[s]) if start is not None else 0), int(n[s])
        for h in range(H):
            c = ids[s, h, r:r + m].long() + (int(base[s]) if base is not None else 0)
            k[s, h, :m], v[s, h, :m], lw[s, h, :m] = cen[h, c], vm[h, c], log_size[h, c]
    return k, v, lw, n.to(torch.int32)[:, None].expand(S, H).contiguous()


def check_state(out, lse, ref_out, ref_lse, dtype, what):
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    assert_close(out, ref_out, dtype, what)
    empty = ref_lse == float("-inf")
    assert torch.equal(lse == float("-inf"), empty), what
    assert (out[empty] == 0).all(), what
    if (~empty).any():
        assert (lse[~empty] - ref_lse[~empty]).abs().max().item() < 1e-3, what


@pytest.mark.parametrize("device,dtype,case", PARAMS)
def test_estimate_decode_matches_ref_and_gathered(device, dtype, case):
    S, H, G, D, N, K, E = case[:7]
    q, cen, vm, log_size, ids, cnt, base, start, n = make_case(device, dtype, case)
    scale = D ** -0.5
    poison_cuda_cache(device)
    out, lse = estimate_decode(q, cen, vm, log_size, ids, cnt, scale, base=base, start=start, width=E)
    ref_out, ref_lse = estimate_decode_ref(q, cen, vm, log_size, ids, cnt, scale, base=base, start=start,
                                           width=E)
    check_state(out, lse, ref_out, ref_lse, dtype, f"estimate_decode vs ref {case[:8]}")
    k, v, lw, lens = gather_rows(cen, vm, log_size, ids, base, start, n, E)
    wd = weighted_decode_ref if (device == "cpu" and dtype == torch.bfloat16) else weighted_decode
    g_out, g_lse = wd(q, k, v, lens, lw, scale)
    check_state(out, lse, g_out, g_lse, dtype, f"estimate_decode vs gathered weighted_decode {case[:8]}")
    if base is not None and not (device == "cpu" and dtype == torch.bfloat16):   # (interpreter: bf16 dot)
        # The wave decode's form: local ids into the logits the scoring pass already computed
        from retroinfer.kernels.centroid_scores import centroid_logits
        span = N // S
        lg = centroid_logits(q, cen, torch.full((S,), span, dtype=torch.int32, device=device), scale,
                             base=base, width=span)
        l_out, l_lse = estimate_decode(q, cen, vm, log_size, ids, cnt, scale, base=base, start=start, width=E,
                                       logits=lg)
        check_state(l_out, l_lse, ref_out, ref_lse, dtype, f"estimate_decode from logits vs ref {case[:8]}")


@pytest.mark.parametrize("device,dtype", [("cpu", torch.float32), ("cpu", torch.float16)] + [
    pytest.param("cuda", dt, marks=pytest.mark.gpu) for dt in GPU_DTYPES])
def test_estimate_decode_splits(device, dtype):
    """Any split factor gives the same state (uneven splits, more splits than blocks)."""
    case = (2, 2, 4, 64, 500, 200, 190, [190, 70], [10, 0], True, torch.int64)
    q, cen, vm, log_size, ids, cnt, base, start, _ = make_case(device, dtype, case)
    ref = estimate_decode_ref(q, cen, vm, log_size, ids, cnt, 0.125, base=base, start=start, width=190)
    for ns in (1, 4, 64):
        out, lse = estimate_decode(q, cen, vm, log_size, ids, cnt, 0.125, base=base, start=start, width=190,
                                   num_splits=ns)
        check_state(out, lse, *ref, dtype, f"num_splits={ns}")


@pytest.mark.parametrize("device,dtype", [("cpu", torch.float32), ("cpu", torch.float16)] + [
    pytest.param("cuda", dt, marks=pytest.mark.gpu) for dt in GPU_DTYPES])
def test_estimate_decode_replaces_execution_buffer(device, dtype):
    """wave decode before: estimation rows gathered into rows [0, E) of the execution buffer (weight
    -inf past the count), retrieved KV after them, one weighted_decode. After: estimate_decode on
    the topk list in place, merged with weighted_decode over the retrieved KV alone."""
    g = gen(device, "estimate-buffer", dtype)
    S, H, G, D, N, W, R, E, X = 4, 2, 4, 64, 400, 100, 16, 64, 48
    q = randn(g, S, H, G, D, dtype=dtype)
    cen, vm = randn(g, H, N, D, dtype=dtype), randn(g, H, N, D, dtype=dtype)
    log_size = torch.rand(H, N, generator=g, device=device) * 3
    plan_base = torch.tensor([0, 100, 200, 300], device=device)
    retrieve = torch.tensor([0, 5, 16, 3], device=device)
    estimate = torch.tensor([0, 64, 30, 1], device=device)
    top = torch.rand(S, H, W, generator=g, device=device).topk(R + E, dim=-1, sorted=True).indices
    kr, vr = randn(g, S, H, X, D, dtype=dtype), randn(g, S, H, X, D, dtype=dtype)   # "retrieved" KV
    n_ret = torch.randint(0, X + 1, (S, H), generator=g, device=device)
    n_ret[0] = 0
    # -- before (the code WaveAttention's estimation zone used to run) --
    base, r_b = plan_base[:, None, None], retrieve[:, None, None]
    k_x = torch.empty(S, H, E + X, D, device=device, dtype=dtype)
    v_x = torch.empty_like(k_x)
    log_w = torch.zeros(S, H, E + X, device=device)
    j = torch.arange(E, device=device)
    ids = top.gather(2, (r_b + j).clamp(max=top.shape[-1] - 1).expand(S, H, E)) + base
    sel = ids[..., None].expand(-1, -1, -1, D)
    k_x[:, :, :E] = cen[None].expand(S, -1, -1, -1).gather(2, sel)
    v_x[:, :, :E] = vm[None].expand(S, -1, -1, -1).gather(2, sel)
    log_w[:, :, :E] = torch.where(j < estimate[:, None, None], log_size[None].expand(S, -1, -1).gather(2, ids),
                                  float("-inf"))
    k_x[:, :, E:], v_x[:, :, E:] = kr, vr
    old = weighted_decode(q, k_x, v_x, (n_ret + E).to(torch.int32), log_w, D ** -0.5)
    # -- after --
    est = estimate_decode(q, cen, vm, log_size, top, estimate, D ** -0.5, base=plan_base, start=retrieve, width=E)
    ret = weighted_decode(q, kr, vr, n_ret.to(torch.int32), None, D ** -0.5)
    new = merge_states(*est, *ret)
    check_state(*new, *old, dtype, "estimate_decode + merge_states vs execution buffer")
