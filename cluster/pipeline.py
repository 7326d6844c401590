"""Pipeline parallelism over Ray actors: one `StageActor` per stage (its layers, weights and KV),
created in the replica's placement group, and `RayPipelineExecutor`, which has the interface of
`retroinfer.engine.executor.LocalExecutor` and chains the stages.

- Hidden states move stage to stage as ObjectRefs (the replica never fetches them); only the last
  stage's logits come back.
- Decode splits the batch into micro-batches and submits every (micro-batch, stage) call at once:
  actor calls run in submission order, so stage i works on micro-batch m+1 while stage i+1 works on
  m.
- Prefill runs stage by stage; while a stage works, the executor polls its per-layer progress (a
  method in a separate concurrency group, so it answers during the prefill) and forwards it to the
  engine; an abort (raised by the engine's progress callback) cancels the running stage between two
  of its layers.
"""
from __future__ import annotations

from typing import Callable, Hashable

import ray
import torch

from retroinfer.attention import KVCapacityError
from retroinfer.config import EngineConfig, ModelConfig, parse_dtype
from retroinfer.engine.executor import merge_stage_stats, split_layers


class _Cancelled(Exception):
    pass


class StageActor:
    """A `retroinfer.engine.stage.Stage` in its own process. Compute methods run one at a time in
    submission order (the default concurrency group); `progress`, `cancel` and `stats` answer from
    a second group while a prefill runs."""

    def __init__(self, cfg: EngineConfig, model_cfg: ModelConfig, layer_ids: range, device: str,
                 num_threads: int | None = None):
        if num_threads:
            torch.set_num_threads(num_threads)
        from retroinfer.engine.stage import Stage
        self.stage = Stage(cfg, model_cfg, layer_ids, device)
        self.layer_ids = layer_ids
        self._layers_done: dict = {}
        self._cancelled: set = set()

    @ray.method(concurrency_group="control")
    def info(self) -> dict:
        from .numa import binding_report
        ctx = ray.get_runtime_context()
        return {"layers": [self.layer_ids.start, self.layer_ids.stop], "device": str(self.stage.device),
                "node_id": ctx.get_node_id(), "labels": ctx.get_node_labels(), **binding_report()}

    def reserve(self, seq_id: Hashable, num_tokens: int):
        """None, or (message, ever) of the KVCapacityError (re-raised by the executor)."""
        try:
            self.stage.reserve(seq_id, num_tokens)
        except KVCapacityError as e:
            return str(e), e.ever
        return None

    def free(self, seq_id: Hashable) -> None:
        self.stage.free(seq_id)

    def prefill(self, seq_id: Hashable, x: torch.Tensor):
        self._layers_done[seq_id] = 0

        def progress(layer: int) -> None:
            self._layers_done[seq_id] += 1
            if seq_id in self._cancelled:
                raise _Cancelled

        try:
            out = self.stage.prefill(seq_id, x, progress)
        except _Cancelled:
            return None
        finally:
            self._layers_done.pop(seq_id, None)
            self._cancelled.discard(seq_id)
        return out.float().cpu() if self.stage.last else out.cpu()

    def decode(self, seq_ids: list, x: torch.Tensor, positions: torch.Tensor):
        out = self.stage.decode(seq_ids, x, positions)
        return out.float().cpu() if self.stage.last else out.cpu()

    @ray.method(concurrency_group="control")
    def progress(self, seq_id: Hashable) -> int:
        return self._layers_done.get(seq_id, -1)

    @ray.method(concurrency_group="control")
    def cancel(self, seq_id: Hashable) -> None:
        if seq_id in self._layers_done:
            self._cancelled.add(seq_id)

    @ray.method(concurrency_group="control")
    def stats(self) -> dict:
        return self.stage.stats()


def _remote_stage_class():
    return ray.remote(concurrency_groups={"control": 2})(StageActor)


class RayPipelineExecutor:
    """Stages as Ray actors. `num_gpus` per stage may be fractional (several stages on one GPU);
    0 runs the stage on CPU. With a placement group (default: the caller's, e.g. a Serve replica's),
    stage i goes to bundle `first_bundle + i` when that bundle exists."""

    def __init__(self, cfg: EngineConfig, model_cfg: ModelConfig, num_stages: int, *,
                 num_cpus: float = 1.0, num_gpus: float = 0.0, placement_group="current",
                 first_bundle: int = 1, micro_batches: int | None = None, poll_s: float = 0.05):
        from ray.util import get_current_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.cfg, self.model_cfg = cfg, model_cfg
        self.device = torch.device("cpu")                     # where the logits arrive
        self.dtype = parse_dtype(cfg.dtype or model_cfg.dtype)
        self.micro_batches = micro_batches or num_stages
        self.poll_s = poll_s
        pg = get_current_placement_group() if placement_group == "current" else placement_group
        device = "cuda" if num_gpus > 0 else "cpu"
        threads = max(1, int(round(num_cpus))) if device == "cpu" else None
        Remote = _remote_stage_class()
        self.stages = []
        for i, layers in enumerate(split_layers(model_cfg.num_layers, num_stages)):
            opts = {"num_cpus": num_cpus, "num_gpus": num_gpus}
            if pg is not None:
                idx = first_bundle + i if first_bundle + i < pg.bundle_count else -1
                opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=idx)
            self.stages.append(Remote.options(**opts).remote(cfg, model_cfg, layers, device, threads))
        self.stage_info = ray.get([st.info.remote() for st in self.stages])
        self.layer_ranges = [range(*i["layers"]) for i in self.stage_info]

    # -- the LocalExecutor interface ----------------------------------------------------------
    def reserve(self, seq_id: Hashable, num_tokens: int) -> None:
        results = ray.get([st.reserve.remote(seq_id, num_tokens) for st in self.stages])
        failed = [r for r in results if r is not None]
        if failed:
            for st, r in zip(self.stages, results):
                if r is None:
                    st.free.remote(seq_id)
            raise KVCapacityError(failed[0][0], ever=all(ever for _, ever in failed))

    def free(self, seq_id: Hashable) -> None:
        # Waited for, so the stats that follow (routing, metrics) see the KV returned.
        ray.get([st.free.remote(seq_id) for st in self.stages])

    def prefill(self, seq_id: Hashable, ids: torch.Tensor, progress: Callable[[int], None] | None = None):
        x = ids
        for st, layers in zip(self.stages, self.layer_ranges):
            ref = st.prefill.remote(seq_id, x)
            reported = 0
            try:
                while True:
                    ready, _ = ray.wait([ref], timeout=self.poll_s)
                    done = len(layers) if ready else ray.get(st.progress.remote(seq_id))
                    for li in layers[reported:max(reported, done)]:
                        if progress is not None:
                            progress(li)     # the engine raises here to abort
                    reported = max(reported, done)
                    if ready:
                        break
            except BaseException:
                st.cancel.remote(seq_id)
                raise
            x = ref
        out = ray.get(x)
        if out is None:     # cancelled inside a stage without the engine asking: treat as abort
            raise RuntimeError("prefill was cancelled")
        return out

    def decode(self, seq_ids: list, ids: torch.Tensor, positions: torch.Tensor):
        B = len(seq_ids)
        m = max(1, min(self.micro_batches, B))
        bounds = [B * j // m for j in range(m + 1)]
        refs = []
        for a, b in zip(bounds, bounds[1:]):
            x = ids[a:b]
            for st in self.stages:
                x = st.decode.remote(seq_ids[a:b], x, positions[a:b])
            refs.append(x)
        return torch.cat(ray.get(refs), dim=0)

    def stats(self) -> dict:
        return merge_stage_stats(ray.get([st.stats.remote() for st in self.stages]))

    def shutdown(self) -> None:
        for st in self.stages:
            ray.kill(st)
        self.stages = []
