"""End-to-end decode throughput of the engine: prefill, then decode steps at several batch sizes.

    python benchmarks/bench_decode.py --model random:llama3-8b --context 32768 --batches 1,4,16 \
        --attention full

Each batch size gets fresh sequences of `--context` prompt tokens (reduced where the KV of the
batch does not fit, and said so). The roofline of a decode step is (weight bytes + KV bytes read)
over the HBM bandwidth measured in this run."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import hbm_bandwidth, table, write_result  # noqa: E402

from retroinfer.config import EngineConfig, WaveConfig  # noqa: E402
from retroinfer.engine.llm_engine import LLMEngine  # noqa: E402
from retroinfer.engine.sampling import SamplingParams  # noqa: E402


def clustered_kv(layer: int, T: int, H: int, D: int, seed: int):
    """Synthetic prompt KV with the cluster structure real keys have: T/64 topic centres visited
    in runs of 32 tokens, plus noise; random values."""
    g = torch.Generator(device="cuda").manual_seed(seed * 1000 + layer)
    centres = torch.randn(H, max(1, T // 64), D, device="cuda", generator=g)
    topic = torch.randint(0, centres.shape[1], (T // 32 + 1,), device="cuda", generator=g)
    k = centres[:, topic.repeat_interleave(32)[:T]]
    k += 0.5 * torch.randn(H, T, D, device="cuda", generator=g)
    v = torch.randn(H, T, D, device="cuda", generator=g, dtype=torch.bfloat16)
    return k.to(torch.bfloat16).transpose(0, 1), v.transpose(0, 1)


def run_batch(engine: LLMEngine, batch: int, context: int, steps: int, seed: int,
              synthesize: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    mc = engine.model_cfg
    params = SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True)
    prefill_s = []
    if not synthesize:   # compile every kernel of the prefill path before timing one
        engine.add_request(f"warm{batch}", list(range(1, 4097)), SamplingParams(max_tokens=1))
        while engine.has_work():
            engine.step()
    for i in range(batch):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if synthesize:
            engine.add_prefilled(f"b{batch}-{i}", context, params, lambda layer, T, i=i: clustered_kv(
                layer, T, mc.num_kv_heads, mc.head_dim, seed * 100 + i))
        else:
            ids = torch.randint(0, mc.vocab_size, (context,), generator=g).tolist()
            engine.add_request(f"b{batch}-{i}", ids, params)
            engine.step()                      # the prefill of this sequence (+ its first token)
        torch.cuda.synchronize()
        prefill_s.append(time.perf_counter() - t0)
    assert len(engine.running) == batch, "all sequences must be running"
    for _ in range(3):                     # warm-up decode steps
        engine.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    step_s = (time.perf_counter() - t0) / steps
    for s in list(engine.running):
        engine.abort(s.request_id)
    engine.step()
    return {"batch": batch, "context": context, "prefill_s": None if synthesize else min(prefill_s),
            "setup_s": sum(prefill_s), "step_ms": step_s * 1e3, "tokens_per_s": batch / step_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="random:llama3-8b")
    ap.add_argument("--attention", default="full", choices=["full", "wave"])
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--batches", default="1,4,16", help="comma-separated; 'max': the largest that fits")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--offload", action="store_true", help="wave: indexed KV in pinned host memory")
    ap.add_argument("--host-kv-gb", type=float, default=None)
    ap.add_argument("--synthesize", action="store_true",
                    help="write synthetic clustered prompt KV straight into the cache instead of prefilling")
    ap.add_argument("--graphs", default="both", choices=["on", "off", "both"],
                    help="CUDA-graph decode steps (where the backend allows): on, off, or both side by side")
    ap.add_argument("--name", default=None, help="result file name (default decode_<attention>)")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_decode needs a CUDA GPU")
    batches = [0 if b == "max" else int(b) for b in a.batches.split(",")]   # 0: the largest that fits
    bw = hbm_bandwidth()
    cfg = EngineConfig(model=a.model, attention=a.attention, dtype=a.dtype, device="cuda",
                       max_batch=max(batches) or 16, max_model_len=a.context + a.steps + 64,
                       prefill_chunk=8192, prefill_slice_s=None, wave=WaveConfig(), offload=a.offload,
                       host_kv_budget_bytes=int(a.host_kv_gb * 2**30) if a.host_kv_gb else None)
    t0 = time.perf_counter()
    engine = LLMEngine(cfg)
    load_s = time.perf_counter() - t0
    mc = engine.model_cfg
    weight_bytes = mc.weight_bytes(torch.bfloat16)
    capacity = engine.stats()["capacity_bytes"]
    graph_runners = {st: st.graphs for st in engine.executor.stages}
    rows = []
    for b in batches:
        per_token = engine.kv_bytes_for(1)
        if b == 0:
            b = min(cfg.max_batch, int(capacity * 0.97) // ((a.context + a.steps + 16) * per_token))
        context = min(a.context, int(capacity * 0.97) // b // per_token - a.steps - 16)
        context = context // 1024 * 1024
        if context < 1024:
            rows.append({"batch": b, "skipped": "KV does not fit"})
            continue
        for graphs in ([True, False] if a.graphs == "both" else [a.graphs == "on"]):
            for st in engine.executor.stages:
                st.graphs = graph_runners[st] if graphs else None
            r = run_batch(engine, b, context, a.steps, seed=b, synthesize=a.synthesize)
            r.update({k: v for k, v in engine.stats().items() if k.startswith("pcie")})
            kv_read = b * (context + a.steps // 2) * per_token
            roof_ms = (weight_bytes + kv_read) / bw * 1e3 if a.attention == "full" else None
            r.update(cuda_graphs=graphs and graph_runners[engine.executor.stages[0]] is not None,
                     roofline_ms=roof_ms, roofline_frac=roof_ms / r["step_ms"] if roof_ms else None,
                     context_reduced=context < a.context)
            rows.append(r)
            print(r, flush=True)
    table(rows, ["batch", "context", "cuda_graphs", "prefill_s", "setup_s", "step_ms", "roofline_ms",
                 "roofline_frac", "tokens_per_s", "pcie_bytes_per_step"])
    write_result(a.name or f"decode_{a.attention}", {
        "model": a.model, "attention": a.attention, "offload": a.offload, "synthesized_kv": a.synthesize,
        "dtype": a.dtype, "hbm_bytes_per_s": bw,
        "weight_bytes": weight_bytes, "kv_bytes_per_token": engine.kv_bytes_for(1), "load_s": load_s,
        "kv_capacity_bytes": capacity, "rows": rows})


if __name__ == "__main__":
    main()
