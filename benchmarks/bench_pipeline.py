"""Pipeline-parallel decode (Ray stage actors, decode as one compiled graph) against the same model
in process, same engine config, same prompts, same run.

For each batch: B prompts of `--context` random ids are prefilled, `--warmup` decode steps run, then
`--steps` engine steps are timed one by one (wall clock; the engine syncs on every step's tokens). The
in-process engine runs first and is torn down before the stages start, so both see the same GPU
memory. Reported per batch: step time (median, mean), tokens/s, pipeline/in-process ratio, the
pipeline's extra time per step (its host and transport cost: both run the same kernels), and
whether the greedy tokens of every sequence are equal.

  python benchmarks/bench_pipeline.py --model random:llama3-8b --attention wave --stages 2 \\
      --context 8192 --batches 1,8 --kv-budget-gb 20
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, write_result  # noqa: E402

from retroinfer.config import EngineConfig  # noqa: E402
from retroinfer.engine.llm_engine import LLMEngine, load_model_config  # noqa: E402
from retroinfer.engine.sampling import SamplingParams  # noqa: E402
from retroinfer.models.catalog import resolve_model  # noqa: E402


def run_batch(engine: LLMEngine, batch: int, context: int, warmup: int, steps: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    vocab = engine.model_cfg.vocab_size
    params = SamplingParams(max_tokens=warmup + steps + 8, temperature=0, ignore_eos=True)
    tokens: dict[str, list[int]] = {}
    for i in range(batch):
        rid = f"b{batch}-{i}"
        tokens[rid] = []
        engine.add_request(rid, torch.randint(1, vocab, (context,), generator=g).tolist(), params)

    def step() -> None:
        for out in engine.step():
            if out.error:
                raise RuntimeError(f"{out.request_id}: {out.error}")
            tokens[out.request_id] += out.token_ids

    t0 = time.perf_counter()
    while len(engine.running) < batch:
        if not engine.has_work():
            raise RuntimeError(f"the requests ended before all {batch} were decoding")
        step()
    setup_s = time.perf_counter() - t0
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    for rid in tokens:
        engine.abort(rid)
    while engine.has_work():
        step()
    med = statistics.median(times)
    return {"batch": batch, "context": context, "setup_s": setup_s, "step_ms": med * 1e3,
            "mean_step_ms": statistics.fmean(times) * 1e3, "tokens_per_s": batch / med, "tokens": tokens}


def channel_probe(num_stages: int, hidden: int, batch: int, iters: int = 300) -> dict:
    """Round trip of a compiled graph of `num_stages` no-op actors (the driver's step input through
    every stage and back), its hidden states [batch, hidden] bf16 as torch tensors and as the
    pipeline's wire format (`to_wire`): the transport's own cost per decode step, ms (median)."""
    import ray
    from ray.dag import InputNode

    from retroinfer.cluster.serve.pipeline import to_wire

    @ray.remote(num_cpus=0)
    class Hop:
        def step(self, x):
            return x

    actors = [Hop.remote() for _ in range(num_stages)]
    with InputNode() as inp:
        x = inp
        for act in actors:
            x = act.step.bind(x)
    graph = x.experimental_compile()
    h, pos = torch.zeros(batch, hidden, dtype=torch.bfloat16), torch.arange(batch)
    out = {}
    for name, payload in (("torch_ms", (list(range(batch)), h, pos, [])),
                          ("wire_ms", (list(range(batch)), to_wire(h), to_wire(pos), []))):
        for _ in range(20):
            ray.get(graph.execute(payload))
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            ray.get(graph.execute(payload))
            times.append(time.perf_counter() - t)
        out[name] = statistics.median(times) * 1e3
    graph.teardown()
    for act in actors:
        ray.kill(act)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:llama3-8b")
    ap.add_argument("--attention", default="wave")
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--gpus", type=float, default=None,
                    help="GPUs per stage (default: the visible GPUs shared evenly; 0: CPU stages)")
    ap.add_argument("--micro-batches", type=int, default=None, help="default: one per distinct device")
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--kv-budget-gb", type=float, default=None, help="per stage (and the in-process engine)")
    ap.add_argument("--name", default="pipeline")
    a = ap.parse_args()
    import ray

    from retroinfer.cluster.serve.pipeline import RayPipelineExecutor

    cuda = torch.cuda.is_available()
    gpus = a.gpus if a.gpus is not None else (torch.cuda.device_count() / a.stages if cuda else 0)
    batches = [int(b) for b in a.batches.split(",")]
    cfg = EngineConfig(model=resolve_model(a.model), attention=a.attention, device="cuda" if gpus else "cpu",
                       max_batch=max(batches), max_model_len=a.context + a.warmup + a.steps + 64,
                       prefill_budget_tokens=None,        # a step prefills every waiting prompt whole
                       kv_budget_bytes=int(a.kv_budget_gb * 2**30) if a.kv_budget_gb else None)
    mc = load_model_config(cfg.model)

    def measure(engine: LLMEngine) -> list[dict]:
        run_batch(engine, 1, min(a.context, 2048), 2, 4, seed=99)       # compiles, graph captures
        return [run_batch(engine, b, a.context, a.warmup, a.steps, seed=b) for b in batches]

    t0 = time.perf_counter()
    local = LLMEngine(cfg)
    local_load_s = time.perf_counter() - t0
    local_rows = measure(local)
    del local
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()

    ray.init(num_cpus=max(2, a.stages + 1), num_gpus=torch.cuda.device_count() if gpus else 0,
             include_dashboard=False, logging_level="error")
    t0 = time.perf_counter()
    probe = channel_probe(a.stages, mc.hidden_size, max(batches))
    print(f"compiled-graph round trip, {a.stages} no-op stages, hidden [{max(batches)}, {mc.hidden_size}]: "
          f"{probe['torch_ms']:.3f} ms as torch tensors, {probe['wire_ms']:.3f} ms as the wire format", flush=True)
    ex = RayPipelineExecutor(cfg, mc, a.stages, num_cpus=1, num_gpus=gpus, placement_group=None,
                             micro_batches=a.micro_batches)
    pipe = LLMEngine(cfg, executor=ex)
    pipe_load_s = time.perf_counter() - t0
    pipe_rows = measure(pipe)
    stage_info, micro = ex.stage_info, ex.micro_batches
    ex.shutdown()
    ray.shutdown()

    rows = []
    for lo, pp in zip(local_rows, pipe_rows):
        same = lo.pop("tokens") == pp.pop("tokens")
        rows.append({"batch": lo["batch"], "context": lo["context"], "local_step_ms": lo["step_ms"],
                     "pipeline_step_ms": pp["step_ms"], "ratio": lo["step_ms"] / pp["step_ms"],
                     "pipeline_extra_ms": pp["step_ms"] - lo["step_ms"],
                     "local_tokens_per_s": lo["tokens_per_s"], "pipeline_tokens_per_s": pp["tokens_per_s"],
                     "tokens_equal": same, "local": lo, "pipeline": pp})
    table(rows, ["batch", "context", "local_step_ms", "pipeline_step_ms", "ratio", "pipeline_extra_ms",
                 "local_tokens_per_s", "pipeline_tokens_per_s", "tokens_equal"])
    write_result(a.name, {"model": a.model, "attention": a.attention, "stages": a.stages, "gpus_per_stage": gpus,
                          "micro_batches": micro, "channel_probe": probe, "stage_info": stage_info,
                          "local_load_s": local_load_s, "pipeline_load_s": pipe_load_s, "warmup_steps": a.warmup, "steps": a.steps, "rows": rows})


if __name__ == "__main__":
    main()
