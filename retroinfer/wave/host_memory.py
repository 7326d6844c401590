"""Pinned host memory on the NUMA node of a GPU: the wave buffer's CPU pool lives there, so the
GPU's zero-copy reads cross no socket link."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch


def gpu_numa_node(device: torch.device) -> int | None:
    """The NUMA node of a CUDA device's PCI slot (sysfs), or None where unknown."""
    if device.type != "cuda":
        return None
    p = torch.cuda.get_device_properties(device)
    bus = f"{p.pci_domain_id:04x}:{p.pci_bus_id:02x}:{p.pci_device_id:02x}.0"
    try:
        node = int(Path(f"/sys/bus/pci/devices/{bus}/numa_node").read_text())
    except (OSError, ValueError):
        return None
    return node if node >= 0 else None


@contextlib.contextmanager
def preferred_node(node: int | None):
    """Allocations inside prefer `node` (first touch happens when the pages are pinned)."""
    from ..cluster import numa

    before = numa.get_mempolicy() if node is not None else None
    ok = node is not None and numa.set_preferred(node)
    try:
        yield ok
    finally:
        if ok:
            mode, nodes = before or ("default", [])
            codes = {name: code for code, name in numa.MODE_NAMES.items()}
            numa.set_mempolicy(codes.get(mode, numa.MPOL_DEFAULT), nodes)


def pinned_empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A pinned host tensor on `device`'s NUMA node (where the node and libnuma are known)."""
    with preferred_node(gpu_numa_node(device)):
        return torch.empty(shape, dtype=dtype, pin_memory=True)
