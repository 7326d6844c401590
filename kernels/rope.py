"""Rotary position embedding of q and k in one launch (rotate-half convention of HF checkpoints).

For token t and each head x of q [T, Hq, D] and k [T, Hkv, D], with cos/sin [T, D]:

    out = x * cos[t] + rotate_half(x) * sin[t],     rotate_half(x) = cat(-x[D/2:], x[:D/2])

rounded like torch's ``x * cos + rotated * sin``: each product, then the sum, to the result dtype
(promoted dtype of x and cos). Torch spends 5 kernels per tensor; this is one for both.

Triton: grid ``(cdiv(T, BLOCK_T), Hq + Hkv)``; a program rotates one head of q or of k for BLOCK_T
tokens (BLOCK_T = 1 in decode; both halves of D at once), reading all of it before writing, so the
outputs may alias the inputs (in place on the views of a fused QKV projection output, row stride
(Hq + 2 Hkv) D).
"""

from __future__ import annotations

import torch

from ._triton_util import (FLOAT_DTYPES, cdiv, check_last_contiguous, lazy_jit, next_pow2, tl,
                           use_triton)

TILE = 1024    # rotation pairs a program handles at most: BLOCK_T tokens of one head


@lazy_jit
def _rope_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh,
    stride_qot, stride_qoh, stride_kot, stride_koh,
    stride_ct, stride_st,
    T, HQ, HALF,
    BLOCK_T: tl.constexpr, BLOCK: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1).to(tl.int64)
    if h < HQ:
        src = q_ptr + h * stride_qh + t * stride_qt
        dst = qo_ptr + h * stride_qoh + t * stride_qot
    else:
        src = k_ptr + (h - HQ) * stride_kh + t * stride_kt
        dst = ko_ptr + (h - HQ) * stride_koh + t * stride_kot
    offs = tl.arange(0, BLOCK)
    mask = (t < T)[:, None] & (offs < HALF)[None, :]
    src = src[:, None] + offs[None, :]
    dst = dst[:, None] + offs[None, :]
    c = cos_ptr + t[:, None] * stride_ct + offs[None, :]
    s = sin_ptr + t[:, None] * stride_st + offs[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(c, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(c + HALF, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(s, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(s + HALF, mask=mask, other=0.0).to(tl.float32)
    ty = qo_ptr.dtype.element_ty
    o1 = ((x1 * c1).to(ty).to(tl.float32) + (-x2 * s1).to(ty).to(tl.float32)).to(ty)
    o2 = ((x2 * c2).to(ty).to(tl.float32) + (x1 * s2).to(ty).to(tl.float32)).to(ty)
    tl.store(dst, o1, mask=mask)
    tl.store(dst + HALF, o2, mask=mask)


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D]; cos/sin: [T, D]. Plain torch, the rotate-half convention of HF checkpoints."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def apply_rope_ref(q, k, cos, sin, q_out=None, k_out=None):
    """Plain-torch ``apply_rope`` (the CPU path and the test oracle)."""
    q_rot, k_rot = rope_ref(q, cos, sin), rope_ref(k, cos, sin)
    if q_out is not None:
        q_rot = q_out.copy_(q_rot)
    if k_out is not None:
        k_rot = k_out.copy_(k_rot)
    return q_rot, k_rot


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               q_out: torch.Tensor | None = None,
               k_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE of the module docstring on q [T, Hq, D] and k [T, Hkv, D] (any strides, last dim
    contiguous, D even); cos, sin: [T, D] (row stride, last dim contiguous).

    Results go to ``q_out`` / ``k_out`` (same shapes; pass q, k themselves for in place), else
    to new contiguous tensors. Returns ``(q_rot, k_rot)``.
    """
    if not use_triton(q, k, cos, sin):
        return apply_rope_ref(q, k, cos, sin, q_out, k_out)
    assert q.dim() == 3 and k.dim() == 3, "q [T, Hq, D], k [T, Hkv, D]"
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    assert k.shape == (T, Hkv, D) and cos.shape == (T, D) and sin.shape == (T, D), \
        (q.shape, k.shape, cos.shape, sin.shape)
    assert D % 2 == 0, f"head_dim {D} must be even"
    assert q.dtype in FLOAT_DTYPES and k.dtype == q.dtype and sin.dtype == cos.dtype, (q.dtype, k.dtype)
    assert len({t.device for t in (q, k, cos, sin)}) == 1
    out_dtype = torch.promote_types(q.dtype, cos.dtype)
    if q_out is None:
        q_out = torch.empty(q.shape, device=q.device, dtype=out_dtype)
    if k_out is None:
        k_out = torch.empty(k.shape, device=k.device, dtype=out_dtype)
    assert q_out.shape == q.shape and k_out.shape == k.shape, (q_out.shape, k_out.shape)
    assert q_out.dtype == out_dtype and k_out.dtype == out_dtype, (q_out.dtype, k_out.dtype, out_dtype)
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin), ("q_out", q_out), ("k_out", k_out)):
        check_last_contiguous(name, t)
    if T == 0 or Hq + Hkv == 0:
        return q_out, k_out
    BLOCK = next_pow2(D // 2)
    BLOCK_T = max(1, min(next_pow2(T), TILE // BLOCK))
    _rope_kernel[(cdiv(T, BLOCK_T), Hq + Hkv)](
        q, k, q_out, k_out, cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        cos.stride(0), sin.stride(0),
        T, Hq, D // 2,
        BLOCK_T=BLOCK_T, BLOCK=BLOCK, num_warps=min(4, max(1, BLOCK_T * BLOCK // 256)),
    )
    return q_out, k_out


__all__ = ["apply_rope", "apply_rope_ref", "rope_ref"]
