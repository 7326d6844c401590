"""The machine's NUMA topology from sysfs: nodes, their CPUs and memory, and the NVIDIA GPUs
attached to each (by the PCI device's `numa_node`; -1, i.e. unknown, counts as node 0).

GPU indices are CUDA indices in PCI bus order (what `nvidia-smi` shows, and what CUDA uses under
`CUDA_DEVICE_ORDER=PCI_BUS_ID`, which the launcher sets). `nvidia-smi`, when present, gives the
index <-> bus id map exactly; without it the NVIDIA display/3D controllers are sorted by bus id.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path

from retroinfer.numa import format_cpulist, parse_cpulist, pci_numa_node

NVIDIA_VENDOR = "0x10de"


@dataclass(frozen=True)
class GPU:
    index: int            # CUDA index in PCI bus order
    pci_bus_id: str       # 0000:17:00.0
    numa_node: int


@dataclass(frozen=True)
class NumaNode:
    id: int
    cpus: tuple[int, ...]
    mem_total_bytes: int = 0
    mem_free_bytes: int = 0
    gpus: tuple[GPU, ...] = ()
    simulated_from: int | None = None   # the real node a simulated node was carved from

    @property
    def gpu_indices(self) -> list[int]:
        return [g.index for g in self.gpus]


@dataclass(frozen=True)
class Topology:
    nodes: tuple[NumaNode, ...]
    simulated: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def num_gpus(self) -> int:
        return sum(len(n.gpus) for n in self.nodes)

    def to_dict(self) -> dict:
        return {"simulated": self.simulated, "notes": list(self.notes), "nodes": [
            {"id": n.id, "cpus": format_cpulist(n.cpus), "num_cpus": len(n.cpus),
             "mem_total_gb": round(n.mem_total_bytes / 2**30, 1), "mem_free_gb": round(n.mem_free_bytes / 2**30, 1),
             "gpus": [{"index": g.index, "pci_bus_id": g.pci_bus_id} for g in n.gpus],
             **({"simulated_from": n.simulated_from} if n.simulated_from is not None else {})}
            for n in self.nodes]}


def _meminfo(path: Path) -> tuple[int, int]:
    total = free = 0
    try:
        for line in path.read_text().splitlines():
            m = re.match(r"Node \d+ (MemTotal|MemFree):\s+(\d+) kB", line)
            if m:
                val = int(m.group(2)) * 1024
                total, free = (val, free) if m.group(1) == "MemTotal" else (total, val)
    except OSError:
        pass
    return total, free


def _nvidia_smi_bus_ids() -> dict[str, int] | None:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=index,pci.bus_id", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    ids = {}
    for line in out.strip().splitlines():
        idx, bus = (s.strip() for s in line.split(","))
        ids[_norm_bus(bus)] = int(idx)
    return ids


def _norm_bus(bus: str) -> str:
    """nvidia-smi prints 00000000:17:00.0; sysfs 0000:17:00.0."""
    dom, rest = bus.lower().split(":", 1)
    return f"{int(dom, 16):04x}:{rest}"


def discover_gpus(sys_root: str | Path = "/sys", use_nvidia_smi: bool = True) -> list[GPU]:
    pci = Path(sys_root) / "bus/pci/devices"
    found = []
    for dev in sorted(pci.glob("*")) if pci.is_dir() else []:
        try:
            vendor = (dev / "vendor").read_text().strip()
            cls = (dev / "class").read_text().strip()
        except OSError:
            continue
        # 0x0300xx VGA, 0x0302xx 3D controller; NVSwitch bridges (0x0680xx) are not GPUs.
        if vendor != NVIDIA_VENDOR or not cls.startswith("0x03"):
            continue
        node = pci_numa_node(dev.name, sys_root)
        found.append((_norm_bus(dev.name), node if node is not None else 0))
    smi = _nvidia_smi_bus_ids() if use_nvidia_smi else None
    gpus = []
    for i, (bus, node) in enumerate(sorted(found)):
        idx = smi.get(bus, i) if smi else i
        gpus.append(GPU(idx, bus, node))
    return sorted(gpus, key=lambda g: g.index)


def discover(sys_root: str | Path = "/sys", use_nvidia_smi: bool = True) -> Topology:
    base = Path(sys_root) / "devices/system/node"
    gpus = discover_gpus(sys_root, use_nvidia_smi)
    nodes, notes = [], []
    for d in sorted(base.glob("node[0-9]*"), key=lambda p: int(p.name[4:])) if base.is_dir() else []:
        nid = int(d.name[4:])
        try:
            cpus = parse_cpulist((d / "cpulist").read_text())
        except OSError:
            continue
        if not cpus:           # memory-only node (CXL, HBM): no raylet there
            notes.append(f"node {nid} has no CPUs; skipped")
            continue
        total, free = _meminfo(d / "meminfo")
        nodes.append(NumaNode(nid, cpus, total, free, tuple(g for g in gpus if g.numa_node == nid)))
    if not nodes:
        notes.append("no NUMA information in sysfs; treating the machine as one node")
        nodes = [NumaNode(0, tuple(sorted(os.sched_getaffinity(0))), 0, 0, tuple(gpus))]
    orphans = [g for g in gpus if g.numa_node not in {n.id for n in nodes}]
    if orphans:   # a GPU on a CPU-less node: give it to the first node
        notes.append(f"GPUs {[g.index for g in orphans]} are on nodes without CPUs; assigned to node {nodes[0].id}")
        nodes[0] = replace(nodes[0], gpus=nodes[0].gpus + tuple(orphans))
    return Topology(tuple(nodes), notes=tuple(notes))


def simulate(topo: Topology, k: int) -> Topology:
    """Split each real node's CPUs (and memory, and GPUs round-robin) into `k` fake nodes, for
    development and tests on a one-node machine. Fake node ids are consecutive."""
    if k < 1:
        raise ValueError("--simulate-numa needs k >= 1")
    out = []
    for real in topo.nodes:
        if len(real.cpus) < k:
            raise ValueError(f"cannot split node {real.id}'s {len(real.cpus)} CPUs into {k} nodes")
        for j in range(k):
            cpus = real.cpus[j * len(real.cpus) // k:(j + 1) * len(real.cpus) // k]
            gpus = real.gpus[j::k]
            out.append(NumaNode(len(out), cpus, real.mem_total_bytes // k, real.mem_free_bytes // k,
                                tuple(gpus), simulated_from=real.id))
    return Topology(tuple(out), simulated=True, notes=topo.notes)
