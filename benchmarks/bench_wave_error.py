"""Wave attention's error on a real model's own keys, values and queries, layer by layer.

    python benchmarks/bench_wave_error.py --model qwen2.5-coder-0.5b --length 4096 \
        --variant est0:estimation_frac=0 --variant win256:window=256

A RULER-style prompt (`bench_ruler.py`'s generator, `--task`) is prefilled with full attention;
in every layer the prompt's K/V and the last prompt token's query (the query that produced the
first answer token) are kept. Each wave configuration then indexes that layer's K/V of the
tokens before it (a one-layer wave backend, the engine's own code) and decodes that query; the
output is compared with exact attention over the same keys: ||out - exact|| / ||exact|| per
query head, averaged. Where `bench_ruler.py` says whether answers change, this says where
(which layers) and by how much each part of the wave index moves the attention itself.
CPU-friendly: fp32, one prefill per sample (a 4K prompt of the 0.5B model: ~20 s on 2 cores).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_ruler as br  # noqa: E402
from common import environment, table, write_result  # noqa: E402

import retroinfer.attention.prefill as prefill  # noqa: E402
from retroinfer.attention import make_backend  # noqa: E402
from retroinfer.config import EngineConfig, WaveConfig  # noqa: E402
from retroinfer.engine.llm_engine import LLMEngine, load_model_config  # noqa: E402
from retroinfer.engine.sampling import SamplingParams  # noqa: E402
from retroinfer.engine.tokenizer import load_tokenizer  # noqa: E402


def capture_layers(engine: LLMEngine, ids: list[int]) -> list[tuple]:
    """(q of the last prompt token [Hq, D], K [T, Hkv, D], V, exact output [Hq, D]) per layer."""
    out, depth, inner = [], [0], prefill.causal_attention

    def hook(q, k, v, q_start):
        depth[0] += 1          # causal_attention recurses over row blocks: keep the outer call
        try:
            o = inner(q, k, v, q_start)
        finally:
            depth[0] -= 1
        if depth[0] == 0 and q_start + q.shape[0] == len(ids):
            out.append((q[-1].clone(), k.clone(), v.clone(), o[-1].clone()))
        return o

    prefill.causal_attention = hook
    try:
        list(engine.generate(ids, SamplingParams(max_tokens=1, temperature=0)))
    finally:
        prefill.causal_attention = inner
    return out


def wave_errors(mcfg, layers: list[tuple], wave: WaveConfig) -> list[float]:
    errs = []
    for q, k, v, exact in layers:
        b = make_backend("wave", mcfg, range(1), "cpu", torch.float32, 2 << 30, wave, 2)
        b.reserve("s", k.shape[0] + 1)
        b.write_prefill(0, "s", k[:-1], v[:-1], 0)
        got = b.decode(0, b.plan_decode(["s"]), q[None], k[-1:], v[-1:])[0]
        errs.append(((got - exact).norm(dim=-1) / exact.norm(dim=-1).clamp_min(1e-12)).mean().item())
    return errs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a catalog name, a .gguf file or a Hugging Face directory")
    ap.add_argument("--length", type=int, default=4096, help="prompt + answer tokens (RULER's convention)")
    ap.add_argument("--task", default="niah_multivalue")
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:key=value,...",
                    help="a wave configuration besides the default (WaveConfig fields), repeatable")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--name", default=None, help="results file stem (default wave_error_<model>)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    configs = {"wave": WaveConfig(), **dict(br.parse_wave_variant(spec) for spec in a.variant)}
    model = br.resolve(a.model, print)
    tok, mcfg = load_tokenizer(model), load_model_config(model)
    samples = br.make_samples(tok, [a.task], [a.length], a.samples, a.seed, "essay", None, False, print)
    engine = LLMEngine(EngineConfig(model=model, attention="full", device="cpu", dtype="float32", max_batch=1,
                                    prefill_budget_tokens=None))
    per: dict[str, list[list[float]]] = {n: [] for n in configs}
    for s in samples:
        t0 = time.perf_counter()
        layers = capture_layers(engine, list(s.prompt_ids))
        print(f"sample {s.index}: {s.prompt_tokens} prompt tokens, {len(layers)} layers, {time.perf_counter() - t0:.1f} s",
              flush=True)
        for name, w in configs.items():
            per[name].append(wave_errors(mcfg, layers, w))
    rows = []
    for name, runs in per.items():
        by_layer = [sum(r[i] for r in runs) / len(runs) for i in range(len(runs[0]))]
        rows.append({"system": name, "mean_rel_err": sum(by_layer) / len(by_layer), "max_layer_err": max(by_layer),
                     "worst_layer": by_layer.index(max(by_layer)), "by_layer": [round(e, 4) for e in by_layer]})
    table([{k: v for k, v in r.items() if k != "by_layer"} for r in rows],
          ["system", "mean_rel_err", "max_layer_err", "worst_layer"])
    if not a.no_write:
        write_result(a.name or "wave_error_" + br._display(a.model), {
            "model": a.model, "model_md5": br.model_files(a.model, model), "task": a.task, "length": a.length,
            "prompt_tokens": [s.prompt_tokens for s in samples], "seed": a.seed,
            "configs": {n: vars(w) for n, w in configs.items()}, "rows": rows, "env": environment()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
