"""End-to-end decode throughput of the engine: prefill, then decode steps at several batch sizes.

    python benchmarks/bench_decode.py --model random:llama3-8b --context 32768 --batches 1,4,16 \
        --attention full

Each batch size gets fresh sequences of `--context` prompt tokens (reduced where the KV of the
batch does not fit, and said so). The floor of a decode step (`floor.py`) is the bytes it must move,
weights and each attention zone's (full attention: every key and value; wave: steady zone,
centroids, retrieved rows, estimated clusters' means, with retrieved rows that miss the GPU cache
over PCIe), at the HBM and PCIe bandwidth measured in this run; `floor_frac` = floor / step, and
`floor_zones_ms` each zone's share of it. With CUDA graphs, `replay_ms` is the GPU time of the
step's graphs replayed back to back and `host_ms` = step_ms - replay_ms the host's share of a step
(planning, copies, sampling, scheduling); `--profile` lists the kernels that take the GPU time."""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import hbm_bandwidth, pcie_bandwidth, table, write_result  # noqa: E402
from floor import StepBytes, decode_weight_bytes, full_step_bytes, wave_seqs, wave_step_bytes  # noqa: E402

from retroinfer.attention.layer_split import LayerSplitAttention  # noqa: E402
from retroinfer.attention.wave import WaveAttention  # noqa: E402
from retroinfer.config import ATTENTIONS, EngineConfig, WaveConfig, fraction_or_auto  # noqa: E402
from retroinfer.engine.llm_engine import LLMEngine  # noqa: E402
from retroinfer.engine.sampling import SamplingParams  # noqa: E402
from retroinfer.models.catalog import resolve_model  # noqa: E402


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


def replay_ms(engine: LLMEngine, iters: int = 20) -> float | None:
    """GPU time of the latest step's stage graphs replayed back to back, without the host's work
    between steps (each replay rewrites the same KV slot with the same values). None without graphs."""
    graphs = [st.graphs.last for st in engine.executor.stages if st.graphs is not None]
    if len(graphs) != len(engine.executor.stages) or None in graphs:
        return None
    for g in graphs:
        g.graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        for g in graphs:
            g.graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def profile_steps(engine: LLMEngine, steps: int = 5, top: int = 25) -> None:
    """torch.profiler over decode steps: the kernels that take the most GPU time."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    print(f"top {top} GPU kernels over {steps} decode steps (batch {len(engine.running)}):")
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=top), flush=True)


def stdlib_text_ids(engine: LLMEngine, tokens: int) -> list[int]:
    """Real text for real queries: the Python standard library's own source, read offline, as
    many tokens as asked (the files in a fixed order)."""
    ids: list[int] = []
    for f in sorted(Path(os.__file__).parent.glob("*.py")):
        ids += engine.tokenizer.encode(f.read_text(errors="replace"))
        if len(ids) >= tokens:
            return ids[:tokens]
    raise SystemExit(f"the standard library holds fewer than {tokens} tokens of text")


def step_bytes(engine: LLMEngine, pcie_bytes: float = 0) -> StepBytes | None:
    """What the engine's next decode step must move (`floor.py`), from its backends' state; None
    for a backend without a floor model (quest)."""
    if engine.cfg.attention not in ("wave", "full"):
        return None
    mc, dtype = engine.model_cfg, engine.executor.dtype
    ids = [s.request_id for s in engine.running]
    out = StepBytes(weights=decode_weight_bytes(mc, dtype))
    lengths = [s.num_tokens for s in engine.running]
    for st in engine.executor.stages:
        be = st.backend
        dense, wave = len(be.layer_ids), None          # dense layers (all, for full) and the wave part
        if isinstance(be, WaveAttention):
            dense, wave = 0, be
        elif isinstance(be, LayerSplitAttention):
            dense, wave = len(be.dense.layer_ids), be.wave_part
        if wave is not None:
            layers = len(wave.layer_ids)
            out += wave_step_bytes(wave_seqs(wave, ids), mc.num_kv_heads, mc.head_dim, dtype.itemsize, layers,
                                   pcie_bytes * layers / mc.num_layers)
        if dense:
            out += full_step_bytes(lengths, mc.num_kv_heads, mc.head_dim, dtype.itemsize, dense)
    return out


def run_batch(engine: LLMEngine, batch: int, context: int, steps: int, seed: int,
              synthesize: bool = False, profile: bool = False, warmup: int = 3,
              text: list[int] | None = None) -> dict:
    g = torch.Generator().manual_seed(seed)
    mc = engine.model_cfg
    params = SamplingParams(max_tokens=warmup + steps + 16, temperature=0, ignore_eos=True)
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
            if text is not None:   # each sequence its own stretch of real text
                start = (i * len(text) // max(batch, 1)) % max(1, len(text) - context)
                ids = text[start:start + context]
            else:
                ids = torch.randint(0, mc.vocab_size, (context,), generator=g).tolist()
            engine.add_request(f"b{batch}-{i}", ids, params)
            engine.step()                      # the prefill of this sequence (+ its first token)
        torch.cuda.synchronize()
        prefill_s.append(time.perf_counter() - t0)
    assert len(engine.running) == batch, "all sequences must be running"
    for _ in range(warmup):                # warm-up decode steps (they also fill the GPU cluster cache)
        engine.step()
    torch.cuda.synchronize()
    for st in engine.executor.stages:
        st.backend.reset_metrics()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    step_s = (time.perf_counter() - t0) / steps
    stats = engine.stats()     # before the replays add to the counters
    wave = {k: stats[k] for k in ("pcie_bytes_per_step", "cache_hit_ratio", "cache_row_hit_ratio", "cache_fraction",
                                  "cache_bytes") if k in stats}
    if "pcie_bytes_per_step" in wave:
        wave["pcie_gb_per_s"] = wave["pcie_bytes_per_step"] / step_s / 1e9
    zones = step_bytes(engine, wave.get("pcie_bytes_per_step", 0))
    # Offload: replays of one step repeat its clusters, which then all hit the GPU cache: no measure
    # of a real step's GPU time.
    replay = None if engine.cfg.offload else replay_ms(engine)
    if profile:
        profile_steps(engine)
    for s in list(engine.running):
        engine.abort(s.request_id)
    engine.step()
    return {"batch": batch, "context": context, "prefill_s": None if synthesize else min(prefill_s),
            "setup_s": sum(prefill_s), "step_ms": step_s * 1e3, "tokens_per_s": batch / step_s,
            "replay_ms": replay, "host_ms": None if replay is None else step_s * 1e3 - replay, "bytes": zones, **wave}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="random:llama3-8b")
    ap.add_argument("--attention", default="full", choices=list(ATTENTIONS))
    ap.add_argument("--context", default="32768", help="comma-separated context lengths (a sweep)")
    ap.add_argument("--batches", default="1,4,16", help="comma-separated; 'max': the largest that fits")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--offload", action="store_true", help="wave: indexed KV in pinned host memory")
    ap.add_argument("--host-kv-gb", type=float, default=None)
    ap.add_argument("--cache-fraction", type=fraction_or_auto, default=WaveConfig.cache_fraction,
                    help="offload: GPU cluster cache as a share of the host pool (0: none; auto: what the "
                         "GPU budget leaves after the index)")
    ap.add_argument("--cache-slot-rows", type=int, default=WaveConfig.cache_slot_rows,
                    help="offload: rows of a cluster the GPU cache keeps (a multiple of 16)")
    ap.add_argument("--dense-first", type=int, default=0, help="wave: the first layers attending densely")
    ap.add_argument("--dense-last", type=int, default=0, help="wave: the last layers attending densely")
    ap.add_argument("--warmup", type=int, default=3, help="decode steps before the timed ones")
    ap.add_argument("--text", action="store_true",
                    help="prompts of real text (the Python standard library's source) instead of random ids: "
                         "real queries for a real model (a .gguf, catalog name or HF directory)")
    ap.add_argument("--synthesize", action="store_true",
                    help="write synthetic clustered prompt KV straight into the cache instead of prefilling")
    ap.add_argument("--graphs", default="both", choices=["on", "off", "both"],
                    help="CUDA-graph decode steps (where the backend allows): on, off, or both side by side")
    ap.add_argument("--profile", action="store_true",
                    help="torch.profiler over 5 decode steps of the last batch: the top 25 GPU kernels")
    ap.add_argument("--name", default=None, help="result file name (default decode_<attention>)")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_decode needs a CUDA GPU")
    batches = [0 if b == "max" else int(b) for b in a.batches.split(",")]   # 0: the largest that fits
    contexts = [int(c) for c in a.context.split(",")]
    bw, pcie_bw = hbm_bandwidth(), pcie_bandwidth()
    cfg = EngineConfig(model=resolve_model(a.model), attention=a.attention, dtype=a.dtype, device="cuda",
                       max_batch=max(batches) or 16, max_model_len=max(contexts) + a.warmup + a.steps + 64,
                       prefill_chunk=8192, prefill_budget_tokens=None,
                       wave=WaveConfig(cache_fraction=a.cache_fraction, cache_slot_rows=a.cache_slot_rows,
                                       dense_first=a.dense_first, dense_last=a.dense_last),
                       offload=a.offload,
                       host_kv_budget_bytes=int(a.host_kv_gb * 2**30) if a.host_kv_gb else None)
    t0 = time.perf_counter()
    engine = LLMEngine(cfg)
    load_s = time.perf_counter() - t0
    mc = engine.model_cfg
    weight_bytes = mc.weight_bytes(torch.bfloat16)
    capacity = engine.stats()["capacity_bytes"]
    graph_runners = {st: st.graphs for st in engine.executor.stages}
    text = stdlib_text_ids(engine, 2 * max(contexts)) if a.text else None
    rows = []
    per_token = engine.bytes_per_token
    for bi, (want, b) in enumerate((c, b) for c in contexts for b in batches):
        if b == 0:
            b = min(cfg.max_batch, int(capacity * 0.97) // ((want + a.steps + 32) * per_token))
        context = min(want, int(capacity * 0.97) // max(b, 1) // per_token - a.steps - 32)
        context = context // 1024 * 1024
        if b == 0 or context < 1024:
            rows.append({"batch": b, "context": want, "skipped": "KV does not fit"})
            continue
        modes = [True, False] if a.graphs == "both" else [a.graphs == "on"]
        for graphs in modes:
            for st in engine.executor.stages:
                st.graphs = graph_runners[st] if graphs else None
            r = run_batch(engine, b, context, a.steps, seed=b, synthesize=a.synthesize, warmup=a.warmup, text=text,
                          profile=a.profile and bi == len(batches) * len(contexts) - 1 and graphs == modes[0])
            zones = r.pop("bytes")
            floor_ms = zones.floor_ms(bw, pcie_bw) if zones else None
            r.update(cuda_graphs=graphs and graph_runners[engine.executor.stages[0]] is not None,
                     floor_ms=floor_ms, floor_frac=floor_ms / r["step_ms"] if floor_ms else None,
                     floor_zones_ms=zones.zone_ms(bw, pcie_bw) if zones else None,
                     step_bytes=asdict(zones) if zones else None, context_reduced=context < want)
            rows.append(r)
            print(r, flush=True)
    table(rows, ["batch", "context", "cuda_graphs", "prefill_s", "setup_s", "step_ms", "replay_ms", "host_ms",
                 "floor_ms", "floor_frac", "tokens_per_s", "pcie_gb_per_s", "cache_hit_ratio",
                 "cache_row_hit_ratio"])
    write_result(a.name or f"decode_{a.attention}", {
        "model": a.model, "attention": a.attention, "offload": a.offload, "synthesized_kv": a.synthesize,
        "prompts": "stdlib text" if a.text else ("synthesized KV" if a.synthesize else "random ids"),
        "cache_fraction": a.cache_fraction if a.offload else None,
        "cache_slot_rows": a.cache_slot_rows if a.offload else None, "warmup_steps": a.warmup,
        "dtype": a.dtype, "hbm_bytes_per_s": bw, "pcie_bytes_per_s": pcie_bw,
        "weight_bytes": weight_bytes, "kv_bytes_per_token": engine.bytes_per_token, "load_s": load_s,
        "kv_capacity_bytes": capacity, "rows": rows})


if __name__ == "__main__":
    main()
