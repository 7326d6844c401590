"""Executors run the model's stages for the scheduler: in process (one or several devices) here,
as Ray stage actors in `retroinfer.cluster.pipeline`."""
from __future__ import annotations

from typing import Callable, Hashable

import torch

from ..attention import KVCapacityError
from ..config import EngineConfig, ModelConfig
from ..models.model import drain
from .stage import Stage


def split_layers(num_layers: int, num_stages: int) -> list[range]:
    """Contiguous, as even as possible, earlier stages taking the remainder."""
    if not 1 <= num_stages <= num_layers:
        raise ValueError(f"cannot split {num_layers} layers over {num_stages} stages")
    base, extra = divmod(num_layers, num_stages)
    out, start = [], 0
    for i in range(num_stages):
        n = base + (i < extra)
        out.append(range(start, start + n))
        start += n
    return out


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class LocalExecutor:
    """Stages in this process, chained in order; several may share one GPU."""

    def __init__(self, cfg: EngineConfig, model_cfg: ModelConfig):
        devices = list(cfg.devices) or [cfg.device or default_device()]
        self.stages = [Stage(cfg, model_cfg, r, d)
                       for r, d in zip(split_layers(model_cfg.num_layers, len(devices)), devices)]
        self.device, self.dtype = self.stages[-1].device, self.stages[0].dtype

    def reserve(self, seq_id: Hashable, num_tokens: int) -> None:
        done = []
        try:
            for st in self.stages:
                st.reserve(seq_id, num_tokens)
                done.append(st)
        except KVCapacityError:
            for st in done:
                st.free(seq_id)
            raise

    def free(self, seq_id: Hashable) -> None:
        for st in self.stages:
            st.free(seq_id)

    def prefill(self, seq_id: Hashable, ids: torch.Tensor, progress: Callable[[int], None] | None = None):
        return drain(self.prefill_steps(seq_id, ids, progress))

    def prefill_steps(self, seq_id: Hashable, ids: torch.Tensor, progress: Callable[[int], None] | None = None):
        """Generator form of `prefill`: yields between chunks, returns the last token's logits."""
        x = ids
        for st in self.stages:
            x = yield from st.prefill_steps(seq_id, x, progress)
        return x

    def decode(self, seq_ids: list, ids: torch.Tensor, positions: torch.Tensor):
        x = ids
        for st in self.stages:
            x = st.decode(seq_ids, x, positions)
        return x

    def stats(self) -> dict:
        return merge_stage_stats([st.stats() for st in self.stages])


ADDITIVE = ("retrieved_clusters", "cache_hits", "gathered_rows", "pcie_rows", "pcie_bytes_total",
            "pcie_bytes_per_step", "host_pool_bytes", "host_pinned_bytes", "cache_bytes")


def merge_stage_stats(per: list[dict]) -> dict:
    """KV bytes (a sequence fits only where every stage has room), PCIe traffic, pools and cache
    counts summed over stages, hit ratios recomputed from the sums; other numeric keys taken from
    the first stage that reports them; the stages' own dicts under "stages"."""
    out = {"capacity_bytes": sum(p["capacity_bytes"] for p in per),
           "used_bytes": sum(p["used_bytes"] for p in per), "stages": per}
    for k in ADDITIVE:
        if any(k in p for p in per):
            out[k] = sum(p.get(k, 0) for p in per)
    if out.get("retrieved_clusters"):
        out["cache_hit_ratio"] = out["cache_hits"] / out["retrieved_clusters"]
    if out.get("gathered_rows"):
        out["cache_row_hit_ratio"] = 1 - out["pcie_rows"] / out["gathered_rows"]
    for p in per:
        for k, v in p.items():
            if k not in out and isinstance(v, (int, float)):
                out[k] = v
    return out
