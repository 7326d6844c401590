"""step_inputs: the decode step's steady-zone writes and per-slot queries in one launch, equal to
the index_put / scatter it replaces, padded rows sharing the scratch slot included."""

import pytest
import torch
from kernel_testutil import GPU, gen, randn

from retroinfer.kernels.step_inputs import step_inputs, step_inputs_ref

# (slots of the batch rows, num_slots, Hq, Hkv, D, steady rows)
CASES = [([1], 2, 4, 1, 16, 5), ([3, 1, 2], 4, 8, 2, 64, 9), ([5, 0, 0, 2], 8, 28, 4, 128, 3),
         ([7, 6, 5, 4, 3, 2, 1], 8, 32, 8, 80, 17)]
PARAMS = ([pytest.param("cpu", c, id=f"interp-{i}") for i, c in enumerate(CASES)]
          + [pytest.param("cuda", c, marks=GPU, id=f"cuda-{i}") for i, c in enumerate(CASES)])


@pytest.mark.parametrize("device,case", PARAMS)
def test_step_inputs_matches_ref(device, case):
    slots, S, Hq, H, D, rows = case
    g = gen(device, "step_inputs", case)
    B = len(slots)
    q, k, v = randn(g, B, Hq, D), randn(g, B, H, D), randn(g, B, H, D)
    slot_t = torch.tensor(slots, device=device)
    pos = torch.randint(0, rows, (B,), generator=g, device=device)
    pos[slot_t == 0] = 0                                   # the scratch rows write one place
    steady = [randn(g, S + 1, H, rows, D) for _ in range(2)]
    want_k, want_v = steady[0].clone(), steady[1].clone()
    got_q = step_inputs(q, k, v, slot_t, pos, steady[0], steady[1], S)
    want_q = step_inputs_ref(q, k, v, slot_t, pos, want_k, want_v, S)
    live = [s for s in range(S) if s != 0 or 0 not in slots]   # scratch: any padded row's q
    assert torch.equal(got_q[live], want_q[live])
    if 0 in slots:
        assert any(torch.equal(got_q[0], q[b].view(H, -1, D)) for b in range(B) if slots[b] == 0)
    real = [b for b in range(B) if slots[b] != 0]
    assert torch.equal(steady[0][slot_t[real]], want_k[slot_t[real]])
    assert torch.equal(steady[1][slot_t[real]], want_v[slot_t[real]])
    others = [s for s in range(S + 1) if s not in slots]
    assert torch.equal(steady[0][others], want_k[others]) and torch.equal(steady[1][others], want_v[others])
