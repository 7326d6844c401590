"""The wave decode step's inputs, placed in one launch: each sequence's new key and value into
its steady-zone row, and the queries into the per-slot layout every zone kernel reads.

For batch row ``b`` in slot ``slots[b]`` at steady row ``pos[b]`` (slots distinct, except the
scratch slot that padded rows of a CUDA graph share: any one of them wins there):

    k_steady[slots[b], :, pos[b]] = k[b]        v_steady[slots[b], :, pos[b]] = v[b]
    q_slots[s] = q[b] if s == slots[b] for some b, else 0

One launch because a decode step at small batch is bound by launches: the torch reference takes
four per layer and step (two index_put, a memset and a scatter).
"""

from __future__ import annotations

import torch

from ._triton_util import lazy_jit, next_pow2, tl, use_triton

# Launch parameters: the cap of the chunk of a slot's queries (Hq * D values) that one loop step
# copies, and warps. Batch rows, kv heads and head dims take one power-of-two block each.
TUNE = {"block_q": 4096, "num_warps": 4}


@lazy_jit
def _step_inputs_kernel(
    q_ptr, k_ptr, v_ptr, slots_ptr, pos_ptr, qs_ptr, ks_ptr, vs_ptr,
    stride_kb, stride_kh, stride_vb, stride_vh,
    stride_kss, stride_ksh, stride_ksn, stride_vss, stride_vsh, stride_vsn,
    B, S, H, QROW, D,
    BLOCK_B: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0)
    offs_b = tl.arange(0, BLOCK_B)
    slots = tl.load(slots_ptr + offs_b, mask=offs_b < B, other=-1)
    if i < S:   # slot i's queries (QROW = Hq * D values, contiguous in q and q_slots)
        b = tl.max(tl.where(slots == i, offs_b, -1), axis=0)   # padded graph rows share a scratch slot
        has = b >= 0
        b = tl.maximum(b, 0).to(tl.int64)
        for c in range(0, QROW, BLOCK_Q):
            offs = c + tl.arange(0, BLOCK_Q)
            x = tl.load(q_ptr + b * QROW + offs, mask=offs < tl.where(has, QROW, 0), other=0.0)
            tl.store(qs_ptr + i.to(tl.int64) * QROW + offs, x, mask=offs < QROW)
    if i < B:   # batch row i's key and value
        s = tl.sum(tl.where(offs_b == i, slots, 0), axis=0).to(tl.int64)
        p = tl.load(pos_ptr + i).to(tl.int64)
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        m = (offs_h < H)[:, None] & (offs_d < D)[None, :]
        k = tl.load(k_ptr + i * stride_kb + offs_h[:, None] * stride_kh + offs_d[None, :], mask=m)
        v = tl.load(v_ptr + i * stride_vb + offs_h[:, None] * stride_vh + offs_d[None, :], mask=m)
        tl.store(ks_ptr + s * stride_kss + offs_h[:, None] * stride_ksh + p * stride_ksn + offs_d[None, :], k, mask=m)
        tl.store(vs_ptr + s * stride_vss + offs_h[:, None] * stride_vsh + p * stride_vsn + offs_d[None, :], v, mask=m)


def step_inputs_ref(q, k, v, slots, pos, k_steady, v_steady, num_slots: int) -> torch.Tensor:
    """Plain-torch `step_inputs` (the CPU path and the test oracle)."""
    B, H = k.shape[:2]
    k_steady[slots, :, pos] = k
    v_steady[slots, :, pos] = v
    q_slots = q.new_zeros((num_slots, H, q.shape[1] // H, q.shape[2]))
    q_slots[slots] = q.view(B, H, -1, q.shape[2])
    return q_slots


def step_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, pos: torch.Tensor,
                k_steady: torch.Tensor, v_steady: torch.Tensor, num_slots: int) -> torch.Tensor:
    """q [B, Hq, D]; k, v [B, Hkv, D]; slots, pos [B] int (slots < num_slots, distinct but for scratch);
    k_steady, v_steady [>= num_slots, Hkv, rows, D] (last dim contiguous). Writes k, v into the
    steady zones in place; returns q_slots [num_slots, Hkv, Hq / Hkv, D] (zeros for idle slots)."""
    if not use_triton(q, k, v, k_steady, v_steady):
        return step_inputs_ref(q, k, v, slots, pos, k_steady, v_steady, num_slots)
    B, Hq, D = q.shape
    H = k.shape[1]
    assert k.shape == v.shape == (B, H, D) and slots.shape == pos.shape == (B,) and B <= num_slots
    assert k_steady.stride(3) == 1 and v_steady.stride(3) == 1 and k.stride(2) == 1 and v.stride(2) == 1
    q = q.contiguous()
    q_slots = q.new_empty((num_slots, H, Hq // H, D))
    _step_inputs_kernel[(num_slots,)](
        q, k, v, slots.contiguous(), pos.contiguous(), q_slots, k_steady, v_steady,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_steady.stride(0), k_steady.stride(1), k_steady.stride(2),
        v_steady.stride(0), v_steady.stride(1), v_steady.stride(2),
        B, num_slots, H, Hq * D, D,
        BLOCK_B=next_pow2(max(B, 2)), BLOCK_Q=min(TUNE["block_q"], next_pow2(Hq * D)),
        BLOCK_H=next_pow2(max(H, 2)), BLOCK_D=next_pow2(max(D, 16)), num_warps=TUNE["num_warps"],
    )
    return q_slots


__all__ = ["step_inputs", "step_inputs_ref"]
