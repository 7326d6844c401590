"""The host: what runs before and beneath Ray Serve.

topology.py   NUMA nodes, their CPUs, memory and local GPUs (sysfs)
launcher.py   one Ray node per NUMA node, each bound to its node's CPUs, memory and GPUs
cli.py        `retroinfer cluster up | down | status | topology`
"""
