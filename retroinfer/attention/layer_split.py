"""Wave attention with some layers dense (`WaveConfig.dense_first` / `dense_last`): those layers
keep full attention's paged KV on the GPU and attend every token, the others are one wave index.
A sequence holds KV in both; it fits where both have room, so the capacity is the smaller of the
two in tokens."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import AttentionBackend, KVCapacityError
from .full import FullAttention
from .wave import WaveAttention


@dataclass
class SplitPlan:
    dense: Any
    wave: Any


class LayerSplitAttention(AttentionBackend):
    def __init__(self, cfg, layer_ids: range, device, dtype, kv_budget_bytes: int, wave, max_seqs: int,
                 host_kv_budget_bytes: int | None, dense: list[int]):
        super().__init__(cfg, layer_ids, device, dtype)
        rest = [li for li in layer_ids if li not in dense]
        assert dense and rest and rest == list(range(rest[0], rest[-1] + 1)), (dense, rest)
        # The budget in proportion to the bytes a token takes in each (wave's index ~10% more).
        dense_share = len(dense) / (len(dense) + 1.1 * len(rest))
        dense_bytes = int(kv_budget_bytes * dense_share)
        self.dense = FullAttention(cfg, dense, device, dtype, dense_bytes, max_rows=max_seqs)
        self.wave_part = WaveAttention(cfg, range(rest[0], rest[-1] + 1), device, dtype,
                                       kv_budget_bytes - dense_bytes, wave, max_seqs, host_kv_budget_bytes)
        self.dense_ids = set(dense)
        self.max_rows = max_seqs

    def _of(self, layer: int) -> AttentionBackend:
        return self.dense if layer in self.dense_ids else self.wave_part

    def reserve(self, seq_id, num_tokens):
        self.dense.reserve(seq_id, num_tokens)
        try:
            self.wave_part.reserve(seq_id, num_tokens)
        except KVCapacityError:
            self.dense.free(seq_id)
            raise

    def free(self, seq_id):
        self.dense.free(seq_id)
        self.wave_part.free(seq_id)

    def write_prefill(self, layer, seq_id, k, v, start):
        self._of(layer).write_prefill(layer, seq_id, k, v, start)

    def plan_decode(self, seq_ids):
        return SplitPlan(self.dense.plan_decode(seq_ids), self.wave_part.plan_decode(seq_ids))

    def decode(self, layer, plan: SplitPlan, q, k, v):
        if layer in self.dense_ids:
            return self.dense.decode(layer, plan.dense, q, k, v)
        return self.wave_part.decode(layer, plan.wave, q, k, v)

    def finish_step(self, plan: SplitPlan) -> None:
        self.wave_part.finish_step(plan.wave)

    # -- CUDA graphs: both parts' plans in one graph (padded to wave's slots: `max_rows`) --------
    def graph_key(self, plan: SplitPlan):
        return self.dense.graph_key(plan.dense), self.wave_part.graph_key(plan.wave)

    def static_plan(self, batch: int, plan: SplitPlan) -> SplitPlan:
        return SplitPlan(self.dense.static_plan(batch, plan.dense), self.wave_part.static_plan(batch, plan.wave))

    def load_static_plan(self, static: SplitPlan, plan: SplitPlan) -> None:
        self.dense.load_static_plan(static.dense, plan.dense)
        self.wave_part.load_static_plan(static.wave, plan.wave)

    def reset_metrics(self) -> None:
        self.wave_part.reset_metrics()

    def stats(self):
        d, w = self.dense.stats(), self.wave_part.stats()
        tokens = min(d["capacity_bytes"] // self.dense.bytes_per_token,
                     w["capacity_bytes"] // self.wave_part.bytes_per_token)
        return {**w, "capacity_bytes": tokens * self.bytes_per_token, "used_bytes": d["used_bytes"] + w["used_bytes"],
                "dense_layers": len(self.dense_ids)}
