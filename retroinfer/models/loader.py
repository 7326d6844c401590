"""Hugging Face checkpoint loading: safetensors, single file or sharded, one layer range at a time."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..config import ConfigError, ModelConfig
from .layers import LayerWeights

TensorSource = Callable[[str], torch.Tensor]   # HF tensor name -> tensor (any device/dtype)


def checkpoint_source(model_dir: str | Path) -> tuple[TensorSource, set[str]]:
    """Lazy reader over a directory's safetensors files; returns (get, available names)."""
    from safetensors import safe_open

    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
    else:
        files = sorted(d.glob("*.safetensors"))
        if not files:
            raise ConfigError(f"{d}: no *.safetensors weights found")
        weight_map = {}
        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                weight_map.update({k: f.name for k in fh.keys()})
    handles: dict[str, object] = {}

    def get(name: str) -> torch.Tensor:
        fname = weight_map.get(name)
        if fname is None:
            raise ConfigError(f"{d}: checkpoint lacks tensor {name!r}")
        if fname not in handles:
            path = d / fname
            if not path.is_file():
                raise ConfigError(f"{d}: shard {fname} named in the index is missing")
            handles[fname] = safe_open(str(path), framework="pt")
        return handles[fname].get_tensor(name)

    return get, set(weight_map)


def load_layer(get: TensorSource, cfg: ModelConfig, i: int, device, dtype) -> LayerWeights:
    p = f"model.layers.{i}."

    def t(name):
        return get(p + name).to(device=device, dtype=dtype)

    qkv = torch.cat([t("self_attn.q_proj.weight"), t("self_attn.k_proj.weight"), t("self_attn.v_proj.weight")])
    bias = None
    if cfg.attention_bias:
        bias = torch.cat([t("self_attn.q_proj.bias"), t("self_attn.k_proj.bias"), t("self_attn.v_proj.bias")])
    return LayerWeights(
        input_norm=t("input_layernorm.weight"), qkv=qkv, qkv_bias=bias, o=t("self_attn.o_proj.weight"),
        post_norm=t("post_attention_layernorm.weight"),
        gate_up=torch.cat([t("mlp.gate_proj.weight"), t("mlp.up_proj.weight")]),
        down=t("mlp.down_proj.weight"),
    )


def load_head(get: TensorSource, names: Iterable[str], cfg: ModelConfig, device, dtype,
              embed: bool, head: bool) -> dict[str, torch.Tensor]:
    """Embedding (first stage), final norm and LM head (last stage)."""
    names = set(names)
    out = {}
    if embed:
        out["embed"] = get("model.embed_tokens.weight").to(device=device, dtype=dtype)
    if head:
        out["norm"] = get("model.norm.weight").to(device=device, dtype=dtype)
        tied = cfg.tie_word_embeddings or "lm_head.weight" not in names
        key = "model.embed_tokens.weight" if tied else "lm_head.weight"
        out["lm_head"] = out["embed"] if tied and embed else get(key).to(device=device, dtype=dtype)
    return out
