"""The engine replica: one model instance (its pipeline stages) and its scheduler, as a Serve
deployment. The replica actor runs in bundle 0 of its placement group; stage actors, when the
replica uses the Ray pipeline executor, go to bundles 1..S (see `deployments/app.py`).

`generate` is a streaming method. Its first item is `[{"type": "accepted", "replica"}]` or
`[{"type": "rejected", "status": 429 | 400, "code", "message", "retry_after_s", "replica"}]`
("accepted" also when the request waits here for KV room: `wait=True`); then
lists of engine messages (see `engine_loop.py`) until one has `finished`. If the caller goes away
(HTTP disconnect, DELETE of a job), Serve cancels the call; the generator then aborts the request
in the engine, which frees its KV at its next step.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import ray
import torch
from ray import serve

from retroinfer.config import EngineConfig
from retroinfer.engine.llm_engine import LLMEngine, load_model_config
from retroinfer.engine.protocol import EngineStats
from retroinfer.engine.sampling import SamplingParams
from retroinfer.engine.warmup import default_batch, warm_up
from retroinfer.numa import binding_report

from . import routing
from .engine_loop import EngineLoop, Rejected
from .metrics import ReplicaMetrics
from .monitor import ReplicaMonitor
from .pipeline import RayPipelineExecutor

log = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class ReplicaOptions:
    stages: int = 1
    executor: str = "local"          # "local": stages in this process; "ray": stage actors
    stage_num_cpus: float = 1.0
    stage_num_gpus: float = 0.0
    micro_batches: int | None = None
    num_threads: int | None = None   # torch threads for in-process CPU compute
    retry_after_s: float = 1.0
    model_name: str = "model"
    warmup_tokens: tuple[int, ...] = ()   # before serving, max_batch synthetic requests of each length
    step_timeout_s: float | None = 600.0  # one engine step running longer: unhealthy, its requests fail
    max_waiting: int = 32                 # requests queued here for KV room (`generate(wait=True)`)


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:   # outside Serve (tests that build the class directly)
        return "local"


@serve.deployment(name="LLMReplica")
class LLMReplica:
    def __init__(self, cfg: EngineConfig, opts: ReplicaOptions):
        if opts.num_threads:
            torch.set_num_threads(opts.num_threads)
        self.opts, self.replica_id = opts, _replica_id()
        executor = None
        if opts.executor == "ray":
            executor = RayPipelineExecutor(cfg, load_model_config(cfg.model), opts.stages,
                                           num_cpus=opts.stage_num_cpus, num_gpus=opts.stage_num_gpus,
                                           micro_batches=opts.micro_batches)
        self.engine = LLMEngine(cfg, executor=executor)
        if opts.warmup_tokens:
            self._warm_up(opts.warmup_tokens)
        ray_metrics = None
        try:
            ray_metrics = ReplicaMetrics(self.replica_id, opts.model_name)
        except Exception:   # metrics are optional (no Ray metrics agent, e.g. some test setups)
            log.warning("metrics disabled", exc_info=True)
        self.monitor = ReplicaMonitor(ray_metrics)
        self.loop = EngineLoop(self.engine, observer=self.monitor, step_timeout_s=opts.step_timeout_s,
                               max_waiting=opts.max_waiting)
        log.info("replica %s: %s, %d stage(s) via %s executor, KV capacity %d bytes", self.replica_id,
                 cfg.model, opts.stages, opts.executor, self.loop.stats.capacity_bytes)

    def _warm_up(self, lengths) -> None:
        """Before the replica takes traffic (and says healthy): for each length, max_batch requests
        through the ordinary scheduling path, joining one at a time (`engine/warmup.py`), so that
        the Triton compiles and CUDA-graph captures of every decode batch bucket and of the mixed
        step (a prefill chunk beside a decode batch) happen here, not inside user requests: each batch
        size a warm-up has not decoded stalls the first decode step that reaches it (3-5.6 s on an
        H200 for an 8B model with wave attention at 32K)."""
        cap = default_batch(self.engine)     # 1 on a CPU: nothing there compiles per batch size

        def said(rep) -> None:
            if rep.error and not rep.requests:     # e.g. more KV than the replica holds
                log.warning("replica %s: warm-up of %d tokens failed, serving without it: %s",
                            self.replica_id, rep.tokens, rep.error)
                return
            log.info("replica %s: warm-up of %d tokens: %s", self.replica_id, rep.tokens, rep.summary())
            if rep.error or rep.requests < cap:
                log.warning("replica %s: warm-up of %d tokens covered %d of %d request(s)%s",
                            self.replica_id, rep.tokens, rep.requests, cap,
                            f": {rep.error}" if rep.error else " (the KV holds no more of them)")

        t0 = time.perf_counter()
        warm_up(self.engine, list(lengths), log=said)
        log.info("replica %s: warm-up done in %.1f s", self.replica_id, time.perf_counter() - t0)

    async def generate(self, request_id: str, prompt_ids: list[int], params: dict, kv_bytes: int,
                       exclude: list[str] | None = None, target: str | None = None, wait: bool = False):
        """`exclude` / `target` are read by the router, not here. `wait`: with no KV room now, queue
        for it here (up to `max_waiting` requests) rather than answer 429. The engine loop reports
        the request's outputs to the monitor; a refusal is counted here."""
        try:
            q = self.loop.submit(request_id, prompt_ids, SamplingParams(**params), int(kv_bytes), wait=wait)
        except (Rejected, ValueError) as e:
            r = e if isinstance(e, Rejected) else Rejected(400, "invalid_request", str(e))
            self.monitor.rejected(r.code, r.status)
            yield [{**r.to_message(self.opts.retry_after_s), "replica": self.replica_id}]
            return
        yield [{"type": "accepted", "replica": self.replica_id}]
        last = None
        try:
            while last is None or not last["finished"]:
                batch = [await q.get()]
                while not q.empty():
                    batch.append(q.get_nowait())
                outs = [m for m in batch if m["type"] == "output"]
                if outs:
                    last = outs[-1]
                yield batch
        finally:
            if last is None or not last["finished"]:
                self.loop.abort(request_id)      # cancelled by the caller: free the KV (it ends as "abort")

    def abort(self, request_id: str, target: str | None = None) -> None:
        """Aborts a request whose caller is gone without cancelling its call (an ingress that died
        mid-job: its successor aborts the job's last attempt). `target` is read by the router."""
        self.loop.abort(request_id)

    def record_routing_stats(self) -> dict:
        """Polled by Serve every `routing_stats_period_s`, busy or idle: the router's KV figures, and
        `metrics` (request counters and histograms) that the ingress serves at /metrics."""
        stats = self.loop.stats
        return {**self.routing_report(stats), "replica": self.replica_id, "metrics": self.monitor.report(stats)}

    def routing_report(self, stats: EngineStats | None = None) -> dict:
        """The routing figures of this replica's latest engine stats (`routing.report`)."""
        return routing.report(self.loop.stats if stats is None else stats, healthy=self.loop.healthy,
                              requests=self.loop.num_requests)

    def check_health(self) -> None:
        if not self.loop.healthy:
            raise RuntimeError("the engine loop is not running")

    async def info(self, target: str | None = None) -> dict:
        """This replica's identity, binding (as seen from inside) and stats."""
        ctx = ray.get_runtime_context()
        stats = await asyncio.to_thread(self.engine.stats)
        ex = self.engine.executor
        return {"replica": self.replica_id, "node_id": ctx.get_node_id(), "labels": ctx.get_node_labels(),
                "placement_group": (ctx.get_placement_group_id() or None), **binding_report(),
                "stages": getattr(ex, "stage_info", None), "metrics": self.monitor.ray is not None,
                "stats": {k: v for k, v in stats.items() if k != "stages"},
                "routing": self.routing_report()}

    def ping(self, exclude: list[str] | None = None) -> bool:
        """Whether this replica's engine can take requests (`exclude` is read by the router)."""
        return self.loop.healthy

    def __del__(self):
        loop = getattr(self, "loop", None)
        if loop is not None:
            loop.shutdown()
        ex = getattr(getattr(self, "engine", None), "executor", None)
        if hasattr(ex, "shutdown"):
            ex.shutdown()
