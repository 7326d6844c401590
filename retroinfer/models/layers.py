"""One decoder layer of Llama / Qwen2, as plain tensors: fused QKV and gate/up projections.

The residual stream is the caller's (vLLM's pattern): each norm takes the branch output and the
residual, adds them and normalises in one fused kernel (``kernels.rmsnorm.add_rms_norm``), so a
layer is, for x the previous layer's MLP output (or the embedding, with residual None):

    h, residual = layer.input_norm(x, residual)            # residual += x; h = norm(residual)
    q, k, v     = layer.qkv(h, cos, sin)                    # projection + RoPE
    h, residual = layer.post_attn_norm(attention(q, k, v), residual)
    x           = layer.mlp(h)                              # added by the next input_norm

On CPU every fused op is its plain-torch reference, in HF's order of operations.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..kernels.rmsnorm import add_rms_norm, rms_norm
from ..kernels.rope import apply_rope
from ..kernels.swiglu import silu_mul
from .rope import Rotary

__all__ = ["DecoderLayer", "LayerWeights", "rms_norm"]


@dataclass
class LayerWeights:
    input_norm: torch.Tensor       # [H]
    qkv: torch.Tensor              # [(Hq + 2 Hkv) D, H]
    qkv_bias: torch.Tensor | None  # Qwen2
    o: torch.Tensor                # [H, Hq D]
    post_norm: torch.Tensor        # [H]
    gate_up: torch.Tensor          # [2 I, H]
    down: torch.Tensor             # [H, I]


class DecoderLayer:
    """Norms, projections, RoPE and MLP of one layer; the attention itself is the caller's (a
    backend), and so is the residual stream (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, w: LayerWeights, rotary: Rotary):
        self.cfg, self.w, self.rotary = cfg, w, rotary
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim

    def input_norm(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """(norm(x + residual), x + residual); residual None: (norm(x), x). See add_rms_norm."""
        return add_rms_norm(x, residual, self.w.input_norm, self.cfg.rms_norm_eps)

    def qkv(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """h: normed input [T, H] -> q [T, Hq, D], k [T, Hkv, D] (new tensors, RoPE applied) and
        v [T, Hkv, D] (a view of the projection output)."""
        c = self.cfg
        qkv = F.linear(h, self.w.qkv, self.w.qkv_bias)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = apply_rope(q.view(-1, c.num_heads, c.head_dim), k.view(-1, c.num_kv_heads, c.head_dim),
                          cos, sin)
        return q, k, v.view(-1, c.num_kv_heads, c.head_dim)

    def post_attn_norm(self, o: torch.Tensor, residual: torch.Tensor,
                       residual_out: torch.Tensor | None = None):
        """Output projection of o [T, Hq, D], residual add and the MLP's norm:
        (norm(residual + o_proj(o)), residual + o_proj(o)); ``residual_out`` as in add_rms_norm."""
        attn = F.linear(o.reshape(o.shape[0], -1), self.w.o)
        return add_rms_norm(attn, residual, self.w.post_norm, self.cfg.rms_norm_eps, residual_out)

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        """SwiGLU MLP of the normed h [T, H]; its residual add is the caller's."""
        return F.linear(silu_mul(F.linear(h, self.w.gate_up)), self.w.down)
