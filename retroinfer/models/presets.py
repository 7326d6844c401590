"""Models without files: `tiny` (CPU, tests) and `random:<arch>` — the real architectures with
random weights generated on the target device (benchmarks; shapes, not values, decide speed)."""
from __future__ import annotations

import zlib

import torch

from ..config import ConfigError, ModelConfig

TINY_VOCAB = 320   # 256 bytes + specials of the byte tokenizer, rounded up


def _llama(**kw) -> ModelConfig:
    base = dict(arch="llama", rms_norm_eps=1e-5, bos_token_id=256, eos_token_ids=(257,), dtype="bfloat16")
    return ModelConfig(**{**base, **kw})


PRESETS = {
    "tiny": _llama(vocab_size=TINY_VOCAB, hidden_size=256, intermediate_size=704, num_layers=4,
                   num_heads=4, num_kv_heads=2, head_dim=64, rope_theta=500000.0,
                   max_position_embeddings=16384, dtype="float32"),   # as deployments/tiny.yaml
    "llama3-8b": _llama(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                        num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
                        max_position_embeddings=1048576),
    "qwen2.5-7b": _llama(arch="qwen2", attention_bias=True, vocab_size=152064, hidden_size=3584,
                         intermediate_size=18944, num_layers=28, num_heads=28, num_kv_heads=4,
                         head_dim=128, rope_theta=1000000.0, rms_norm_eps=1e-6,
                         max_position_embeddings=1048576),
    "qwen2.5-72b": _llama(arch="qwen2", attention_bias=True, vocab_size=152064, hidden_size=8192,
                          intermediate_size=29568, num_layers=80, num_heads=64, num_kv_heads=8,
                          head_dim=128, rope_theta=1000000.0, rms_norm_eps=1e-6,
                          max_position_embeddings=1048576),
}


def is_preset(model: str) -> bool:
    return model == "tiny" or model.startswith("random:")


def preset_config(model: str) -> ModelConfig:
    name = "tiny" if model == "tiny" else model.removeprefix("random:")
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {model!r}; choose tiny or random:{{{','.join(PRESETS)}}}")
    return PRESETS[name]


def _shape(cfg: ModelConfig, name: str) -> tuple[int, ...]:
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    leaf = name.split(".", 3)[-1] if name.startswith("model.layers.") else name
    shapes = {
        "model.embed_tokens.weight": (cfg.vocab_size, h), "lm_head.weight": (cfg.vocab_size, h),
        "model.norm.weight": (h,), "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (cfg.num_heads * d, h), "self_attn.q_proj.bias": (cfg.num_heads * d,),
        "self_attn.k_proj.weight": (cfg.num_kv_heads * d, h), "self_attn.k_proj.bias": (cfg.num_kv_heads * d,),
        "self_attn.v_proj.weight": (cfg.num_kv_heads * d, h), "self_attn.v_proj.bias": (cfg.num_kv_heads * d,),
        "self_attn.o_proj.weight": (h, cfg.num_heads * d), "mlp.gate_proj.weight": (i, h),
        "mlp.up_proj.weight": (i, h), "mlp.down_proj.weight": (h, i),
    }
    return shapes[leaf]


def random_source(cfg: ModelConfig, seed: int, device):
    """get(name) draws the tensor on `device` from a generator seeded by (seed, name): the same
    weights whichever stage or process asks on that kind of device (CPU and CUDA generators
    differ)."""
    device = torch.device(device)

    def get(name: str) -> torch.Tensor:
        shape = _shape(cfg, name)
        g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        x = torch.randn(shape, generator=g, device=device)
        if name.endswith("norm.weight"):
            return 1.0 + 0.1 * x
        if name.endswith(".bias"):
            return 0.1 * x
        return x if name == "model.embed_tokens.weight" else x / shape[-1] ** 0.5

    names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    return get, names
