"""Residual add fused with RMSNorm (HF Llama / Qwen2 order), one launch for all rows.

For each row of ``x [N, H]`` (and ``residual`` of the same shape, or none):

    s      = x + residual                                  (rounded to x.dtype; s = x if none)
    normed = weight * (s.float() * rsqrt(mean(s.float()^2) + eps)).to(x.dtype)

and ``weight * ...`` is rounded to the promoted dtype of weight and x, as torch does. Returns
``(normed, s)``: ``s`` is the residual stream the next add needs (vLLM's ``fused_add_rms_norm``).
Torch spends ~9 small kernels on this; the Triton kernel is one read of x, residual and weight and
one write of normed and s.

Triton: grid ``(cdiv(N, BLOCK_N),)``; a program loads BLOCK_N whole rows (``BLOCK_H =
next_pow2(H)``, H <= 16384; BLOCK_N = 1 from H > 1024), so ``residual_out`` may alias ``x`` or
``residual`` (every read of a row precedes its writes).
"""

from __future__ import annotations

import torch

from ._triton_util import (FLOAT_DTYPES, cdiv, check_last_contiguous, lazy_jit, next_pow2, tl,
                           use_triton)

MAX_HIDDEN = 16384
TILE = 2048    # elements a program handles at least: small rows are batched BLOCK_N to a program


@lazy_jit
def _add_rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, out_ptr, rout_ptr,
    stride_x, stride_r, stride_o, stride_ro,
    N, H, eps,
    HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs = tl.arange(0, BLOCK_H)
    mask = (rows < N)[:, None] & (offs < H)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + offs[None, :], mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(r_ptr + rows[:, None] * stride_r + offs[None, :], mask=mask, other=0.0)
        s = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)   # torch's add: one rounding
        tl.store(rout_ptr + rows[:, None] * stride_ro + offs[None, :], s, mask=mask)
    else:
        s = x
    sf = s.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(sf * sf, axis=1) / H + eps)
    n = (sf * rstd[:, None]).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=offs < H, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * stride_o + offs[None, :],
             (w[None, :] * n).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF order: normalise in fp32, cast back, then scale in the weight's dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch ``add_rms_norm`` (the CPU path and the test oracle)."""
    if residual is not None:
        x = x + residual
    return rms_norm_ref(x, weight, eps), x


def _rows(name: str, t: torch.Tensor, H: int) -> torch.Tensor:
    """t [..., H] as a [N, H] view with a row stride (fails loudly rather than copy)."""
    check_last_contiguous(name, t)
    return t if t.dim() == 2 else t.view(-1, H)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 residual_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(normed, x + residual)`` of the module docstring; ``residual=None`` gives ``(norm(x), x)``.

    x, residual: [..., H] of one float dtype (rows strided, last dim contiguous); weight: [H].
    ``residual_out``: where to write ``x + residual`` (may be x or residual itself, for an
    in-place update); a new tensor if None. ``normed`` is a new contiguous tensor.
    """
    if not use_triton(x, weight):
        normed, s = add_rms_norm_ref(x, residual, weight, eps)
        if residual_out is not None and residual is not None:
            residual_out.copy_(s)
            s = residual_out
        return normed, s
    H = x.shape[-1]
    assert weight.shape == (H,) and weight.is_contiguous(), (weight.shape, H)
    assert x.dtype in FLOAT_DTYPES and weight.dtype in FLOAT_DTYPES, (x.dtype, weight.dtype)
    assert H <= MAX_HIDDEN, f"hidden {H} > {MAX_HIDDEN}: one program holds a whole row"
    x2 = _rows("x", x, H)
    out = torch.empty(x.shape, device=x.device, dtype=torch.promote_types(x.dtype, weight.dtype))
    if residual is None:
        r2 = ro2 = x2                                   # dummies: HAS_RES is False
        s = x
    else:
        assert residual.shape == x.shape and residual.dtype == x.dtype, (residual.shape, residual.dtype)
        assert residual.device == x.device
        r2 = _rows("residual", residual, H)
        s = torch.empty_like(x) if residual_out is None else residual_out
        assert s.shape == x.shape and s.dtype == x.dtype, (s.shape, s.dtype)
        ro2 = _rows("residual_out", s, H)
    N = x2.shape[0]
    if N == 0:
        return out, s
    BLOCK_H = next_pow2(H)
    BLOCK_N = max(1, min(next_pow2(N), TILE // BLOCK_H))
    _add_rms_norm_kernel[(cdiv(N, BLOCK_N),)](
        x2, r2, weight, out.view(N, H), ro2,
        x2.stride(0), r2.stride(0), H, ro2.stride(0),
        N, H, float(eps),
        HAS_RES=residual is not None, BLOCK_N=BLOCK_N, BLOCK_H=BLOCK_H,
        num_warps=min(16, max(1, BLOCK_N * BLOCK_H // 256)),
    )
    return out, s


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm alone (``add_rms_norm`` without a residual)."""
    return add_rms_norm(x, None, weight, eps)[0]


__all__ = ["add_rms_norm", "add_rms_norm_ref", "rms_norm", "rms_norm_ref"]
