"""The full-attention backend's packed decode plan (one host buffer, one copy) against the
per-sequence plan it replaced, and its KV writes and attention on CPU."""
import random

import pytest
import torch

from retroinfer.attention import make_backend
from retroinfer.kernels import next_pow2
from retroinfer.attention.full import PAGE
from retroinfer.models.presets import preset_config


def _old_plan(tables: list[list[int]], lens: list[int], scratch: int, batch: int | None = None):
    """The previous `plan_decode` (+ `load_static_plan` into a [batch, pow2 width] buffer when
    batch is given), on lists: block_table, lengths, write_page, write_off."""
    max_pages = max(-(-(n + 1) // PAGE) for n in lens)
    table = torch.zeros(len(lens), max_pages, dtype=torch.int32)
    for i, t in enumerate(tables):
        t = torch.tensor(t[:max_pages], dtype=torch.int32)
        table[i, :t.numel()] = t
    pos = torch.tensor(lens)
    plan = (table, (pos + 1).to(torch.int32), table[torch.arange(len(lens)), pos // PAGE].long(), pos % PAGE)
    if batch is None:
        return plan
    B, w = table.shape
    static = (torch.full((batch, next_pow2(w)), scratch, dtype=torch.int32), torch.ones(batch, dtype=torch.int32),
              torch.full((batch,), scratch, dtype=torch.long), torch.zeros(batch, dtype=torch.long))
    static[0][:B, :w] = table
    for s, p in zip(static[1:], plan[1:]):
        s[:B] = p
    return static


def _backend():
    return make_backend("full", preset_config("tiny"), range(1), "cpu", torch.float32, 1 << 24)


@pytest.mark.parametrize("seed", range(6))
def test_packed_plan_equals_the_old_plan(seed):
    rng = random.Random(seed)
    fb = _backend()
    B = rng.randint(1, 11)
    lens = [rng.choice([0, 1, PAGE - 1, PAGE, PAGE + 1, 3 * PAGE - 1, rng.randint(1, 20 * PAGE)]) for _ in range(B)]
    for i, n in enumerate(lens):       # reservations of varied slack, pages scattered by the allocator
        fb.reserve(i, n + 1 + rng.randint(0, 3 * PAGE))
        fb.seq_len[i] = n
        if rng.random() < 0.5:
            fb.reserve(("gap", i), rng.randint(1, 2 * PAGE))
    tables = [fb.tables[i].tolist() for i in range(B)]
    order = rng.sample(range(B), B)
    plan = fb.plan_decode(order)
    tables, lens = [tables[i] for i in order], [lens[i] for i in order]
    old = _old_plan(tables, lens, fb.scratch_page)
    W = plan.width
    assert plan.batch == next_pow2(B) and W == next_pow2(old[0].shape[1])
    # Eager form: the same values wherever the kernel reads; past a row's length, its own pages then scratch.
    assert torch.equal(plan.lengths, old[1]) and torch.equal(plan.write_page, old[2])
    assert torch.equal(plan.write_off, old[3])
    assert plan.block_table.shape == (B, W) and plan.block_table.dtype == torch.int32
    for i, (t, n) in enumerate(zip(tables, lens)):
        need = -(-(n + 1) // PAGE)
        assert torch.equal(plan.block_table[i, :need], old[0][i, :need])
        assert plan.block_table[i].tolist() == (t[:W] + [fb.scratch_page] * W)[:W]
    # Graph form: the whole padded buffer in one copy equals the old padded static plan.
    static = fb.static_plan(plan.batch, plan)
    static.packed.fill_(-7)
    fb.load_static_plan(static, plan)
    old_static = _old_plan(tables, lens, fb.scratch_page, batch=plan.batch)
    assert torch.equal(static.lengths, old_static[1]) and torch.equal(static.write_page, old_static[2])
    assert torch.equal(static.write_off, old_static[3])
    assert static.block_table.shape == (plan.batch, W)
    assert (static.block_table[B:] == fb.scratch_page).all()
    for i, n in enumerate(lens):
        need = -(-(n + 1) // PAGE)
        assert torch.equal(static.block_table[i, :need], old_static[0][i, :need])
    # The step advanced every sequence by one token, and a second plan does not touch the first.
    assert [fb.seq_len[i] for i in order] == [n + 1 for n in lens]
    before = plan.packed.clone()
    fb.plan_decode(order)
    assert torch.equal(plan.packed, before)


def test_chunked_prefill_and_decode_over_page_boundaries():
    torch.manual_seed(0)
    cfg = preset_config("tiny")
    fb = _backend()
    H, D, Hq = cfg.num_kv_heads, cfg.head_dim, cfg.num_heads
    lens = [PAGE - 1, PAGE, 3 * PAGE + 5]
    ks = [torch.randn(n + 2, H, D) for n in lens]
    vs = [torch.randn(n + 2, H, D) for n in lens]
    fb.reserve("x", 7)                                       # so that pages are not in order
    for i, n in enumerate(lens):
        fb.reserve(i, n + 2)
        for a, b in ((0, 1), (1, PAGE + 3), (PAGE + 3, n)):  # chunks straddling pages
            if a < min(b, n):
                fb.write_prefill(0, i, ks[i][a:min(b, n)], vs[i][a:min(b, n)], a)
    for step in range(2):
        plan = fb.plan_decode([2, 0, 1])
        q = torch.randn(3, Hq, D)
        k_new = torch.stack([ks[i][lens[i] + step] for i in (2, 0, 1)])
        v_new = torch.stack([vs[i][lens[i] + step] for i in (2, 0, 1)])
        out = fb.decode(0, plan, q, k_new, v_new)
        for r, i in enumerate((2, 0, 1)):
            n = lens[i] + step + 1
            k_i, v_i = ks[i][:n], vs[i][:n]
            G = Hq // H
            s = torch.einsum("hgd,nhd->hgn", q[r].view(H, G, D), k_i) * fb.scale
            ref = torch.einsum("hgn,nhd->hgd", s.softmax(-1), v_i).reshape(Hq, D)
            assert torch.allclose(out[r], ref, atol=1e-5)
    used = fb.stats()["used_bytes"]
    fb.free(1)
    assert fb.stats()["used_bytes"] < used and 1 not in fb.tables
