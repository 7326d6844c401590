"""The engine replica as a Ray Serve deployment.

replica.py      the deployment that owns an engine (its scheduler) and its stages
engine_loop.py  the engine on its own thread, outputs to per-request asyncio queues
monitor.py      what the engine loop reports goes here: request metrics, Ray metrics
pipeline.py     pipeline-stage actors and the executor that chains them
router.py       the KV-footprint request router (a Serve RequestRouter)
routing.py      its policy, a replica's routing report, the per-process router registry the ingress reads
prometheus.py   request counters and histograms the monitor keeps and the ingress renders
metrics.py      replica metrics through ray.util.metrics
"""
