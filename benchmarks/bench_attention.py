"""One layer's decode attention, Llama-3-8B shape (32 query / 8 KV heads, head dim 128, bf16):
wave attention against full attention (torch SDPA, and our paged kernel) in the same run, and
the index build against the layer's prefill attention. Decode times are CUDA-graph replays (the
engine replays its decode step as a graph); wave's eager time is reported beside. Each decode is
held against its floor (`floor.py`: the bytes its zones must read over the HBM bandwidth measured
in this run): `wave_floor_frac`, `sdpa_floor_frac` = floor / time. `--profile`
lists the kernels of a wave decode (the profiled case) and of the index build.

    python benchmarks/bench_attention.py --contexts 32768,131072,524288 --batches 1,8,32
    python benchmarks/bench_attention.py --contexts 131072 --batches 8 --profile
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cuda_time, graph_time, graph_timeline, hbm_bandwidth, table, write_result  # noqa: E402
from floor import full_step_bytes, wave_seqs, wave_step_bytes  # noqa: E402

from retroinfer.attention import make_backend  # noqa: E402
from retroinfer.attention.prefill import causal_attention  # noqa: E402
from retroinfer.config import WaveConfig  # noqa: E402
from retroinfer.models.presets import preset_config  # noqa: E402
from retroinfer.wave.index import build_index  # noqa: E402

HQ, HKV, D = 32, 8, 128


def profile_kernels(title: str, fn, calls: int = 5, top: int = 20) -> None:
    """torch.profiler over `calls` calls of fn: the kernels that take the GPU time."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    print(f"{title}: top {top} kernels over {calls} calls")
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=top), flush=True)


def clustered_kv(T: int, g: torch.Generator):
    """Keys drawn around T/64 topic centres in runs (real keys cluster); random values."""
    centres = torch.randn(HKV, max(1, T // 64), D, device="cuda", generator=g)
    topic = torch.randint(0, centres.shape[1], (T // 32 + 1,), device="cuda", generator=g)
    topic = topic.repeat_interleave(32)[:T]
    k = centres[:, topic] + 0.5 * torch.randn(HKV, T, D, device="cuda", generator=g)
    v = torch.randn(HKV, T, D, device="cuda", generator=g)
    return k.transpose(0, 1).to(torch.bfloat16), v.transpose(0, 1).to(torch.bfloat16)


def bench_case(T: int, B: int, wave: WaveConfig, hbm_bytes_per_s: float, profile: bool = False,
               timeline: bool = False) -> dict:
    g = torch.Generator(device="cuda").manual_seed(T + B)
    cfg = preset_config("random:llama3-8b")
    row = {"context": T, "batch": B}
    q = torch.randn(B, HQ, D, device="cuda", generator=g, dtype=torch.bfloat16)
    k1 = torch.randn(B, HKV, D, device="cuda", generator=g, dtype=torch.bfloat16)
    # Wave: one layer, B sequences, each its own clustered context.
    budget = int(B * (T + 64) * 4096 * 1.3) + (1 << 30)
    wb = make_backend("wave", cfg, range(1), "cuda", torch.bfloat16, budget, wave, max_seqs=B)
    for b in range(B):
        k, v = clustered_kv(T, g)
        wb.reserve(b, T + 64)
        wb.write_prefill(0, b, k, v, 0)
        del k, v
    zones = wave_step_bytes(wave_seqs(wb, range(B)), HKV, D, 2)      # what the step below must read
    plan = wb.plan_decode(list(range(B)))
    row["wave_eager_ms"] = cuda_time(lambda: wb.decode(0, plan, q, k1, k1)) * 1e3
    row["wave_ms"] = graph_time(lambda: wb.decode(0, plan, q, k1, k1)) * 1e3
    row["wave_plan_ms"] = cuda_time(lambda: wb.plan_decode(list(range(B))), iters=5) * 1e3 / 32
    row["wave_floor_ms"] = zones.floor_ms(hbm_bytes_per_s)
    row["wave_floor_frac"] = row["wave_floor_ms"] / row["wave_ms"]
    row["wave_floor_zones_ms"] = zones.zone_ms(hbm_bytes_per_s)
    if profile:
        profile_kernels(f"wave decode, {T} tokens, batch {B}", lambda: wb.decode(0, plan, q, k1, k1))
    if timeline:
        graph_timeline(lambda: wb.decode(0, plan, q, k1, k1), f"wave decode graph, {T} tokens, batch {B}")
    del wb, plan
    torch.cuda.empty_cache()
    # Full attention over the same amount of KV.
    kf = torch.randn(B, HKV, T, D, device="cuda", generator=g, dtype=torch.bfloat16)
    vf = torch.randn_like(kf)
    qf = q[:, :, None, :]
    row["sdpa_ms"] = graph_time(lambda: F.scaled_dot_product_attention(qf, kf, vf, enable_gqa=True)) * 1e3
    del kf, vf
    torch.cuda.empty_cache()
    fb = make_backend("full", cfg, range(1), "cuda", torch.bfloat16, B * (T + 128) * 4096 + (1 << 26))
    kk = torch.randn(T, HKV, D, device="cuda", generator=g, dtype=torch.bfloat16)
    for b in range(B):
        fb.reserve(b, T + 64)
        fb.write_prefill(0, b, kk, kk, 0)
    fplan = fb.plan_decode(list(range(B)))
    row["paged_ms"] = graph_time(lambda: fb.decode(0, fplan, q, k1, k1)) * 1e3
    row["kv_gb_per_s_sdpa"] = B * T * HKV * D * 2 * 2 / (row["sdpa_ms"] / 1e3) / 1e9
    row["sdpa_floor_frac"] = full_step_bytes([T] * B, HKV, D, 2).floor_ms(hbm_bytes_per_s) / row["sdpa_ms"]
    row["speedup"] = min(row["sdpa_ms"], row["paged_ms"]) / row["wave_ms"]
    del fb, fplan, kk
    torch.cuda.empty_cache()
    return row


def bench_build(T: int, wave: WaveConfig, profile: bool = False) -> dict:
    """Index build of one layer against that layer's prefill attention (flash, causal)."""
    g = torch.Generator(device="cuda").manual_seed(7)
    k, v = (x.contiguous() for x in clustered_kv(T, g))     # token-major [T, Hkv, D], as the model writes it
    q = torch.randn(T, HQ, D, device="cuda", generator=g, dtype=torch.bfloat16)
    attn_s = cuda_time(lambda: causal_attention(q, k, v, 0), iters=5, warmup=1)
    build_s = cuda_time(lambda: build_index(k[4:T - 64], v[4:T - 64], wave), iters=5, warmup=1)
    if profile:
        profile_kernels(f"index build, {T} tokens", lambda: build_index(k[4:T - 64], v[4:T - 64], wave), calls=2)
    return {"context": T, "prefill_attention_ms": attn_s * 1e3, "index_build_ms": build_s * 1e3,
            "build_frac": build_s / attn_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--contexts", default="32768,131072,524288")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--build-context", type=int, default=131072)
    ap.add_argument("--name", default="attention")
    ap.add_argument("--profile", action="store_true", help="kernel table of every wave case and the build")
    ap.add_argument("--timeline", action="store_true", help="kernel timeline of one graph replay of every wave case")
    ap.add_argument("--no-build", action="store_true", help="skip the index build measurement")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_attention needs a CUDA GPU")
    wave = WaveConfig()
    bw = hbm_bandwidth()
    rows = []
    for T in map(int, a.contexts.split(",")):
        for B in map(int, a.batches.split(",")):
            if 2 * B * T * HKV * D * 2 * 2.2 > torch.cuda.mem_get_info()[0]:
                rows.append({"context": T, "batch": B, "skipped": "does not fit"})
                continue
            try:
                rows.append(bench_case(T, B, wave, bw, a.profile, a.timeline))
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                rows.append({"context": T, "batch": B, "skipped": "out of memory"})
            print(rows[-1], flush=True)
    table(rows, ["context", "batch", "sdpa_ms", "paged_ms", "wave_ms", "wave_eager_ms", "wave_plan_ms", "speedup",
                 "kv_gb_per_s_sdpa", "sdpa_floor_frac", "wave_floor_ms", "wave_floor_frac"])
    build = None if a.no_build else bench_build(a.build_context, wave, a.profile)
    if build:
        table([build], list(build))
    write_result(a.name, {"shape": {"hq": HQ, "hkv": HKV, "d": D, "dtype": "bfloat16"}, "hbm_bytes_per_s": bw,
                               "wave": wave.__dict__, "decode": rows, "build": build})


if __name__ == "__main__":
    main()
