"""One decoder layer of Llama / Qwen2, as plain tensors: fused QKV and gate/up projections."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from .rope import Rotary


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # HF order: normalise in fp32, cast back, then scale in the weight's dtype.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


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
    """Projections, RoPE and MLP of one layer; the attention itself is the caller's (a backend)."""

    def __init__(self, cfg: ModelConfig, w: LayerWeights, rotary: Rotary):
        self.cfg, self.w, self.rotary = cfg, w, rotary
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x: [T, H] -> q [T, Hq, D], k, v [T, Hkv, D], RoPE applied to q and k."""
        c = self.cfg
        h = rms_norm(x, self.w.input_norm, c.rms_norm_eps)
        qkv = F.linear(h, self.w.qkv, self.w.qkv_bias)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = Rotary.apply(q.view(-1, c.num_heads, c.head_dim), cos, sin)
        k = Rotary.apply(k.view(-1, c.num_kv_heads, c.head_dim), cos, sin)
        return q, k, v.view(-1, c.num_kv_heads, c.head_dim)

    def attn_out(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """Residual add of the output projection; o: [T, Hq, D]."""
        return x + F.linear(o.reshape(o.shape[0], -1), self.w.o)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        """Residual add of the SwiGLU MLP."""
        h = rms_norm(x, self.w.post_norm, self.cfg.rms_norm_eps)
        gate, up = F.linear(h, self.w.gate_up).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, self.w.down)
