"""Executors run the model's stages for the engine (the contract: `protocol.Executor`): in process
(one or several devices) here, as Ray stage actors in `retroinfer.cluster.serve.pipeline`."""
from __future__ import annotations

from typing import Callable, Hashable

import torch

from ..attention import KVCapacityError
from ..config import EngineConfig, ModelConfig
from ..models.model import drain
from .protocol import EngineStats
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
        """The whole prefill at once (tests, tools); the engine advances `prefill_steps`."""
        return drain(self.prefill_steps(seq_id, ids, progress))

    def prefill_steps(self, seq_id: Hashable, ids: torch.Tensor, progress: Callable[[int], None] | None = None):
        """Yields after every chunk of every layer (`protocol.Executor`), returns the last token's logits."""
        x = ids
        for st in self.stages:
            x = yield from st.prefill_steps(seq_id, x, progress)
        return x

    def decode(self, seq_ids: list, ids: torch.Tensor, positions: torch.Tensor, sampled_rows=None):
        """-> logits [B, V] (on the device: `sampled_rows` is a hint for executors whose logits
        would cross processes)."""
        x = ids
        for st in self.stages:
            x = st.decode(seq_ids, x, positions)
        return x

    def stats(self) -> EngineStats:
        return EngineStats.from_stages([st.stats() for st in self.stages])

    def shutdown(self) -> None:
        """Nothing to stop: the stages live and die with this process."""
