"""NUMA below the engine: the memory policy of the current process, CPU lists, and the NUMA node
of a PCI device (a GPU) as sysfs reports it. No Ray and no torch here: the engine (the wave
buffer's pinned pool), the serving replicas and the host launcher all use it.

Memory policy goes through the `set_mempolicy` / `get_mempolicy` system calls (ctypes on libc), so
it works where libnuma is absent; libnuma (`libnuma.so.1`) is used, when present, only for
`numa_available()`.

Why not a package: the PyPI `numa` 1.4.6 sdist does not build on Python 3.11+ (its generated C is
stale), and `py-libnuma` is a thin ctypes layer like this one. Everything here degrades cleanly: on
a kernel or container without the syscalls (ENOSYS / EPERM) the functions return False / None.

A policy set here is inherited by every child process (raylet, workers), which is how the launcher
binds a Ray node's memory to its NUMA node when `numactl` is not installed.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
from pathlib import Path

MPOL_DEFAULT, MPOL_PREFERRED, MPOL_BIND, MPOL_INTERLEAVE, MPOL_LOCAL = 0, 1, 2, 3, 4
MODE_NAMES = {0: "default", 1: "preferred", 2: "bind", 3: "interleave", 4: "local",
              5: "preferred_many", 6: "weighted_interleave"}
_MODE_FLAGS = (1 << 15) | (1 << 14) | (1 << 13)   # MPOL_F_STATIC_NODES | RELATIVE | NUMA_BALANCING

_SYSCALLS = {  # (set_mempolicy, get_mempolicy)
    "x86_64": (238, 239), "aarch64": (237, 236), "ppc64le": (261, 260),
}
_MASK_BITS = 1024
_ULONG_BITS = ctypes.sizeof(ctypes.c_ulong) * 8
_Mask = ctypes.c_ulong * (_MASK_BITS // _ULONG_BITS)

_libc = ctypes.CDLL(None, use_errno=True)
_libnuma = None
_libnuma_path = ctypes.util.find_library("numa")
if _libnuma_path:
    try:
        _libnuma = ctypes.CDLL(_libnuma_path, use_errno=True)
    except OSError:
        _libnuma = None


def _nr(which: int) -> int | None:
    nums = _SYSCALLS.get(platform.machine())
    return nums[which] if nums else None


def _mask(nodes) -> _Mask:
    m = _Mask()
    for n in nodes:
        if not 0 <= n < _MASK_BITS:
            raise ValueError(f"NUMA node {n} out of range")
        m[n // _ULONG_BITS] |= 1 << (n % _ULONG_BITS)
    return m


def _nodes(m: _Mask) -> list[int]:
    return [i for i in range(_MASK_BITS) if m[i // _ULONG_BITS] >> (i % _ULONG_BITS) & 1]


def has_libnuma() -> bool:
    return _libnuma is not None


def numa_available() -> bool:
    """True if the kernel has NUMA support (libnuma's numa_available, else a get_mempolicy probe)."""
    if _libnuma is not None:
        try:
            return _libnuma.numa_available() >= 0
        except AttributeError:
            pass
    return get_mempolicy() is not None


def get_mempolicy() -> tuple[str, list[int]] | None:
    """The calling thread's policy: ("bind", [0]), ("default", []), ...; None if unsupported."""
    nr = _nr(1)
    if nr is None:
        return None
    mode = ctypes.c_int(0)
    mask = _Mask()
    rc = _libc.syscall(nr, ctypes.byref(mode), mask, ctypes.c_ulong(_MASK_BITS), None, ctypes.c_ulong(0))
    if rc != 0:
        return None
    m = mode.value & ~_MODE_FLAGS
    return MODE_NAMES.get(m, str(m)), _nodes(mask)


def set_mempolicy(mode: int, nodes=()) -> bool:
    """Set the calling thread's policy (children inherit it). False if refused or unsupported."""
    nr = _nr(0)
    if nr is None:
        return False
    if mode in (MPOL_DEFAULT, MPOL_LOCAL):
        rc = _libc.syscall(nr, ctypes.c_int(mode), None, ctypes.c_ulong(0))
    else:
        # The kernel reads maxnode - 1 bits (a long-standing off-by-one that libnuma matches).
        rc = _libc.syscall(nr, ctypes.c_int(mode), _mask(nodes), ctypes.c_ulong(_MASK_BITS + 1))
    return rc == 0


def set_membind(nodes) -> bool:
    return set_mempolicy(MPOL_BIND, nodes)


def set_preferred(node: int) -> bool:
    return set_mempolicy(MPOL_PREFERRED, [node])


def bind_process(cpus, mem_nodes) -> None:
    """CPU affinity + memory binding for this process (a `preexec_fn` for the launcher). Raises
    OSError if the affinity cannot be set; a refused memory policy only loses memory locality."""
    os.sched_setaffinity(0, set(cpus))
    if mem_nodes:
        set_membind(mem_nodes)


@contextlib.contextmanager
def preferred_node(node: int | None):
    """Allocations inside prefer `node` (first touch happens when the pages are pinned); the
    thread's previous policy comes back on exit. None, or a refused policy: nothing changes."""
    before = get_mempolicy() if node is not None else None
    ok = node is not None and set_preferred(node)
    try:
        yield ok
    finally:
        if ok:
            mode, nodes = before or ("default", [])
            codes = {name: code for code, name in MODE_NAMES.items()}
            set_mempolicy(codes.get(mode, MPOL_DEFAULT), nodes)


def parse_cpulist(text: str) -> tuple[int, ...]:
    """'0-3,8,10-11' -> (0, 1, 2, 3, 8, 10, 11) (the kernel's cpulist format)."""
    out: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-")
            out.extend(range(int(lo), int(hi) + 1))
        else:
            out.append(int(part))
    return tuple(sorted(set(out)))


def format_cpulist(cpus) -> str:
    """(0, 1, 2, 3, 8) -> '0-3,8'."""
    cpus = sorted(cpus)
    runs, i = [], 0
    while i < len(cpus):
        j = i
        while j + 1 < len(cpus) and cpus[j + 1] == cpus[j] + 1:
            j += 1
        runs.append(str(cpus[i]) if i == j else f"{cpus[i]}-{cpus[j]}")
        i = j + 1
    return ",".join(runs)


def pci_numa_node(bus_id: str, sys_root: str | Path = "/sys") -> int | None:
    """The NUMA node of the PCI device `bus_id` (sysfs spelling, `0000:17:00.0`): its sysfs
    `numa_node`, or None where sysfs has none or says -1 (a one-node machine, some VMs)."""
    try:
        node = int((Path(sys_root) / "bus/pci/devices" / bus_id / "numa_node").read_text().strip())
    except (OSError, ValueError):
        return None
    return node if node >= 0 else None


def binding_report() -> dict:
    """What this process is bound to, as seen from inside: CPUs and memory policy."""
    pol = get_mempolicy()
    return {"pid": os.getpid(), "cpus": format_cpulist(os.sched_getaffinity(0)),
            "mempolicy": None if pol is None else {"mode": pol[0], "nodes": pol[1]},
            "libnuma": has_libnuma(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
