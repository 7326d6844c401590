"""The serving cluster (installed as `retroinfer.cluster`).

topology.py   NUMA nodes, their CPUs, memory and local GPUs (sysfs)
launcher.py   one Ray node per NUMA node: `retroinfer cluster up | down | status`
pipeline.py   pipeline-stage actors and the executor that chains them
engine_loop.py  the engine on its own thread, outputs to per-request asyncio queues
replica.py    the Serve deployment that owns a scheduler (LLMEngine) and its stages
router.py     KV-footprint request router
frontend.py   tokenisation, validation and KV footprint of an HTTP request
protocol.py   OpenAI-compatible request / response models
api.py        the FastAPI ingress (/v1/completions, /v1/chat/completions, /v1/jobs, ...)
jobs.py       the job store for long-context requests
metrics.py    replica metrics (ray.util.metrics)

Nothing here imports Ray at package import time; modules that need it import it themselves.
"""
