"""Pinned host memory on the NUMA node of a GPU: the wave buffer's CPU pool lives there, so the
GPU's zero-copy reads cross no socket link."""
from __future__ import annotations

import torch

from .. import numa


def gpu_numa_node(device: torch.device) -> int | None:
    """The NUMA node of a CUDA device's PCI slot, or None where unknown (or not CUDA)."""
    if device.type != "cuda":
        return None
    p = torch.cuda.get_device_properties(device)
    return numa.pci_numa_node(f"{p.pci_domain_id:04x}:{p.pci_bus_id:02x}:{p.pci_device_id:02x}.0")


def _pow2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def slab_plan(count: int, nbytes: int) -> list[tuple[int, int]]:
    """How `count` equal tensors of `nbytes` are carved from power-of-two slabs: [(slab bytes,
    tensors in it)]. torch's pinned allocator rounds every request up to a power of two, so a
    pool asked for tensor by tensor can take twice its size (a 66 GiB pool of 64 layers' K and V
    would pin 128 GiB). Big slabs first, each the largest power of two the remaining
    tensors fill; the last rounds up, by less than one tensor's worth of the remainder."""
    plan, left = [], count
    while left > 0:
        slab = _pow2_floor(left * nbytes) if nbytes else 1
        if slab < nbytes:                       # the remainder fits no power of two below it
            slab *= 2
        take = min(left, slab // nbytes) if nbytes else left
        plan.append((slab, take))
        left -= take
    return plan


def pinned_bytes(count: int, nbytes: int) -> int:
    """Host memory that `pinned_tensors(count, ...)` of `nbytes` each pins."""
    return sum(slab for slab, _ in slab_plan(count, nbytes))


def pinned_tensors(count: int, shape, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """`count` pinned host tensors of `shape` on `device`'s NUMA node (where the node and libnuma
    are known), views of power-of-two slabs (see `slab_plan`): what is pinned stays within
    `pinned_bytes` of the request."""
    numel = 1
    for n in shape:
        numel *= n
    nbytes = numel * dtype.itemsize
    out = []
    with numa.preferred_node(gpu_numa_node(device)):
        for slab_bytes, take in slab_plan(count, nbytes):
            slab = torch.empty(slab_bytes, dtype=torch.uint8, pin_memory=True)
            out += [slab[i * nbytes:(i + 1) * nbytes].view(dtype).view(shape) for i in range(take)]
    return out
