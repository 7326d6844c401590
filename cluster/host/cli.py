"""`retroinfer cluster up | down | status | topology`"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import launcher
from .topology import discover, simulate


def add_cluster_parser(sub) -> None:
    p = sub.add_parser("cluster", help="one Ray node per NUMA node on this host")
    csub = p.add_subparsers(dest="cluster_command", required=True)

    u = csub.add_parser("up", help="start one Ray node per NUMA node (the first is the head)")
    u.add_argument("--host", help="this host's IP for the nodes (default: Ray's choice of node IP)")
    u.add_argument("--port", type=int, default=6379, help="the head's GCS port")
    u.add_argument("--simulate-numa", type=int, metavar="K", help="split each real node into K fake nodes")
    u.add_argument("--no-numactl", action="store_true",
                   help="bind with affinity + set_mempolicy even if numactl exists")
    u.add_argument("--temp-dir", help="Ray's temp dir (shared by the nodes)")
    u.add_argument("--object-store-fraction", type=float, default=0.3, help="of each node's memory")
    u.add_argument("--dry-run", action="store_true", help="print the commands only")
    u.add_argument("--state-file", type=Path, help="where pids are recorded (default ~/.retroinfer/cluster.json)")
    u.add_argument("--timeout", type=float, default=120.0)
    u.set_defaults(func=cmd_up)

    d = csub.add_parser("down", help="stop the nodes `cluster up` started (by pid)")
    d.add_argument("--state-file", type=Path)
    d.set_defaults(func=cmd_down)

    s = csub.add_parser("status", help="each node's CPU / memory / GPU binding, seen from inside a worker")
    s.add_argument("--address", help="a Ray address, or 'auto' (default: the one `cluster up` recorded)")
    s.add_argument("--state-file", type=Path)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    t = csub.add_parser("topology", help="print this host's NUMA nodes, CPUs, memory and GPUs")
    t.add_argument("--simulate-numa", type=int, metavar="K")
    t.set_defaults(func=cmd_topology)


def _topology(a):
    topo = discover()
    return simulate(topo, a.simulate_numa) if a.simulate_numa else topo


def cmd_topology(a) -> int:
    print(json.dumps(_topology(a).to_dict(), indent=1))
    return 0


def cmd_up(a) -> int:
    topo = _topology(a)
    plans = launcher.plan(topo, host=a.host, port=a.port, use_numactl=False if a.no_numactl else None,
                          temp_dir=a.temp_dir, object_store_fraction=a.object_store_fraction)
    for p in plans:
        print(f"# numa {p.numa} ({'head' if p.head else 'worker'}): cpus {len(p.cpus)}, gpus {p.gpus or '-'}")
        print(p.describe())
    if a.dry_run:
        return 0
    state = launcher.up(plans, host=a.host, port=a.port, state_file=a.state_file, timeout=a.timeout)
    print(f"cluster up: {len(state['nodes'])} nodes, address {state['address']}")
    print("serve on it (any directory; Ctrl-C stops the app, the nodes stay):")
    print(f"  {launcher.serve_hint(state['address'])}")
    print("stop the nodes: retroinfer cluster down")
    return 0


def cmd_down(a) -> int:
    pids = launcher.down(a.state_file)
    print(f"stopped {len(pids)} nodes" if pids else "no cluster recorded; nothing to stop")
    return 0


def cmd_status(a) -> int:
    address = a.address
    if address is None:
        sf = a.state_file or launcher.default_state_file()
        address, problem = launcher.recorded_address(sf)
        if problem:
            print(f"retroinfer cluster status: {problem}", file=sys.stderr)
            return 1
    rows = launcher.status(address)
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'numa':>4}  {'node':12}  {'cpus (affinity)':16}  {'mempolicy':16}  {'CUDA_VISIBLE_DEVICES':20}  gpus")
    for r in rows:
        pol = r["mempolicy"]
        pol = "n/a" if pol is None else f"{pol['mode']}{pol['nodes'] or ''}"
        print(f"{str(r['numa']):>4}  {r['node_id']:12}  {r['cpus']:16}  {pol:16}  "
              f"{str(r['cuda_visible_devices']):20}  {r['num_gpus']:g}")
    return 0


if __name__ == "__main__":   # python -m retroinfer.cluster.host.cli ...
    parser = argparse.ArgumentParser(prog="retroinfer")
    add_cluster_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args()
    sys.exit(args.func(args))
