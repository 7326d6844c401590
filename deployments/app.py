"""The Serve application: `build_app(args)` for `serve run deployments/<x>.yaml`
(import_path `retroinfer.deployments.app:build_app`).

Two deployments: `LLMReplica` (num_replicas engine replicas, each a placement group of one bundle
for the replica plus one per pipeline stage, STRICT_PACK so a replica sits inside one Ray node, i.e.
one NUMA node under `retroinfer cluster up`; routed by KV footprint) and `Ingress` (FastAPI, one
replica). `RETROINFER_MODEL_DIR`, when set, overrides `model`.

Ray and the modules built on it (the replica, the router, the ingress) are imported inside
`build_app` and `_cluster_resources`: `AppArgs` and `plan_replica` also serve the in-process trace
of `benchmarks/bench_serve.py` on machines without Ray.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from retroinfer.cluster.http.guard import key_hash, parse_keys
from retroinfer.config import ConfigError, EngineConfig, QuestConfig, WaveConfig
from retroinfer.models.catalog import display_name, resolve_model

logger = logging.getLogger("ray.serve")


INGRESS_NODE = "retroinfer_ingress"    # a custom resource: the node the ingress (and the jobs store) lives on


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = "tiny"                     # HF directory, GGUF file, catalog name, "tiny" or "random:<arch>"
    served_model_name: str | None = None    # default: the catalog name, GGUF stem or directory name
    attention: Literal["full", "wave", "quest"] = "full"
    dtype: Literal["bfloat16", "float16", "float32"] | None = None
    device: Literal["cpu", "cuda"] | None = None   # default: cuda if the cluster has GPUs
    num_replicas: int = Field(1, ge=1)
    gpus_per_replica: int = Field(1, ge=1)  # pipeline stages per replica, one per GPU (CPU: stages)
    gpu_fraction: float | None = Field(None, gt=0, le=1)   # num_gpus per stage (default 1 on cuda)
    cpus_per_stage: float = Field(1.0, gt=0)
    num_cpus_per_replica: float = Field(0.5, gt=0)        # the scheduler / replica actor itself
    kv_pool_gb: float | None = Field(None, gt=0)           # the replica's KV pool, split over its stages
    offload: bool | None = None             # wave: KV in the NUMA-local host pool (default: wave on cuda)
    gpu_kv_gb: float | None = Field(None, gt=0)            # offload: GPU-side budget per stage (default: free memory)
    max_batch: int = Field(16, ge=1)
    max_model_len: int | None = Field(None, ge=1)
    max_queued_requests: int = Field(-1, ge=-1)            # per caller of the engine deployment; then 429
    max_ongoing_requests: int = Field(64, ge=1)            # concurrent requests per engine replica
    # requests that found no replica with KV room wait at the least loaded one, up to this many per
    # replica (FCFS, counted in max_ongoing_requests); beyond, or 0: 429 kv_cache_full + Retry-After
    max_waiting_requests: int = Field(32, ge=0)
    prefill_chunk: int | None = Field(None, ge=1)
    prefill_budget_tokens: int | None = Field(EngineConfig.prefill_budget_tokens, ge=1)   # prefill per engine step
                                                          # (engine/scheduler.py); null: unbounded
    prefill_slice_s: float | None = Field(None, ge=0)     # and a time cap on it
    seed: int = 0
    wave: dict[str, float] | None = None                   # WaveConfig overrides
    quest: dict[str, float | bool | None] | None = None    # QuestConfig overrides (attention quest)
    executor: Literal["auto", "local", "ray"] = "auto"     # auto: in-process for one stage
    micro_batches: int | None = Field(None, ge=1)          # decode micro-batches (default: one per distinct device under the stages)
    replicas_per_numa_node: int | None = Field(None, ge=1)
    routing_stats_period_s: float = Field(1.0, gt=0)
    retry_after_s: float = Field(1.0, gt=0)
    default_max_tokens: int = Field(256, ge=1)
    job_ttl_s: float = Field(3600.0, gt=0)
    # the jobs store (SQLite file) on the ingress's node; default: $RETROINFER_JOBS_DB there, else
    # ~/.cache/retroinfer/jobs.sqlite
    jobs_db: str | None = None
    job_max_attempts: int = Field(3, ge=1)                 # sends of a job to engine replicas that die
    job_retry_max_s: float = Field(30.0, gt=0)             # the longest wait between asks for KV
    ingress_num_cpus: float = Field(0.25, ge=0)
    # the HTTP edge (cluster/http/guard.py): API keys for /v1/* (RETROINFER_API_KEY, comma-separated,
    # overrides), the body's size (413) and time to arrive (408), the jobs that may wait (429), and
    # how long a completion or chat may take (408; None: no limit)
    api_key: tuple[str, ...] = Field((), repr=False, validate_default=True)
    max_body_bytes: int = Field(32 << 20, ge=1024)
    body_timeout_s: float = Field(30.0, gt=0)
    max_queued_jobs: int = Field(256, ge=1)
    request_timeout_s: float | None = Field(None, gt=0)
    # synthetic requests a replica runs before it serves, one per length (0 or []: none); a length
    # the service expects compiles that length's kernel variants before the first user needs them
    warmup_tokens: tuple[int, ...] = (2048,)
    # an engine step running longer than this is a stall (hung kernel or stage): the replica turns
    # unhealthy, its requests end with an error and Serve replaces it (None: never)
    step_timeout_s: float | None = Field(600.0, gt=0)

    @field_validator("warmup_tokens", mode="before")
    @classmethod
    def _warmup(cls, v):     # one length or a list of them
        lengths = (v,) if isinstance(v, int) else tuple(v)
        if any(n < 0 for n in lengths):
            raise ValueError(f"warmup_tokens must be >= 0, got {v}")
        return tuple(n for n in lengths if n)

    @field_validator("jobs_db")
    @classmethod
    def _jobs_db(cls, v: str | None) -> str | None:
        if v is None or v == ":memory:":      # ":memory:": not durable (tests)
            return v
        if not v.strip() or v.endswith(("/", os.sep)) or Path(v).expanduser().is_dir():
            raise ValueError(f"jobs_db {v!r} must name a file (the SQLite jobs store), not a directory")
        return v

    @field_validator("api_key", mode="before")
    @classmethod
    def _api_key(cls, v):     # one key or a list of them
        return parse_keys(os.environ.get("RETROINFER_API_KEY") or v)

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        v = os.environ.get("RETROINFER_MODEL_DIR") or v
        try:
            resolve_model(v, log=logger.info)   # pulls / converts once, so replicas start from files
        except ConfigError as e:
            raise ValueError(str(e)) from None
        return v

    def model_dir(self) -> str:
        return resolve_model(self.model)

    @model_validator(mode="after")
    def _wave(self):
        if self.wave:
            names = set(WaveConfig.__dataclass_fields__)
            bad = sorted(set(self.wave) - names)
            if bad:
                raise ValueError(f"unknown wave option(s) {bad}; known: {sorted(names)}")
            try:
                self.wave_config()
            except ConfigError as e:
                raise ValueError(str(e)) from None
        return self

    @model_validator(mode="after")
    def _quest(self):
        if self.quest:
            bad = sorted(set(self.quest) - set(QuestConfig.__dataclass_fields__))
            if bad:
                raise ValueError(f"unknown quest option(s) {bad}; known: {sorted(QuestConfig.__dataclass_fields__)}")
            try:
                self.quest_config()
            except ConfigError as e:
                raise ValueError(str(e)) from None
        return self

    def quest_config(self) -> QuestConfig:
        ints = {"page_size", "dense_layers"}
        return QuestConfig(**{k: int(v) if k in ints else v for k, v in (self.quest or {}).items()})

    def wave_config(self) -> WaveConfig:
        ints = {k for k, f in WaveConfig.__dataclass_fields__.items() if f.type in ("int", int)}
        return WaveConfig(**{k: int(v) if k in ints else v for k, v in (self.wave or {}).items()})


def _cluster_resources() -> dict:
    import ray
    return ray.cluster_resources() if ray.is_initialized() else {}


def plan_replica(a: AppArgs, resources: dict) -> tuple[EngineConfig, dict, dict]:
    """-> (engine config, ReplicaOptions kwargs, Serve deployment options)."""
    device = a.device or ("cuda" if resources.get("GPU", 0) > 0 else "cpu")
    stages = a.gpus_per_replica
    gpu = (a.gpu_fraction or 1.0) if device == "cuda" else 0.0
    executor = a.executor if a.executor != "auto" else ("local" if stages == 1 else "ray")
    devices = tuple(f"cuda:{i}" for i in range(stages)) if executor == "local" and device == "cuda" and stages > 1 \
        else (("cpu",) * stages if executor == "local" and stages > 1 else ())
    offload = a.offload if a.offload is not None else (a.attention == "wave" and device == "cuda")
    pool = int(a.kv_pool_gb * 2**30 / stages) if a.kv_pool_gb else None      # per stage
    gpu_kv = int(a.gpu_kv_gb * 2**30) if a.gpu_kv_gb else None
    cfg = EngineConfig(model=a.model_dir(), attention=a.attention, dtype=a.dtype, device=device, devices=devices,
                       max_batch=a.max_batch, max_model_len=a.max_model_len, offload=offload,
                       kv_budget_bytes=gpu_kv if offload else pool, host_kv_budget_bytes=pool if offload else None,
                       prefill_chunk=a.prefill_chunk or EngineConfig.prefill_chunk,
                       prefill_budget_tokens=a.prefill_budget_tokens, prefill_slice_s=a.prefill_slice_s,
                       wave=a.wave_config(), quest=a.quest_config(), seed=a.seed)
    if executor == "local":      # compute in the replica process: it holds every stage's resources
        head = {"CPU": a.num_cpus_per_replica + a.cpus_per_stage * stages}
        if gpu:
            head["GPU"] = gpu * stages
        bundles = [head]
        actor = {"num_cpus": head["CPU"], "num_gpus": head.get("GPU", 0)}
        threads = max(1, int(a.cpus_per_stage * stages)) if device == "cpu" else None
    else:
        stage = {"CPU": a.cpus_per_stage, **({"GPU": gpu} if gpu else {})}
        bundles = [{"CPU": a.num_cpus_per_replica}] + [dict(stage) for _ in range(stages)]
        actor = {"num_cpus": a.num_cpus_per_replica}
        threads = 1
    numa_nodes = resources.get("numa_node", 0)
    if numa_nodes:    # only on a cluster started by `retroinfer cluster up` (or one that mimics it)
        per_node = a.replicas_per_numa_node
        if per_node is None:
            gpus_per_node = resources.get("GPU", 0) / numa_nodes
            per_node = max(1, int(gpus_per_node // (gpu * stages))) if gpu else 1
        bundles[0]["numa_node"] = math.floor(10_000 / per_node) / 10_000
    opts = dict(stages=stages, executor=executor, stage_num_cpus=a.cpus_per_stage, stage_num_gpus=gpu,
                micro_batches=a.micro_batches, num_threads=threads, retry_after_s=a.retry_after_s,
                warmup_tokens=a.warmup_tokens, step_timeout_s=a.step_timeout_s,
                max_waiting=a.max_waiting_requests)
    serve_opts = dict(num_replicas=a.num_replicas, ray_actor_options=actor, placement_group_bundles=bundles,
                      placement_group_strategy="STRICT_PACK", max_ongoing_requests=a.max_ongoing_requests,
                      max_queued_requests=a.max_queued_requests, health_check_period_s=5.0,
                      graceful_shutdown_timeout_s=10.0)
    return cfg, opts, serve_opts


def ingress_actor_options(a: AppArgs, resources: dict) -> dict:
    """Where the ingress runs. A cluster with a node that advertises the resource `INGRESS_NODE`
    (the KubeRay head, which mounts the jobs store's volume) pins it there, asking no CPU (that
    node may offer none); elsewhere it goes anywhere with `ingress_num_cpus`."""
    if resources.get(INGRESS_NODE, 0) >= 1:
        return {"num_cpus": 0, "resources": {INGRESS_NODE: 1}}
    return {"num_cpus": a.ingress_num_cpus}


def build_app(args: dict | None = None):
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from retroinfer.cluster.http.api import Ingress
    from retroinfer.cluster.serve.replica import LLMReplica, ReplicaOptions
    from retroinfer.cluster.serve.router import KVCapacityRouter

    a = AppArgs.model_validate(args or {})
    name = a.served_model_name or display_name(a.model)
    cfg, opts, serve_opts = plan_replica(a, _cluster_resources())
    router = RequestRouterConfig(request_router_class=KVCapacityRouter,
                                 request_routing_stats_period_s=a.routing_stats_period_s,
                                 request_routing_stats_timeout_s=max(5.0, 10 * a.routing_stats_period_s))
    engine = LLMReplica.options(request_router_config=router, **serve_opts).bind(
        cfg, ReplicaOptions(**opts, model_name=name))
    ingress = {"model": a.model_dir(), "served_model_name": name, "dtype": a.dtype, "max_model_len": a.max_model_len,
               "default_max_tokens": a.default_max_tokens, "retry_after_s": a.retry_after_s,
               "job_ttl_s": a.job_ttl_s, "jobs_db": a.jobs_db, "job_max_attempts": a.job_max_attempts,
               "job_retry_max_s": a.job_retry_max_s, "engine_deployment": "LLMReplica",
               "api_key_hashes": [key_hash(k) for k in a.api_key], "max_body_bytes": a.max_body_bytes,
               "body_timeout_s": a.body_timeout_s, "max_queued_jobs": a.max_queued_jobs,
               "request_timeout_s": a.request_timeout_s}
    return serve.deployment(Ingress, name="Ingress").options(
        num_replicas=1, max_ongoing_requests=1024, ray_actor_options=ingress_actor_options(a, _cluster_resources()),
    ).bind(engine, ingress)
