"""Shared by the benchmarks: the card and versions, HBM bandwidth measured in the same run, and
results written to benchmarks/results/<name>_<gpu>.json with the command line (or under
$RETROINFER_RESULTS_DIR: on a device machine that re-syncs the working tree between calls, a run
that outlives its call writes outside it)."""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(os.environ.get("RETROINFER_RESULTS_DIR") or Path(__file__).resolve().parent / "results")


def environment() -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(),
           "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count,
                   cuda=torch.version.cuda)
    else:
        env["gpu"] = "cpu"
    return env


def hbm_bandwidth(gib: float = 4.0) -> float:
    """Device-to-device copy, bytes read + written per second (median of 10)."""
    n = int(gib * 2**30) // 2
    a = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    times = []
    for _ in range(12):
        s, e = torch.cuda.Event(True), torch.cuda.Event(True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del a, b
    return 2 * n * 2 / sorted(times[2:])[len(times[2:]) // 2]


def pcie_bandwidth(gib: float = 1.0) -> float:
    """Pinned host memory to the GPU, bytes per second (median of 10): the wave buffer's link."""
    n = int(gib * 2**30)
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(12):
        s, e = torch.cuda.Event(True), torch.cuda.Event(True)
        s.record()
        dev.copy_(host, non_blocking=True)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del host, dev
    return n / sorted(times[2:])[len(times[2:]) // 2]


def cuda_time(fn, iters: int = 20, warmup: int = 3) -> float:
    """Median seconds of fn() timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(True), torch.cuda.Event(True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return sorted(times)[len(times) // 2]


def graph_time(fn, iters: int = 20) -> float:
    """Median seconds of one replay of fn() captured in a CUDA graph: the GPU time without
    launch overhead (how the engine runs a decode step)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return cuda_time(g.replay, iters=iters)


def graph_timeline(fn, title: str) -> None:
    """Prints the kernels of one CUDA-graph replay of fn() in start order: start offset, duration
    and stream, so the critical path and the overlap of side-stream work can be read."""
    import tempfile
    from torch.profiler import ProfilerActivity, profile
    graph_time(fn, iters=2)                       # warm and capture once outside the profiler
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        g.replay()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy")),
                     key=lambda e: e["ts"])
    if not kernels:
        print(f"{title}: no kernels in the trace")
        return
    t0 = kernels[0]["ts"]
    end = max(e["ts"] + e["dur"] for e in kernels)
    print(f"{title}: {len(kernels)} kernels, {end - t0:.1f} us from first start to last end")
    for e in kernels:
        print(f"  {e['ts'] - t0:8.1f} {e['dur']:7.1f}  s{e.get('tid')}  {e['name'][:70]}")


def write_result(name: str, data: dict) -> Path:
    env = data.setdefault("env", environment())
    RESULTS.mkdir(parents=True, exist_ok=True)
    gpu = env["gpu"].replace(" ", "-").replace("/", "-")
    path = RESULTS / f"{name}_{gpu}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def table(rows: list[dict], cols: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(w) for c, w in zip(cols, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)
