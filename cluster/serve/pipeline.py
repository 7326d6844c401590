"""Pipeline parallelism over Ray actors: one `StageActor` per stage (its layers, weights and KV),
created in the replica's placement group, and `RayPipelineExecutor`, which has the interface of
`retroinfer.engine.executor.LocalExecutor` and chains the stages.

- Decode is one Ray compiled graph (`ray.dag`, compiled once when the executor starts): the batch's
  ids go in, each stage's hidden states pass to the next through the graph's channels (shared memory
  on one host; arrays cross as numpy, `to_wire`, which Ray's channels move faster than tensors),
  and out of the last stage come every row's argmax and the logits of only the rows whose requests
  sample (`SparseLogits`): a greedy row sends back its token id, not [V] floats. No
  Ray task is submitted per step. The batch is split into micro-batches, each one execution of the
  graph, all in flight at once, so stage i works on micro-batch m+1 while stage i+1 works on m.
  By default there are as many micro-batches as distinct devices under the stages: stages that
  share one GPU cannot overlap, and each extra micro-batch would read all the weights again.
- A stage that dies (its actor gone, its channels closed) is `StageLost`, an `ExecutorFailure`:
  the engine step fails, so the replica turns unhealthy and Serve replaces it.
- Prefill runs stage by stage as ordinary actor calls, one unit (a chunk through a layer) per call,
  hidden states handed on as ObjectRefs (the replica never fetches them): the stage actor keeps the
  sequence's prefill generator between calls, so the engine's decode steps run between any two
  units, an abort lands within one unit, and the executor's `prefill_steps` yields once per unit as
  `protocol.Executor` asks.
- A compiled graph runs its steps on a background thread of each actor while ordinary calls run on
  the main one, so a stage's lock serialises them (they never overlapped before either: an actor ran
  its calls one at a time).
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import Callable, Hashable

import numpy as np
import ray
import torch
from ray.dag import InputNode
from ray.exceptions import RayActorError, RayChannelError
from ray.util import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from retroinfer.attention import KVCapacityError
from retroinfer.config import EngineConfig, ModelConfig, parse_dtype
from retroinfer.engine.executor import split_layers
from retroinfer.engine.protocol import EngineStats, ExecutorFailure
from retroinfer.engine.sampling import SparseLogits
from retroinfer.engine.stage import Stage
from retroinfer.kernels import cdiv
from retroinfer.numa import binding_report


class StageActor:
    """A `retroinfer.engine.stage.Stage` in its own process. Compute methods run one at a time in
    submission order (the default concurrency group); `info` and `stats` answer from a second group."""

    def __init__(self, cfg: EngineConfig, model_cfg: ModelConfig, layer_ids: range, device: str,
                 num_threads: int | None = None):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.stage = Stage(cfg, model_cfg, layer_ids, device)
        self.layer_ids = layer_ids
        self._prefills: dict = {}          # seq_id -> its prefill generator
        self._layers_done: dict = {}
        self._lock = threading.Lock()      # the compiled graph's thread vs ordinary calls

    @ray.method(concurrency_group="control")
    def info(self) -> dict:
        ctx = ray.get_runtime_context()
        gpus = ctx.get_accelerator_ids().get("GPU", []) if self.stage.device.type == "cuda" else []
        return {"layers": [self.layer_ids.start, self.layer_ids.stop], "device": str(self.stage.device),
                "gpus": sorted(gpus), "pid": os.getpid(), "node_id": ctx.get_node_id(),
                "labels": ctx.get_node_labels(), **binding_report()}

    def reserve(self, seq_id: Hashable, num_tokens: int):
        """None, or (message, ever) of the KVCapacityError (re-raised by the executor)."""
        try:
            with self._lock:
                self.stage.reserve(seq_id, num_tokens)
        except KVCapacityError as e:
            return str(e), e.ever
        return None

    def free(self, seq_id: Hashable) -> None:
        self.prefill_cancel(seq_id)
        with self._lock:
            self.stage.free(seq_id)

    def prefill_start(self, seq_id: Hashable, x: torch.Tensor) -> None:
        """x: token ids, or the previous stage's hidden states (an ObjectRef Ray resolves)."""
        self._layers_done[seq_id] = 0

        def progress(layer: int) -> None:
            self._layers_done[seq_id] += 1
        self._prefills[seq_id] = self.stage.prefill_steps(seq_id, x, progress)

    def prefill_advance(self, seq_id: Hashable) -> int:
        """Runs one unit (a chunk through a layer); -> this stage's layers done."""
        with self._lock:
            next(self._prefills[seq_id])
        return self._layers_done[seq_id]

    def prefill_finish(self, seq_id: Hashable):
        """After the last unit: writes the last layer's KV and returns the hidden states (the
        last stage: the logits), on CPU."""
        gen = self._prefills.pop(seq_id)
        try:
            with self._lock:
                next(gen)
        except StopIteration as done:
            out = done.value
            return out.float().cpu() if self.stage.last else out.cpu()
        finally:
            self._layers_done.pop(seq_id, None)
        gen.close()
        raise RuntimeError("the stage's prefill yielded more units than the executor counted")

    def prefill_cancel(self, seq_id: Hashable) -> None:
        gen = self._prefills.pop(seq_id, None)
        self._layers_done.pop(seq_id, None)
        if gen is not None:
            with self._lock:
                gen.close()

    def decode_step(self, step: tuple):
        """One micro-batch in the compiled decode graph: (seq_ids, ids or hidden states, positions,
        rows that sample), its arrays as `to_wire` writes them -> the same for the next stage; the
        last stage returns every row's argmax and the logits of the rows that sample (a greedy row
        sends only its token id back), which the driver reads as `SparseLogits`."""
        seq_ids, x, positions, sampled = step
        with self._lock:
            out = self.stage.decode(seq_ids, from_wire(x), from_wire(positions))
            if not self.stage.last:
                return seq_ids, to_wire(out), positions, sampled
            logits = out.float()
            return to_wire(logits.argmax(dim=-1)), {i: to_wire(logits[i]) for i in sampled}

    @ray.method(concurrency_group="control")
    def stats(self) -> dict:
        return self.stage.stats()


def to_wire(t: torch.Tensor) -> np.ndarray:
    """A tensor as a host numpy array for the compiled graph's channels (bf16 as its int16 bits):
    a torch tensor costs ~0.4 ms more per hop there (measured: 2 hops and the return with a 64 KB
    hidden state, 1.50 ms as torch tensors against 0.39 ms as numpy arrays, 2-core CPU)."""
    t = t.detach().cpu()
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def from_wire(a: np.ndarray) -> torch.Tensor:
    """`to_wire`'s inverse (int16 arrays are bf16 hidden states; ids and positions are int64).
    Copied: a channel's array may be a read-only view of its buffer, which the next step reuses."""
    t = torch.from_numpy(np.array(a))
    return t.view(torch.bfloat16) if a.dtype == np.int16 else t


class StageLost(ExecutorFailure):
    """A stage actor of this replica died or cannot be reached."""


LOST = (RayActorError, RayChannelError)


@contextmanager
def _stages_alive():
    """A stage that is gone, as `StageLost` (the executor's failure, not a request's)."""
    try:
        yield
    except LOST as e:
        raise StageLost(f"a pipeline stage of this replica is gone ({type(e).__name__})") from e


def _get(refs):
    with _stages_alive():
        return ray.get(refs)


def distinct_devices(stage_info: list[dict]) -> int:
    """How many stages can compute at the same time: one per GPU set (a node's GPUs that a stage
    was given), and every CPU stage on its own (its own process and threads)."""
    return len({(i["node_id"], tuple(i["gpus"])) if i["gpus"] else (i["node_id"], i["pid"]) for i in stage_info})


def _remote_stage_class():
    return ray.remote(concurrency_groups={"control": 2})(StageActor)


class RayPipelineExecutor:
    """Stages as Ray actors. `num_gpus` per stage may be fractional (several stages on one GPU);
    0 runs the stage on CPU. With a placement group (default: the caller's, e.g. a Serve replica's),
    stage i goes to bundle `first_bundle + i` when that bundle exists."""

    def __init__(self, cfg: EngineConfig, model_cfg: ModelConfig, num_stages: int, *,
                 num_cpus: float = 1.0, num_gpus: float = 0.0, placement_group="current",
                 first_bundle: int = 1, micro_batches: int | None = None):
        self.cfg, self.model_cfg = cfg, model_cfg
        self.device = torch.device("cpu")                     # where the logits arrive
        self.dtype = parse_dtype(cfg.dtype or model_cfg.dtype)
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
        self.stage_info = _get([st.info.remote() for st in self.stages])
        self.layer_ranges = [range(*i["layers"]) for i in self.stage_info]
        self.micro_batches = micro_batches or distinct_devices(self.stage_info)
        self.decode_graph = self._compile_decode()

    def _compile_decode(self):
        with InputNode() as step:
            x = step
            for st in self.stages:
                x = st.decode_step.bind(x)
        return x.experimental_compile(_max_inflight_executions=max(2, self.micro_batches))

    # -- the protocol.Executor interface ----------------------------------------------------------
    def reserve(self, seq_id: Hashable, num_tokens: int) -> None:
        results = _get([st.reserve.remote(seq_id, num_tokens) for st in self.stages])
        failed = [r for r in results if r is not None]
        if failed:
            for st, r in zip(self.stages, results):
                if r is None:
                    st.free.remote(seq_id)
            raise KVCapacityError(failed[0][0], ever=all(ever for _, ever in failed))

    def free(self, seq_id: Hashable) -> None:
        # Waited for, so the stats that follow (routing, metrics) see the KV returned.
        _get([st.free.remote(seq_id) for st in self.stages])

    def prefill_steps(self, seq_id: Hashable, ids: torch.Tensor, progress: Callable[[int], None] | None = None):
        """One remote call per unit, yielding after each; hidden states go stage to stage as
        ObjectRefs. Closing the generator (an abort) cancels the stage's prefill."""
        units_per_layer = cdiv(len(ids), self.cfg.prefill_chunk)
        x, st = ids, None
        try:
            for st, layers in zip(self.stages, self.layer_ranges):
                st.prefill_start.remote(seq_id, x)
                reported = 0
                for _ in range(len(layers) * units_per_layer):
                    done = _get(st.prefill_advance.remote(seq_id))
                    reported = self._report(layers, reported, done, progress)
                    yield
                x = st.prefill_finish.remote(seq_id)
                self._report(layers, reported, len(layers), progress)
            out, st = _get(x), None
        except BaseException:
            if st is not None:
                st.prefill_cancel.remote(seq_id)
            raise
        return out

    @staticmethod
    def _report(layers: range, reported: int, done: int, progress) -> int:
        if progress is not None:
            for li in layers[reported:max(reported, done)]:
                progress(li)
        return max(reported, done)

    def decode(self, seq_ids: list, ids: torch.Tensor, positions: torch.Tensor,
               sampled_rows: list[int] | None = None) -> SparseLogits:
        """-> `SparseLogits`: the rows of `sampled_rows` (default all) whole, every row's argmax."""
        B = len(seq_ids)
        sampled = set(range(B) if sampled_rows is None else sampled_rows)
        m = max(1, min(self.micro_batches, B))
        bounds = [B * j // m for j in range(m + 1)]
        with _stages_alive():
            refs = [self.decode_graph.execute((seq_ids[a:b], to_wire(ids[a:b]), to_wire(positions[a:b]),
                                               [i - a for i in range(a, b) if i in sampled]))
                    for a, b in zip(bounds, bounds[1:])]
            parts = [ray.get(r) for r in refs]
        return SparseLogits(torch.cat([from_wire(argmax) for argmax, _ in parts]),
                            {a + i: from_wire(row) for a, (_, rows) in zip(bounds, parts) for i, row in rows.items()})

    def stats(self) -> EngineStats:
        return EngineStats.from_stages(_get([st.stats.remote() for st in self.stages]))

    def shutdown(self) -> None:
        if self.decode_graph is not None:
            self.decode_graph.teardown()
            self.decode_graph = None
        for st in self.stages:
            ray.kill(st)
        self.stages = []
