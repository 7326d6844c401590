"""SwiGLU activation of a fused gate/up projection output.

For ``gate_up [T, 2I] = cat(gate, up)`` along the last dim:

    out = silu(gate) * up,      silu(g) = g / (1 + exp(-g))

rounded like torch's ``F.silu(gate) * up``: silu computed in fp32 and rounded to the input dtype,
then the product rounded again. Torch spends 2 kernels (silu, mul); this is one.

Triton: grid ``(cdiv(T, BLOCK_T), cdiv(I, BLOCK_I))``; a program reads BLOCK_I gate and up columns of
BLOCK_T rows (BLOCK_T > 1 only when I <= 512).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton_util import (FLOAT_DTYPES, cdiv, check_last_contiguous, lazy_jit, next_pow2, tl,
                           use_triton)

TILE = 1024    # elements a program handles at most: BLOCK_T rows x BLOCK_I columns


@lazy_jit
def _silu_mul_kernel(
    x_ptr, out_ptr,
    stride_x, stride_o,
    T, I,
    BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (rows < T)[:, None] & (cols < I)[None, :]
    src = x_ptr + rows[:, None] * stride_x + cols[None, :]
    g = tl.load(src, mask=mask, other=0.0)
    u = tl.load(src + I, mask=mask, other=0.0).to(tl.float32)
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], (act * u).to(g.dtype), mask=mask)


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """Plain torch (the CPU path and the test oracle)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of the module docstring; gate_up: [..., 2I] (rows strided, last dim
    contiguous) -> a new contiguous [..., I] tensor of the same dtype."""
    if not use_triton(gate_up):
        return silu_mul_ref(gate_up)
    assert gate_up.dtype in FLOAT_DTYPES, gate_up.dtype
    two_i = gate_up.shape[-1]
    assert two_i % 2 == 0, f"last dim {two_i} must be even (cat(gate, up))"
    check_last_contiguous("gate_up", gate_up)
    x = gate_up if gate_up.dim() == 2 else gate_up.view(-1, two_i)
    I = two_i // 2
    out = torch.empty(gate_up.shape[:-1] + (I,), device=gate_up.device, dtype=gate_up.dtype)
    T = x.shape[0]
    if T == 0 or I == 0:
        return out
    BLOCK_I = min(TILE, next_pow2(I))
    BLOCK_T = max(1, min(next_pow2(T), TILE // BLOCK_I))
    _silu_mul_kernel[(cdiv(T, BLOCK_T), cdiv(I, BLOCK_I))](
        x, out, x.stride(0), I, T, I,
        BLOCK_T=BLOCK_T, BLOCK_I=BLOCK_I, num_warps=min(4, max(1, BLOCK_T * BLOCK_I // 256)),
    )
    return out


__all__ = ["silu_mul", "silu_mul_ref"]
