"""A pipeline stage: a contiguous range of layers on one device, with its attention backend.
The in-process executor chains stages directly; the cluster wraps each in a Ray actor."""
from __future__ import annotations

from typing import Callable, Hashable

import torch

from ..attention import make_backend
from ..config import EngineConfig, ModelConfig, parse_dtype
from ..models.model import ModelShard, drain
from .cuda_graph import DecodeGraphs


def default_kv_budget(device: torch.device, reserve_bytes: int) -> int:
    if device.type == "cuda":
        torch.cuda.empty_cache()           # blocks cached by the weight load count as free
        free, _ = torch.cuda.mem_get_info(device)
        return max(0, int(free * 0.9) - reserve_bytes)
    return 2 << 30


def default_host_budget() -> int:
    """Half of the host memory available now."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return 8 << 30


class Stage:
    def __init__(self, cfg: EngineConfig, model_cfg: ModelConfig, layer_ids: range, device: str):
        self.cfg, self.model_cfg = cfg, model_cfg
        self.device = torch.device(device)
        self.dtype = parse_dtype(cfg.dtype or model_cfg.dtype)
        self.shard = ModelShard.load(cfg.model, model_cfg, layer_ids, self.device, self.dtype, cfg.seed)
        # Prefills in flight (max_model_len tokens of long prompts, besides short ones of at most the
        # step's prefill budget each: see engine/scheduler.py) need their residual and one layer's
        # K/V besides the cache.
        max_len = cfg.max_model_len or model_cfg.max_position_embeddings
        max_len += (cfg.prefill_budget_tokens or 0) * cfg.max_batch
        elem = self.dtype.itemsize
        headroom = max_len * (model_cfg.hidden_size * elem + model_cfg.kv_bytes_per_token(self.dtype, layers=1))
        headroom += cfg.prefill_chunk * (3 * model_cfg.hidden_size + 2 * model_cfg.intermediate_size) * elem * 2
        budget = cfg.kv_budget_bytes or default_kv_budget(self.device, headroom)
        host_budget = None
        if cfg.offload:
            host_budget = cfg.host_kv_budget_bytes or default_host_budget()
        self.backend = make_backend(cfg.attention, model_cfg, layer_ids, self.device, self.dtype,
                                    budget, cfg.wave, cfg.max_batch, host_budget, cfg.quest)
        self.graphs = None
        if cfg.cuda_graphs and self.device.type == "cuda" and hasattr(self.backend, "static_plan"):
            self.graphs = DecodeGraphs(self)

    @property
    def first(self) -> bool:
        return self.shard.first

    @property
    def last(self) -> bool:
        return self.shard.last

    def reserve(self, seq_id: Hashable, num_tokens: int) -> None:
        self.backend.reserve(seq_id, num_tokens)

    def free(self, seq_id: Hashable) -> None:
        self.backend.free(seq_id)

    def prefill(self, seq_id: Hashable, x: torch.Tensor, progress: Callable[[int], None] | None = None):
        """x: token ids [T] on the first stage, else hidden [T, H]. Returns hidden [T, H], or on
        the last stage the logits of the last token [1, V]."""
        return drain(self.prefill_steps(seq_id, x, progress))

    def prefill_steps(self, seq_id: Hashable, x: torch.Tensor, progress: Callable[[int], None] | None = None):
        """Generator form of `prefill` (yields after every chunk of every layer)."""
        with torch.inference_mode():
            x = self.shard.embed(x) if self.first else x.to(self.device)
        x = yield from self.shard.prefill_steps(x, 0, self.backend, seq_id, self.cfg.prefill_chunk, progress)
        with torch.inference_mode():
            return self.shard.logits(x[-1:]) if self.last else x

    def decode(self, seq_ids: list, x: torch.Tensor, positions: torch.Tensor):
        """x: ids [B] or hidden [B, H]; returns hidden, or logits [B, V] on the last stage (with
        CUDA graphs, valid until the next step: see `DecodeGraphs.run`)."""
        plan = self.backend.plan_decode(seq_ids)
        if self.graphs is not None:        # copies x and positions into the graph's own buffers
            out = self.graphs.run(plan, x, positions)
        else:
            out = self.decode_body(x.to(self.device), positions.to(self.device), plan)
        self.backend.finish_step(plan)
        return out

    def decode_body(self, x: torch.Tensor, positions: torch.Tensor, plan):
        """The step itself, free of host synchronisation when the backend's is (graph-capturable)."""
        x = self.shard.embed(x) if self.first else x
        x = self.shard.decode(x, positions, self.backend, plan)
        return self.shard.logits(x) if self.last else x

    def stats(self) -> dict:
        return self.backend.stats()
