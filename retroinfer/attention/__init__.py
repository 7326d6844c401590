"""Attention backends and their registry: `full` (dense, paged KV), `wave` (the three-zone wave
index; with `WaveConfig.dense_first` / `dense_last`, `layer_split.py` runs those layers as full) and
`quest` (page top-k by a min/max key bound over full's paged KV: the baseline of the
accuracy benchmarks). `base.py` is the contract every backend keeps."""
from __future__ import annotations

from ..config import ModelConfig, QuestConfig, WaveConfig
from .base import AttentionBackend, KVCapacityError
from .full import FullAttention
from .layer_split import LayerSplitAttention
from .quest import QuestAttention
from .wave import WaveAttention

__all__ = ["AttentionBackend", "KVCapacityError", "make_backend"]


def make_backend(name: str, cfg: ModelConfig, layer_ids: range, device, dtype,
                 kv_budget_bytes: int, wave: WaveConfig | None = None, max_seqs: int = 16,
                 host_kv_budget_bytes: int | None = None, quest: QuestConfig | None = None) -> AttentionBackend:
    if name in ("full", "quest") and host_kv_budget_bytes is not None:
        raise ValueError("KV offload to host memory needs attention 'wave'")
    if name == "full":
        return FullAttention(cfg, layer_ids, device, dtype, kv_budget_bytes)
    if name == "quest":      # its default budget is wave's exact share under `wave`
        return QuestAttention(cfg, layer_ids, device, dtype, kv_budget_bytes, quest or QuestConfig(),
                              wave or WaveConfig())
    if name == "wave":
        wave = wave or WaveConfig()
        dense = sorted(wave.dense_layers(cfg.num_layers) & set(layer_ids))
        if len(dense) == len(layer_ids):      # every layer of this stage dense
            return FullAttention(cfg, layer_ids, device, dtype, kv_budget_bytes)
        if dense:
            return LayerSplitAttention(cfg, layer_ids, device, dtype, kv_budget_bytes, wave, max_seqs,
                                       host_kv_budget_bytes, dense)
        return WaveAttention(cfg, layer_ids, device, dtype, kv_budget_bytes, wave or WaveConfig(), max_seqs,
                             host_kv_budget_bytes)
    raise ValueError(f"unknown attention backend {name!r}")
