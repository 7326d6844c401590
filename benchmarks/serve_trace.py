"""Trace replay for `bench_serve.py --trace`: one fixed arrival trace (requests with an arrival
time, a prompt length and an output length) replayed into an engine in process and over HTTP
against a server, each token timestamped as it arrives, so that time to first token (TTFT) and
inter-token latency (ITL) percentiles are real ones.

In process, one thread adds each request at its arrival time and runs `engine.step()`; a token's
time is when the step that made it returns. Over HTTP, each request is a streamed completion sent
at its arrival time (a 429 is retried after its Retry-After, TTFT still counted from the arrival);
a token's time is when its SSE event arrives (an event carries one engine step's text; a token
whose text is held back, an unfinished UTF-8 sequence, has no event of its own).
"""
from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Req:
    rid: str
    arrival_s: float
    prompt_tokens: int
    max_tokens: int


def make_trace(n: int, prompt_tokens: int, max_tokens: int, gap_s: float = 0.0, rate: float | None = None,
               seed: int = 0) -> list[Req]:
    """n requests; arrivals every `gap_s` seconds, or Poisson at `rate` per second (fixed seed)."""
    rng, t, out = random.Random(seed), 0.0, []
    for i in range(n):
        out.append(Req(f"r{i}", round(t, 6), prompt_tokens, max_tokens))
        t += rng.expovariate(rate) if rate else gap_s
    return out


def load_trace(path: Path) -> list[Req]:
    """A JSON list of {"arrival_s", "prompt_tokens", "max_tokens"} (and optionally "rid")."""
    rows = json.loads(Path(path).read_text())
    return [Req(r.get("rid", f"r{i}"), float(r["arrival_s"]), int(r["prompt_tokens"]), int(r["max_tokens"]))
            for i, r in enumerate(rows)]


def prompt_ids(req: Req, index: int) -> list[int]:
    """Letters (valid ids in every vocabulary), different for every request."""
    return [65 + (i + 7 * index) % 26 for i in range(req.prompt_tokens)]


def _params(req: Req) -> dict:
    return {"max_tokens": req.max_tokens, "temperature": 0.0, "ignore_eos": True}


# -- in process -------------------------------------------------------------------------------------
def warm_up(engine, lengths: list[int]) -> list:
    """The replica's warm-up (`retroinfer.engine.warmup.warm_up`, which `cluster/serve/replica.py` runs
    before it says healthy): max_batch requests of each length, every decode batch size, the mixed
    step. Returns its reports."""
    from retroinfer.engine.warmup import warm_up as engine_warm_up
    return engine_warm_up(engine, lengths)


def replay_engine(engine, trace: list[Req]) -> list[dict]:
    """Replays `trace` into `engine` (any object with add_request / step / has_work)."""
    from retroinfer.engine.sampling import SamplingParams
    res = {r.rid: {"rid": r.rid, "arrival_s": r.arrival_s, "status": 200, "token_s": [], "error": None}
           for r in trace}
    pending = sorted(enumerate(trace), key=lambda x: x[1].arrival_s)
    t0 = time.perf_counter()
    while pending or engine.has_work():
        now = time.perf_counter() - t0
        while pending and pending[0][1].arrival_s <= now:
            i, r = pending.pop(0)
            engine.add_request(r.rid, prompt_ids(r, i), SamplingParams(**_params(r)))
        if not engine.has_work():
            time.sleep(max(0.0, min(0.01, pending[0][1].arrival_s - now)))
            continue
        outs = engine.step()
        ts = time.perf_counter() - t0
        for o in outs:
            rec = res.get(o.request_id)
            if rec is None:
                continue
            rec["token_s"] += [ts] * len(o.token_ids)
            if o.error:
                rec["error"], rec["status"] = o.error, 500
    return list(res.values())


# -- over HTTP -------------------------------------------------------------------------------------
async def _one(client, req: Req, index: int, t0: float, model: str | None) -> dict:
    rec = {"rid": req.rid, "arrival_s": req.arrival_s, "status": None, "token_s": [], "error": None,
           "retries_429": 0}
    await asyncio.sleep(max(0.0, req.arrival_s - (time.perf_counter() - t0)))
    body = {"prompt": prompt_ids(req, index), "stream": True, "stream_options": {"include_usage": True},
            **_params(req), **({"model": model} if model else {})}
    while True:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            rec["status"] = r.status_code
            if r.status_code == 429:
                await r.aread()
                rec["retries_429"] += 1
                await asyncio.sleep(float(r.headers.get("retry-after", 1)))
                continue
            if r.status_code != 200:
                rec["error"] = (await r.aread()).decode(errors="replace")[:300]
                return rec
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    rec["error"], rec["status"] = chunk["error"].get("message"), 500
                elif chunk.get("choices") and chunk["choices"][0]["text"]:
                    rec["token_s"].append(time.perf_counter() - t0)
                if chunk.get("usage"):
                    rec["completion_tokens"] = chunk["usage"]["completion_tokens"]
            return rec


async def replay_http(url: str, trace: list[Req], model: str | None = None) -> list[dict]:
    import httpx
    async with httpx.AsyncClient(base_url=url, timeout=None) as client:
        t0 = time.perf_counter()
        return await asyncio.gather(*[_one(client, r, i, t0, model) for i, r in enumerate(trace)])


# -- the figures --------------------------------------------------------------------------------------
def pct(xs: list[float], q: float) -> float | None:
    """The q-th percentile, linear between the closest ranks (as numpy's default)."""
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (k - lo)


def summarize(results: list[dict]) -> dict:
    ok = [r for r in results if r["status"] == 200 and r["token_s"]]
    ttft = [r["token_s"][0] - r["arrival_s"] for r in ok]
    itl, during = [], []
    prefill = [(r["arrival_s"], r["token_s"][0]) for r in ok]     # each request's wait for its first token
    for r in ok:
        mine = (r["arrival_s"], r["token_s"][0])
        for a, b in zip(r["token_s"], r["token_s"][1:]):
            itl.append(b - a)
            if any(s < b and e > a for s, e in prefill if (s, e) != mine):
                during.append(b - a)     # another request was waiting for its first token meanwhile
    start = min((r["arrival_s"] for r in results), default=0.0)
    end = max((r["token_s"][-1] for r in ok), default=start)
    tokens = sum(r.get("completion_tokens", len(r["token_s"])) for r in ok)
    wall = end - start
    return {"requests": len(results), "ok": len(ok), "tokens": tokens, "wall_s": wall,
            "output_tok_s": tokens / wall if wall > 0 else None,
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
            "itl_p50_ms": _ms(pct(itl, 50)), "itl_p99_ms": _ms(pct(itl, 99)),
            "itl_during_prefill_p99_ms": _ms(pct(during, 99)), "itl_max_ms": _ms(max(itl, default=None)),
            "retries_429": sum(r.get("retries_429", 0) for r in results)}


def _ms(x: float | None) -> float | None:
    return None if x is None else 1e3 * x


COLUMNS = ["mode", "ok", "tokens", "wall_s", "output_tok_s", "ttft_p50_s", "ttft_p99_s", "itl_p50_ms",
           "itl_p99_ms", "itl_during_prefill_p99_ms"]


def plot_itl(runs: dict[str, list[dict]], path: Path) -> Path | None:
    """Per-stream ITL over time, one panel per run (matplotlib, if installed)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 3 * len(runs)), squeeze=False, sharex=True)
    for ax, (name, results) in zip(axes[:, 0], runs.items()):
        for r in results:
            ts = r["token_s"]
            ax.plot(ts[1:], [1e3 * (b - a) for a, b in zip(ts, ts[1:])], lw=0.8, label=r["rid"])
        ax.set_title(name)
        ax.set_ylabel("ITL (ms)")
    axes[-1, 0].set_xlabel("time since the first arrival (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def trace_rows(trace: list[Req]) -> list[dict]:
    return [asdict(r) for r in trace]


# -- bench_serve.py --trace ----------------------------------------------------------------------------
def app_args(a) -> dict:
    """The app's arguments: the YAML's (`--config`), then the command line's."""
    args: dict = {}
    if a.config:
        import yaml
        path = Path(a.config) if Path(a.config).is_file() else ROOT / "deployments" / a.config
        args = dict(yaml.safe_load(path.read_text())["applications"][0]["args"])
    over = {k: getattr(a, k) for k in ("model", "attention", "device", "dtype", "max_batch", "max_model_len",
                                       "kv_pool_gb", "gpu_kv_gb", "prefill_chunk", "prefill_slice_s",
                                       "gpus_per_replica", "offload", "warmup_tokens")}
    if a.prefill_budget is not None:
        over["prefill_budget_tokens"] = None if a.prefill_budget.lower() == "none" else int(a.prefill_budget)
    args.update({k: v for k, v in over.items() if v is not None})
    return args


def engine_from_args(args: dict):
    """The engine a replica of these app arguments runs (`plan_replica`), in this process."""
    import torch

    from retroinfer.deployments.app import AppArgs, plan_replica
    from retroinfer.engine.llm_engine import LLMEngine
    app = AppArgs.model_validate(args)
    cfg, opts, _ = plan_replica(app, {"GPU": torch.cuda.device_count()} if torch.cuda.is_available() else {})
    if opts["executor"] != "local":
        raise SystemExit("in process, the trace runs the local executor only (gpus_per_replica 1, or executor local)")
    if opts.get("num_threads"):
        torch.set_num_threads(opts["num_threads"])
    return LLMEngine(cfg), app, cfg


def run_in_process(args: dict, trace: list[Req], repeat: int) -> tuple[dict, dict]:
    import gc

    import torch
    engine, app, cfg = engine_from_args(args)
    t0 = time.perf_counter()
    reports = warm_up(engine, list(app.warmup_tokens))
    info = {"engine_config": asdict(cfg), "warmup_s": time.perf_counter() - t0,
            "warmup": [{"tokens": r.tokens, "requests": r.requests, "batch_sizes": r.batch_sizes,
                        "buckets": r.buckets, "mixed_steps": r.mixed_steps, "graphs": len(r.graphs),
                        "seconds": round(r.seconds, 3), "error": r.error} for r in reports]}
    runs = {f"in_process{'' if i == 0 else f'#{i + 1}'}": replay_engine(engine, trace) for i in range(repeat)}
    info["capacity_bytes"] = engine.stats().get("capacity_bytes")
    del engine, reports, app
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()      # before a server on the same GPU allocates its own
        # what this process still holds shrinks the server's KV budget (it sizes from free memory)
        info["cuda_reserved_after_bytes"] = torch.cuda.memory_reserved()
    return runs, info


def run_in_child(args: dict, trace: list[Req], repeat: int) -> tuple[dict, dict]:
    """`run_in_process` in a spawned process. A process that has run an engine can keep memory
    that a server started next would size its KV from (torch's caching allocators keep pinned host
    blocks, the offload pool, and CUDA blocks after the engine is gone); in a child, all of it is
    returned before the server starts, so both modes size their KV from the same machine."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(run_in_process, args, trace, repeat).result()


def _wait_healthy(url: str, timeout_s: float = 900) -> float:
    import httpx
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url}/health did not answer 200 within {timeout_s} s")


def run_http(args: dict, trace: list[Req], a) -> tuple[dict, dict]:
    url, started = a.url, False
    if url is None:      # a server of the same app arguments, here
        import ray
        from ray import serve

        from retroinfer.deployments.app import build_app
        ray.init(include_dashboard=False, logging_level="error", log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": 8000})
        serve.run(build_app(args), blocking=False, name="retroinfer", route_prefix="/")
        url, started = "http://127.0.0.1:8000", True
    try:
        info = {"url": url, "ready_s": _wait_healthy(url)}
        try:      # the replicas' KV capacity: with the in-process runs' it explains admission differences
            import httpx
            info["cluster"] = httpx.get(url + "/v1/cluster", timeout=10).json()
        except Exception as e:   # noqa: BLE001 - informational only
            info["cluster"] = {"error": repr(e)}
        runs = {f"http{'' if i == 0 else f'#{i + 1}'}": asyncio.run(replay_http(url, trace)) for i in range(a.repeat)}
    finally:
        if started:
            from ray import serve
            serve.shutdown()
    return runs, info


def trace_main(a) -> int:
    import sys

    from common import environment, table
    args = app_args(a)
    trace = load_trace(a.trace_file) if a.trace_file else make_trace(a.streams, a.prompt_tokens, a.max_tokens,
                                                                       a.gap_s, a.rate)
    runs, info = {}, {}
    if not a.http_only:
        if a.in_process_only:
            r, info["in_process"] = run_in_process(args, trace, a.repeat)
        else:      # in a child process, so the server then sizes its KV from the same free memory
            r, info["in_process"] = run_in_child(args, trace, a.repeat)
        runs.update(r)
    if not a.in_process_only:
        try:
            r, info["http"] = run_http(args, trace, a)
            runs.update(r)
        except Exception as e:          # the in-process runs are still worth writing
            info["http"] = {"error": f"{type(e).__name__}: {e}"}
            print(f"http mode failed: {info['http']['error']}", file=sys.stderr)
    sums = {k: summarize(v) for k, v in runs.items()}
    table([{"mode": k, **v} for k, v in sums.items()], COLUMNS)
    ratios = {}
    for k in sums:
        if k.startswith("http") and k.replace("http", "in_process") in sums:
            h, e = sums[k], sums[k.replace("http", "in_process")]
            ratios[k] = {m: h[m] / e[m] if h[m] and e[m] else None
                         for m in ("output_tok_s", "ttft_p50_s", "ttft_p99_s", "itl_p50_ms", "itl_p99_ms")}
            print(f"{k} / in process: " + ", ".join(f"{m} {v:.3f}" for m, v in ratios[k].items() if v))
    env = environment()
    try:
        import ray
        env["ray"] = ray.__version__
    except ImportError:
        env["ray"] = None
    name = a.name if a.name != "serve" else f"serve_trace_{time.strftime('%Y%m%d-%H%M%S')}"
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"{name}_{env['gpu'].replace(' ', '-').replace('/', '-')}.json"
    data = {"env": env, "command": " ".join(sys.argv), "app_args": args, "info": info,
            "trace": trace_rows(trace), "summary": sums, "ratio_http_to_in_process": ratios, "requests": runs}
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    print(f"wrote {path}")
    if a.plot and plot_itl(runs, path.with_suffix(".png")):
        print(f"wrote {path.with_suffix('.png')}")
    return 0
