"""The serving cluster (installed as `retroinfer.cluster`), in three wings:

host/    the machine: NUMA topology, one Ray node per NUMA node, `retroinfer cluster up | down | status`
serve/   the engine replica as a Ray Serve deployment: its engine loop, pipeline stages, the
         KV-footprint router and the replica's metrics
http/    the HTTP ingress: OpenAI protocol models, request preparation, the guard, jobs and their store

Imports run http -> serve -> the engine (`retroinfer/`); host stands beside them (`deployments/`
composes serve and http into an application). NUMA memory policy is `retroinfer.numa`, below
the engine. Nothing here imports Ray at package import time; modules that need it import it.
"""
