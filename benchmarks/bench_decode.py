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


def run_batch(engine: LLMEngine, batch: int, context: int, steps: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    vocab = engine.model_cfg.vocab_size
    params = SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True)
    prefill_s = []
    for i in range(batch):
        ids = torch.randint(0, vocab, (context,), generator=g).tolist()
        engine.add_request(f"b{batch}-{i}", ids, params)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
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
    return {"batch": batch, "context": context, "prefill_s": min(prefill_s), "step_ms": step_s * 1e3,
            "tokens_per_s": batch / step_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="random:llama3-8b")
    ap.add_argument("--attention", default="full", choices=["full", "wave"])
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--graphs", default="both", choices=["on", "off", "both"],
                    help="CUDA-graph decode steps (where the backend allows): on, off, or both side by side")
    ap.add_argument("--name", default=None, help="result file name (default decode_<attention>)")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_decode needs a CUDA GPU")
    batches = [int(b) for b in a.batches.split(",")]
    bw = hbm_bandwidth()
    cfg = EngineConfig(model=a.model, attention=a.attention, dtype=a.dtype, device="cuda",
                       max_batch=max(batches), max_model_len=a.context + a.steps + 64,
                       prefill_chunk=8192, wave=WaveConfig())
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
        context = min(a.context, int(capacity * 0.98) // (b * per_token) - a.steps - 16)
        context = context // 1024 * 1024
        if context < 1024:
            rows.append({"batch": b, "skipped": "KV does not fit"})
            continue
        for graphs in ([True, False] if a.graphs == "both" else [a.graphs == "on"]):
            for st in engine.executor.stages:
                st.graphs = graph_runners[st] if graphs else None
            r = run_batch(engine, b, context, a.steps, seed=b)
            kv_read = b * (context + a.steps // 2) * per_token
            roof_ms = (weight_bytes + kv_read) / bw * 1e3
            r.update(cuda_graphs=graphs and graph_runners[engine.executor.stages[0]] is not None,
                     roofline_ms=roof_ms, roofline_frac=roof_ms / r["step_ms"],
                     context_reduced=context < a.context)
            rows.append(r)
            print(r, flush=True)
    table(rows, ["batch", "context", "cuda_graphs", "prefill_s", "step_ms", "roofline_ms", "roofline_frac",
                 "tokens_per_s"])
    write_result(a.name or f"decode_{a.attention}", {
        "model": a.model, "attention": a.attention, "dtype": a.dtype, "hbm_bytes_per_s": bw,
        "weight_bytes": weight_bytes, "kv_bytes_per_token": engine.kv_bytes_for(1), "load_s": load_s,
        "kv_capacity_bytes": capacity, "rows": rows})


if __name__ == "__main__":
    main()
