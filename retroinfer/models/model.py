"""A contiguous range of decoder layers (a pipeline stage), with the embedding on the first stage
and the final norm + LM head on the last. One shard holding every layer is the whole model."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..attention import prefill as dense   # by module: bench_wave_error.py wraps causal_attention
from ..config import ModelConfig
from .layers import DecoderLayer, rms_norm
from .loader import checkpoint_source, load_head, load_layer
from .presets import is_preset, random_source
from .rope import Rotary

Progress = Callable[[int], None]   # called with the global index of each finished layer


def drain(steps):
    """Runs a generator to its end and returns its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


class ModelShard:
    def __init__(self, cfg: ModelConfig, layer_ids: range, device: torch.device, dtype: torch.dtype,
                 get, names, first: bool, last: bool):
        self.cfg, self.layer_ids, self.device, self.dtype = cfg, layer_ids, torch.device(device), dtype
        self.first, self.last = first, last
        self.rotary = Rotary(cfg, self.device)
        self.layers = [DecoderLayer(cfg, load_layer(get, cfg, i, self.device, dtype), self.rotary)
                       for i in layer_ids]
        head = load_head(get, names, cfg, self.device, dtype, embed=first, head=last)
        self.embed_w, self.norm_w, self.lm_head = head.get("embed"), head.get("norm"), head.get("lm_head")

    @classmethod
    def load(cls, model: str | Path, cfg: ModelConfig, layer_ids: range, device, dtype, seed: int = 0):
        if is_preset(str(model)):
            # tiny draws on the CPU so that every device gets the same weights; the big
            # architectures draw on their device (no host copy of an 8B model).
            get, names = random_source(cfg, seed, "cpu" if model == "tiny" else device)
        else:
            get, names = checkpoint_source(model)
        return cls(cfg, layer_ids, device, dtype, get, names,
                   first=layer_ids.start == 0, last=layer_ids.stop == cfg.num_layers)

    # -- entry and exit -------------------------------------------------------------------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids.to(self.device), self.embed_w)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, H] hidden states of the tokens to sample from -> [N, vocab] float32."""
        return F.linear(rms_norm(x, self.norm_w, self.cfg.rms_norm_eps), self.lm_head).float()

    # -- passes ---------------------------------------------------------------------------------
    def prefill(self, x: torch.Tensor, start: int, backend, seq_id, chunk: int,
                progress: Progress | None = None) -> torch.Tensor:
        """Layer by layer over the whole prompt, in place on x [T, H]; see `prefill_steps`."""
        return drain(self.prefill_steps(x, start, backend, seq_id, chunk, progress))

    @torch.inference_mode()
    def prefill_steps(self, x: torch.Tensor, start: int, backend, seq_id, chunk: int,
                      progress: Progress | None = None):
        """Generator form of `prefill`: yields after every chunk of every layer, so that the
        engine can run decode steps of other sequences in between; returns x.

        Peak memory for T tokens (b bytes per element, H hidden, I intermediate, KV = Hkv*D,
        c = chunk): the residual T*H*b, one layer's K and V 2*T*KV*b, plus per chunk the QKV
        c*(H + 2KV)*b, the gate/up c*2I*b and SDPA's O(c) workspace. Llama-3-8B, T = 1M, bf16,
        c = 16K: 8 GiB + 4 GiB + ~1.5 GiB on top of 16 GiB of weights; the full KV of all layers
        (128 GiB) is the backend's business (wave offload keeps it in host memory).
        """

        c = self.cfg
        T = x.shape[0]
        positions = torch.arange(start, start + T, device=self.device)
        for li, layer in zip(self.layer_ids, self.layers):
            k_all = torch.empty(T, c.num_kv_heads, c.head_dim, device=self.device, dtype=x.dtype)
            v_all = torch.empty_like(k_all)
            for s in range(0, T, chunk):
                e = min(T, s + chunk)
                xs = x[s:e]                                      # the residual stream, in place
                cos, sin = self.rotary.cos_sin(positions[s:e], x.dtype)
                h, _ = layer.input_norm(xs)
                q, k, v = layer.qkv(h, cos, sin)
                k_all[s:e], v_all[s:e] = k, v
                o = dense.causal_attention(q, k_all[:e], v_all[:e], q_start=s)
                h, _ = layer.post_attn_norm(o, xs, residual_out=xs)
                xs += layer.mlp(h)
                yield
            backend.write_prefill(li, seq_id, k_all, v_all, start)
            if progress is not None:
                progress(li)
        return x

    @torch.inference_mode()
    def decode(self, x: torch.Tensor, positions: torch.Tensor, backend, plan) -> torch.Tensor:
        """One token for each of B sequences: x [B, H], positions [B]. The residual stream is
        carried through the layers (each MLP output is added by the next layer's input norm)."""
        cos, sin = self.rotary.cos_sin(positions.to(self.device), x.dtype)
        residual = None
        for li, layer in zip(self.layer_ids, self.layers):
            h, residual = layer.input_norm(x, residual)
            q, k, v = layer.qkv(h, cos, sin)
            h, residual = layer.post_attn_norm(backend.decode(li, plan, q, k, v), residual)
            x = layer.mlp(h)
        return x if residual is None else x + residual
