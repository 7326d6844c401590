"""Fused elementwise kernels of the decoder layer (add + RMSNorm, RoPE, SwiGLU) against their
torch references, and the model's decode / prefill through them against the reference path."""
import pytest
import torch
from kernel_testutil import assert_close, cases, gen, poison_cuda_cache, randn

from retroinfer.kernels import (add_rms_norm, add_rms_norm_ref, apply_rope, apply_rope_ref, rope_ref,
                                silu_mul, silu_mul_ref)

# -- add + RMSNorm ----------------------------------------------------------------------------------
# (rows, hidden, layout, mode): layout contig | strided (rows of a wider buffer) | 3d ([2, N/2, H]);
# mode none (no residual) | add | inplace (residual_out=residual) | w32 (fp32 weight)
RMS_INTERP = [
    (1, 64, "contig", "add"),
    (3, 320, "strided", "add"),
    (3, 4096, "contig", "none"),
    (1000, 64, "contig", "inplace"),
    (6, 96, "3d", "w32"),
]
RMS_GPU = [
    (1, 4096, "contig", "add"),
    (1, 8192, "strided", "inplace"),
    (4097, 4096, "strided", "inplace"),
    (7, 16384, "contig", "add"),
    (65537, 64, "contig", "none"),
    (1000, 3584, "3d", "w32"),
]


def _rows(g, N, H, layout, dtype, device):
    if layout == "strided":
        return randn(g, N, H + 37, dtype=dtype).to(device)[:, 5:5 + H]
    if layout == "3d":
        return randn(g, 2, N // 2, H, dtype=dtype).to(device)
    return randn(g, N, H, dtype=dtype).to(device)


@pytest.mark.parametrize("device,dtype,case", cases(RMS_INTERP, RMS_GPU))
def test_add_rms_norm_matches_ref(device, dtype, case):
    N, H, layout, mode = case
    g = gen("cpu", "rms", dtype, case)
    x = _rows(g, N, H, layout, dtype, device)
    res = None if mode == "none" else _rows(g, N, H, layout, dtype, device)
    w = (1 + 0.5 * randn(g, H)).to(device=device, dtype=torch.float32 if mode == "w32" else dtype)
    eps = 1e-5
    ref_norm, ref_sum = add_rms_norm_ref(x.clone(), None if res is None else res.clone(), w, eps)
    poison_cuda_cache(device)
    res_before = None if res is None else res.clone()
    norm, s = add_rms_norm(x, res, w, eps, residual_out=res if mode == "inplace" else None)
    assert norm.shape == x.shape and norm.dtype == ref_norm.dtype and norm.is_contiguous()
    assert_close(norm, ref_norm, dtype, "normed")
    if mode == "none":
        assert s is x
        return
    assert torch.equal(s, ref_sum), "x + residual must round exactly like torch's add"
    if mode == "inplace":
        assert s.data_ptr() == res.data_ptr()
    else:
        assert torch.equal(res, res_before), "residual modified without residual_out"


# -- RoPE -------------------------------------------------------------------------------------------
# (T, Hq, Hkv, D, layout, in_place): layout qkv (views of a fused QKV output) | contig |
# qkv-cs (qkv views and cos/sin as column windows of wider tensors)
ROPE_INTERP = [
    (1, 4, 2, 64, "qkv", False),
    (3, 32, 8, 128, "qkv", True),
    (1000, 2, 1, 64, "contig", False),
    (5, 3, 3, 128, "qkv-cs", True),
]
ROPE_GPU = [
    (1, 32, 8, 128, "qkv", True),
    (4096, 32, 8, 128, "qkv", False),
    (16383, 28, 4, 128, "qkv-cs", True),
    (333, 64, 8, 64, "contig", False),
]


@pytest.mark.parametrize("device,dtype,case", cases(ROPE_INTERP, ROPE_GPU))
def test_apply_rope_matches_ref(device, dtype, case):
    T, Hq, Hkv, D, layout, in_place = case
    g = gen("cpu", "rope", dtype, case)
    if layout == "contig":
        q = randn(g, T, Hq, D, dtype=dtype).to(device)
        k = randn(g, T, Hkv, D, dtype=dtype).to(device)
        qkv = None
    else:
        qkv = randn(g, T, (Hq + 2 * Hkv) * D, dtype=dtype).to(device)
        q = qkv[:, :Hq * D].view(T, Hq, D)
        k = qkv[:, Hq * D:(Hq + Hkv) * D].view(T, Hkv, D)
    if layout == "qkv-cs":
        cos = randn(g, T, 2 * D, dtype=dtype).to(device)[:, D // 2:D // 2 + D]
        sin = randn(g, T, 3 * D, dtype=dtype).to(device)[:, D:2 * D]
    else:
        cos, sin = randn(g, T, D, dtype=dtype).to(device), randn(g, T, D, dtype=dtype).to(device)
    v_before = None if qkv is None else qkv[:, (Hq + Hkv) * D:].clone()
    ref_q, ref_k = apply_rope_ref(q.clone(), k.clone(), cos, sin)
    poison_cuda_cache(device)
    if in_place:
        out_q, out_k = apply_rope(q, k, cos, sin, q_out=q, k_out=k)
        assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()
    else:
        q_before, k_before = q.clone(), k.clone()
        out_q, out_k = apply_rope(q, k, cos, sin)
        assert out_q.is_contiguous() and out_k.is_contiguous()
        assert torch.equal(q, q_before) and torch.equal(k, k_before), "inputs modified"
    assert_close(out_q, ref_q, dtype, "q")
    assert_close(out_k, ref_k, dtype, "k")
    if v_before is not None:
        assert torch.equal(qkv[:, (Hq + Hkv) * D:], v_before), "v columns touched"


# -- SwiGLU -----------------------------------------------------------------------------------------
# (leading shape, I, layout): contig | strided (rows of a wider buffer)
SWIGLU_INTERP = [
    ((1,), 64, "contig"),
    ((3,), 300, "strided"),
    ((1000,), 64, "contig"),
    ((2,), 14336, "contig"),
    ((2, 3), 160, "contig"),
]
SWIGLU_GPU = [
    ((1,), 14336, "contig"),
    ((4096,), 14336, "strided"),
    ((333,), 18944, "contig"),
    ((70001,), 64, "contig"),
]


@pytest.mark.parametrize("device,dtype,case", cases(SWIGLU_INTERP, SWIGLU_GPU))
def test_silu_mul_matches_ref(device, dtype, case):
    lead, I, layout = case
    g = gen("cpu", "swiglu", dtype, case)
    if layout == "strided":
        x = (3 * randn(g, *lead, 2 * I + 24, dtype=dtype)).to(device)[..., 8:8 + 2 * I]
    else:
        x = (3 * randn(g, *lead, 2 * I, dtype=dtype)).to(device)
    ref = silu_mul_ref(x.clone())
    poison_cuda_cache(device)
    out = silu_mul(x)
    assert out.shape == lead + (I,) and out.dtype == dtype and out.is_contiguous()
    assert_close(out, ref, dtype, "silu_mul")


# -- the model through the fused ops ----------------------------------------------------------------
class _DenseKV:
    """Minimal attention backend: keeps one sequence's KV per layer, torch attention."""

    def __init__(self):
        self.k, self.v = {}, {}

    def write_prefill(self, layer, seq_id, k, v, start):
        self.k[layer], self.v[layer] = k.clone(), v.clone()

    def decode(self, layer, plan, q, k, v):
        from retroinfer.attention.prefill import causal_attention
        self.k[layer] = torch.cat([self.k[layer], k])
        self.v[layer] = torch.cat([self.v[layer], v])
        return causal_attention(q, self.k[layer], self.v[layer], q_start=self.k[layer].shape[0] - 1)


def _run_tiny(monkeypatch, fused: bool, dtype):
    from retroinfer.models.model import ModelShard
    from retroinfer.models.presets import preset_config
    if not fused:
        monkeypatch.delenv("RETROINFER_TRITON_INTERPRET", raising=False)
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cfg = preset_config("tiny")
    shard = ModelShard.load("tiny", cfg, range(cfg.num_layers), "cpu", dtype)
    backend, T = _DenseKV(), 11
    ids = torch.randint(0, cfg.vocab_size, (T + 2,), generator=gen("cpu", "tiny-ids"))
    hidden = shard.prefill(shard.embed(ids[:T]), 0, backend, "s", chunk=8)
    out = [shard.logits(hidden)]
    for t in (T, T + 1):
        out.append(shard.logits(shard.decode(shard.embed(ids[t:t + 1]), torch.tensor([t]), backend, None)))
    return torch.cat(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_model_through_fused_ops_matches_reference(monkeypatch, dtype):
    """Prefill (2 chunks) and 2 decode steps of the tiny model: fused kernels (interpreter) vs the
    torch references; checks the residual stream's wiring, not only each kernel."""
    fused = _run_tiny(monkeypatch, True, dtype)
    ref = _run_tiny(monkeypatch, False, dtype)
    assert fused.shape == ref.shape
    assert_close(fused, ref, dtype, "logits")
    if dtype == torch.float32:
        assert (fused - ref).abs().max().item() <= 1e-4
