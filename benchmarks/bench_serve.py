"""Load test of the HTTP server: concurrent streaming completions, time to first token, decode
rate, end-to-end throughput, and how many requests the cluster turned away (429) or refused (400).

  python benchmarks/bench_serve.py                       # starts deployments/tiny.yaml locally
  python benchmarks/bench_serve.py --url http://host:8000 --prompt-tokens 32000 --max-tokens 256

Trace mode (`--trace`, see serve_trace.py): one fixed arrival trace replayed into the engine in
process and over HTTP (a server started here from the same arguments, or `--url`), with the same
engine config (`deployments/app.py`'s `plan_replica` of the same args); prints both, aggregate
tok/s, TTFT p50/p99, ITL p50/p99 (and p99 of the gaps while another request waited for its first
token), and the HTTP / in-process ratio:

  python benchmarks/bench_serve.py --trace --model tiny --device cpu --streams 4 --prompt-tokens 2000 \
      --max-tokens 64 --in-process-only
  python benchmarks/bench_serve.py --trace --model random:llama3-8b --attention wave --device cuda \
      --max-batch 8 --max-model-len 40000 --warmup-tokens 2048 32000 --prompt-tokens 32000 \
      --max-tokens 512 --streams 8 --repeat 2

Prints a table and writes JSON to benchmarks/results/ with the command line, versions and device.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS  # noqa: E402


async def one(client: httpx.AsyncClient, body: dict) -> dict:
    t0 = time.perf_counter()
    first, n, status, replica = None, 0, None, None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        status, replica = r.status_code, r.headers.get("x-retroinfer-replica")
        if status != 200:
            await r.aread()
            return {"status": status, "latency_s": time.perf_counter() - t0}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["text"]:
                first = first or time.perf_counter()
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return {"status": status, "replica": replica, "ttft_s": (first or end) - t0, "latency_s": end - t0,
            "tokens": n, "decode_tok_s": (n - 1) / (end - first) if first and n > 1 and end > first else None}


async def run(url: str, a) -> list[dict]:
    prompt = [65 + i % 26 for i in range(a.prompt_tokens)] if a.token_ids else "x" * a.prompt_tokens
    body = {"prompt": prompt, "max_tokens": a.max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    import httpx   # here: the GPU machines run the in-process trace without it
    sem = asyncio.Semaphore(a.concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=None) as client:
        async def guarded():
            async with sem:
                return await one(client, body)
        return await asyncio.gather(*[guarded() for _ in range(a.requests)])


def summarize(results: list[dict], wall_s: float) -> dict:
    ok = [r for r in results if r["status"] == 200]
    pct = (lambda xs, q: statistics.quantiles(xs, n=100)[q - 1] if len(xs) > 1 else (xs[0] if xs else None))
    ttft = [r["ttft_s"] for r in ok]
    dec = [r["decode_tok_s"] for r in ok if r["decode_tok_s"]]
    return {"requests": len(results), "ok": len(ok), "rejected_429": sum(r["status"] == 429 for r in results),
            "refused_400": sum(r["status"] == 400 for r in results), "wall_s": wall_s,
            "output_tok_s": sum(r["tokens"] for r in ok) / wall_s,
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
            "decode_tok_s_per_request_p50": pct(dec, 50),
            "replicas": sorted({r["replica"] for r in ok if r.get("replica")})}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running server; default: start deployments/<--config> here")
    p.add_argument("--config", help="a deployments/ YAML (default tiny.yaml; --trace: the app's defaults)")
    p.add_argument("--replicas", type=int, help="override num_replicas when starting locally")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--token-ids", action="store_true", help="send the prompt as token ids (exact length)")
    p.add_argument("--warmup", type=int, default=0,
                   help="requests sent one by one before timing (the first compiles kernels, captures graphs)")
    p.add_argument("--name", default="serve", help="result file name prefix")
    p.add_argument("--out", type=Path, default=RESULTS)
    t = p.add_argument_group("trace mode")
    t.add_argument("--trace", action="store_true", help="replay one arrival trace in process and over HTTP")
    t.add_argument("--streams", type=int, default=8, help="requests in the trace")
    t.add_argument("--gap-s", type=float, default=0.0, help="seconds between arrivals")
    t.add_argument("--rate", type=float, help="Poisson arrivals per second instead (fixed seed)")
    t.add_argument("--trace-file", type=Path, help='JSON [{"arrival_s", "prompt_tokens", "max_tokens"}, ...]')
    t.add_argument("--repeat", type=int, default=1, help="replays of the trace per mode (the first after warm-up)")
    t.add_argument("--in-process-only", action="store_true")
    t.add_argument("--http-only", action="store_true")
    t.add_argument("--plot", action="store_true", help="per-stream ITL over time, a PNG beside the JSON")
    for flag, kind in (("model", str), ("attention", str), ("device", str), ("dtype", str), ("max-batch", int),
                       ("max-model-len", int), ("kv-pool-gb", float), ("gpu-kv-gb", float), ("prefill-chunk", int),
                       ("prefill-slice-s", float), ("gpus-per-replica", int)):
        t.add_argument(f"--{flag}", type=kind, help="engine / app argument (deployments/app.py AppArgs)")
    t.add_argument("--prefill-budget", help="prefill_budget_tokens: tokens per step, or 'none'")
    t.add_argument("--offload", action=argparse.BooleanOptionalAction, default=None)
    t.add_argument("--warmup-tokens", type=int, nargs="*", help="warm-up request lengths (both modes)")
    a = p.parse_args()
    if a.trace:
        from serve_trace import trace_main
        return trace_main(a)
    a.config = a.config or "tiny.yaml"

    url, started = a.url, False
    if url is None:
        import ray
        import yaml
        from ray import serve
        from retroinfer.deployments.app import build_app
        cfg = yaml.safe_load((ROOT / "deployments" / a.config).read_text())["applications"][0]["args"]
        if a.replicas:
            cfg["num_replicas"] = a.replicas
        ray.init(include_dashboard=False, logging_level="error", log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": 8000})
        serve.run(build_app(cfg), blocking=False, name="retroinfer", route_prefix="/")
        url, started = "http://127.0.0.1:8000", True
    try:
        warm = []
        if a.warmup:
            warm = asyncio.run(run(url, argparse.Namespace(**vars(a) | {"requests": a.warmup, "concurrency": 1})))
        t0 = time.perf_counter()
        results = asyncio.run(run(url, a))
        s = summarize(results, time.perf_counter() - t0)
    finally:
        if started:
            from ray import serve
            serve.shutdown()
    print(f"{'requests':>8} {'ok':>4} {'429':>4} {'400':>4} {'wall s':>7} {'out tok/s':>9} "
          f"{'TTFT p50':>9} {'TTFT p99':>9} {'dec tok/s p50':>13}")
    f = (lambda x: "-" if x is None else f"{x:.3f}")
    print(f"{s['requests']:>8} {s['ok']:>4} {s['rejected_429']:>4} {s['refused_400']:>4} {s['wall_s']:>7.2f} "
          f"{s['output_tok_s']:>9.1f} {f(s['ttft_p50_s']):>9} {f(s['ttft_p99_s']):>9} "
          f"{f(s['decode_tok_s_per_request_p50']):>13}")
    import ray
    import torch
    meta = {"command": " ".join(sys.argv), "url": url, "python": platform.python_version(), "ray": ray.__version__,
            "torch": torch.__version__, "host": platform.node(), "cpu": platform.processor() or platform.machine(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "config": a.config if started else None, "params": vars(a) | {"out": str(a.out)}}
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"{a.name}_{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"meta": meta, "summary": s, "requests": results, "warmup": warm}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
