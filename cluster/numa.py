"""NUMA memory policy for the current process, through the `set_mempolicy` / `get_mempolicy`
system calls (ctypes on libc), so it works where libnuma is absent; libnuma (`libnuma.so.1`) is
used, when present, only for `numa_available()`.

Why not a package: the PyPI `numa` 1.4.6 sdist does not build on Python 3.11+ (its generated C is
stale), and `py-libnuma` is a thin ctypes layer like this one. Everything here degrades cleanly: on
a kernel or container without the syscalls (ENOSYS / EPERM) the functions return False / None.

A policy set here is inherited by every child process (raylet, workers), which is how the launcher
binds a Ray node's memory to its NUMA node when `numactl` is not installed.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

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


def binding_report() -> dict:
    """What this process is bound to, as seen from inside: CPUs and memory policy."""
    from .topology import format_cpulist
    pol = get_mempolicy()
    return {"pid": os.getpid(), "cpus": format_cpulist(os.sched_getaffinity(0)),
            "mempolicy": None if pol is None else {"mode": pol[0], "nodes": pol[1]},
            "libnuma": has_libnuma(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
