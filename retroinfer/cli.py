"""`retroinfer generate | cluster ...`"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from .config import ConfigError, EngineConfig, WaveConfig, fraction_or_auto
from .models.catalog import resolve_model


_WAVE_ARG_TYPES = {"float": float, "float | str": fraction_or_auto}   # WaveConfig's annotations (strings)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="Hugging Face model directory, or 'tiny' (default)")
    p.add_argument("--attention", default="full", choices=["full", "wave"])
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--devices", help="comma-separated devices to split the layers over (pipeline stages)")
    p.add_argument("--max-batch", type=int)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--kv-budget-gb", type=float, help="KV cache budget per device")
    p.add_argument("--prefill-chunk", type=int)
    p.add_argument("--offload", action="store_true", default=None,
                   help="wave: keep the indexed KV in pinned host memory (the wave buffer)")
    p.add_argument("--host-kv-gb", type=float, help="offload: host KV pool per stage")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false", default=None,
                   help="run the decode step eagerly")
    g = p.add_argument_group("wave index (attention=wave)")
    for f in dataclasses.fields(WaveConfig):
        g.add_argument("--wave-" + f.name.replace("_", "-"), dest="wave_" + f.name,
                       type=_WAVE_ARG_TYPES.get(f.type, int), help=f"default {f.default}")


def engine_config(a: argparse.Namespace) -> EngineConfig:
    wave = WaveConfig(**{f.name: getattr(a, "wave_" + f.name) for f in dataclasses.fields(WaveConfig)
                         if getattr(a, "wave_" + f.name, None) is not None})
    return EngineConfig().with_overrides(
        model=a.model, attention=a.attention, dtype=a.dtype, device=a.device,
        devices=tuple(a.devices.split(",")) if a.devices else None, max_batch=a.max_batch,
        max_model_len=a.max_model_len, prefill_chunk=a.prefill_chunk, cuda_graphs=a.cuda_graphs,
        kv_budget_bytes=int(a.kv_budget_gb * 2**30) if a.kv_budget_gb else None, wave=wave,
        offload=a.offload, host_kv_budget_bytes=int(a.host_kv_gb * 2**30) if a.host_kv_gb else None)


def _progress_bar(total_tokens: int):
    t0 = time.perf_counter()

    def show(request_id: str, done: int, total: int) -> None:
        w = 30
        filled = w * done // total
        rate = total_tokens * done / total / max(time.perf_counter() - t0, 1e-9)
        sys.stderr.write(f"\rprefill [{'#' * filled}{'.' * (w - filled)}] layer {done}/{total} "
                         f"{time.perf_counter() - t0:6.1f}s {rate:,.0f} tok/s")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()
    return show


def cmd_generate(a: argparse.Namespace) -> int:
    from .engine.llm_engine import LLMEngine
    from .engine.sampling import SamplingParams

    if (a.prompt is None) == (a.prompt_file is None):
        raise ConfigError("give exactly one of --prompt and --prompt-file")
    prompt = a.prompt if a.prompt is not None else _read(a.prompt_file)
    params = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_k=a.top_k,
                            top_p=a.top_p, seed=a.seed, stop=a.stop or [],
                            stop_token_ids=a.stop_token_id or [], ignore_eos=a.ignore_eos)
    cfg = engine_config(a)
    cfg = cfg.with_overrides(model=resolve_model(cfg.model, log=lambda m: print(m, file=sys.stderr)))
    engine = LLMEngine(cfg)
    tok = engine.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}]) if a.chat else tok.encode(prompt)
    engine.validate(ids, params)
    engine.on_prefill_progress = _progress_bar(len(ids))
    t0 = time.perf_counter()
    t_first, n = None, 0
    for out in engine.generate(ids, params):
        if out.error:
            raise ConfigError(out.error)
        if t_first is None:
            t_first = time.perf_counter()
        n += len(out.token_ids)
        sys.stdout.write(out.text)
        sys.stdout.flush()
    t_end = time.perf_counter()
    decode_tps = (n - 1) / (t_end - t_first) if n > 1 else float("nan")
    sys.stdout.write("\n")
    sys.stderr.write(f"prompt {len(ids)} tokens, prefill {t_first - t0:.3f}s; {n} tokens generated, "
                     f"decode {decode_tps:.1f} tok/s ({cfg.attention} attention)\n")
    return 0


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"--prompt-file {path}: {e.strerror}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="retroinfer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text from a prompt")
    add_engine_args(g)
    g.add_argument("--prompt")
    g.add_argument("--prompt-file")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--stop-token-id", type=int, action="append")
    g.add_argument("--ignore-eos", action="store_true")
    g.set_defaults(func=cmd_generate)
    try:
        from .cluster.cli import add_cluster_parser
    except ImportError:
        pass
    else:
        add_cluster_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ValueError) as e:
        sys.stderr.write(f"retroinfer: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
