"""Frozen configuration: the model (from a Hugging Face config.json), the wave index, the engine."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
          "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}


class ConfigError(ValueError):
    """Bad user input in a configuration: the message is meant for the user, one line."""


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; choose one of {sorted(set(DTYPES))}")
    return DTYPES[name]


@dataclass(frozen=True)
class ModelConfig:
    """The subset of a Llama / Qwen2 config.json that the forward pass needs."""
    arch: str                      # "llama" or "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    attention_bias: bool = False   # Qwen2: bias on q, k, v projections
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: str = "bfloat16"        # the checkpoint's torch_dtype

    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        model_type = d.get("model_type", "")
        if model_type in ("llama", "mistral"):
            arch, bias = "llama", bool(d.get("attention_bias", False))
        elif model_type == "qwen2":
            arch, bias = "qwen2", True
        else:
            raise ConfigError(f"unsupported model_type {model_type!r}: RetroInfer runs llama and qwen2")
        try:
            heads = d["num_attention_heads"]
            eos = d.get("eos_token_id")
            eos = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
            return cls(
                arch=arch, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
                intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"],
                num_heads=heads, num_kv_heads=d.get("num_key_value_heads") or heads,
                head_dim=d.get("head_dim") or d["hidden_size"] // heads,
                rms_norm_eps=d.get("rms_norm_eps", 1e-6),
                rope_theta=d.get("rope_theta") or (d.get("rope_parameters") or {}).get("rope_theta", 10000.0),
                rope_scaling=_rope_scaling(d),
                max_position_embeddings=d.get("max_position_embeddings", 8192),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                attention_bias=bias, bos_token_id=d.get("bos_token_id"), eos_token_ids=eos,
                dtype=str(d.get("torch_dtype") or d.get("dtype") or "bfloat16"),
            )
        except KeyError as e:
            raise ConfigError(f"config.json lacks required key {e.args[0]!r}") from None

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        p = Path(path) / "config.json"
        if not p.is_file():
            raise ConfigError(f"{path}: no config.json (expected a Hugging Face model directory)")
        try:
            d = json.loads(p.read_text())
            gen = Path(path) / "generation_config.json"
            if gen.is_file():   # official Instruct checkpoints list their turn-end tokens only here
                d["eos_token_id"] = _merge_ids(d.get("eos_token_id"), json.loads(gen.read_text()).get("eos_token_id"))
            return cls.from_hf_dict(d)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p.parent}: malformed JSON ({e.msg} at line {e.lineno})") from None

    def kv_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16, layers: int | None = None) -> int:
        """K and V of one token in `layers` layers (default: every layer of the model)."""
        layers = self.num_layers if layers is None else layers
        return 2 * layers * self.num_kv_heads * self.head_dim * dtype.itemsize

    def weight_bytes(self, dtype: torch.dtype = torch.bfloat16) -> int:
        elem = dtype.itemsize
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        per_layer = attn + 3 * h * i + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return (self.num_layers * per_layer + emb + h) * elem


def _merge_ids(*values) -> list[int]:
    ids: list[int] = []
    for v in values:
        for i in (v if isinstance(v, list) else [v]):
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return ids


def _rope_scaling(d: dict) -> dict | None:
    rs = d.get("rope_scaling") or d.get("rope_parameters")
    if not rs:
        return None
    kind = rs.get("rope_type") or rs.get("type")
    if kind in (None, "default"):
        return None
    return dict(rs, rope_type=kind)


def fraction_or_auto(text: str) -> float | str:
    """A command-line cache fraction: a number, or "auto"."""
    return "auto" if text.strip().lower() == "auto" else float(text)


@dataclass(frozen=True)
class WaveConfig:
    """Wave index parameters; defaults are the paper's, except `estimation_log_bias`."""
    retrieval_frac: float = 0.018      # share of clusters attended exactly
    estimation_frac: float = 0.232     # share of clusters estimated from centroids
    sink: int = 4                      # first tokens always attended exactly
    window: int = 64                   # last tokens always attended exactly
    segment_size: int = 8192           # tokens clustered independently at prefill
    tokens_per_cluster: int = 16
    kmeans_iters: int = 10
    update_every: int = 1024           # decoded tokens that form one new segment
    update_clusters: int = 64          # clusters of that segment
    cache_fraction: float | str = 0.05   # offload: GPU cache of retrieved clusters, share of the host pool;
                                         # "auto": the GPU budget the meta-index leaves (up to 90%)
    cache_slot_rows: int = 32          # rows of a cluster a cache slot holds (its head; the tail stays on host)
    # Added to every estimated cluster's log weight log(size): size * exp(q . mean) is a lower bound of
    # its mass (Jensen: the mean of exp(q . k) over the cluster is at least exp(q . mean k)), and the
    # clusters past the estimation zone are dropped, so the paper's rule (0) underweights the rest of
    # the context. ln 2 (each estimated cluster counts double) lowered wave's attention error on the
    # 0.5B model's own KV from 0.121 to 0.093 (benchmarks/bench_wave_error.py) and raised its RULER
    # mean by 1.3 points on the 1.5B and 0.6 on the 0.5B (same prompts, H200); see the README.
    estimation_log_bias: float = math.log(2)
    # The model's first and last layers attending every token exactly (full attention's paged KV on
    # the GPU, beside the wave index of the others): on the 0.5B model's own KV they carry wave's
    # largest attention errors (layer 0 and the last three, benchmarks/bench_wave_error.py).
    dense_first: int = 0
    dense_last: int = 0

    def __post_init__(self):
        checks = [
            (0 < self.retrieval_frac <= 1, "retrieval_frac must be in (0, 1]"),
            (0 <= self.estimation_frac <= 1, "estimation_frac must be in [0, 1]"),
            (self.retrieval_frac + self.estimation_frac <= 1 + 1e-9,
             "retrieval_frac + estimation_frac must not exceed 1"),
            (self.sink >= 0 and self.window >= 1, "sink must be >= 0 and window >= 1"),
            (self.tokens_per_cluster >= 1, "tokens_per_cluster must be >= 1"),
            (self.segment_size >= self.tokens_per_cluster, "segment_size must be >= tokens_per_cluster"),
            (self.kmeans_iters >= 0, "kmeans_iters must be >= 0"),
            (self.update_every >= 1 and 1 <= self.update_clusters <= self.update_every,
             "update_every must be >= 1 and update_clusters in [1, update_every]"),
            (self.cache_fraction == "auto" or (isinstance(self.cache_fraction, (int, float))
                                               and 0 <= self.cache_fraction < 1),
             "cache_fraction must be in [0, 1) or 'auto'"),
            (self.cache_slot_rows >= 16 and self.cache_slot_rows % 16 == 0,
             "cache_slot_rows must be a positive multiple of 16"),
            (math.isfinite(self.estimation_log_bias), "estimation_log_bias must be a finite number"),
            (self.dense_first >= 0 and self.dense_last >= 0, "dense_first and dense_last must be >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"wave config: {msg}")

    def dense_layers(self, num_layers: int) -> set[int]:
        """The layers (of a model of `num_layers`) that attend densely."""
        return set(range(min(self.dense_first, num_layers))) | set(range(max(0, num_layers - self.dense_last),
                                                                         num_layers))

    def zone_sizes(self, num_clusters: int) -> tuple[int, int]:
        r = min(num_clusters, max(1, math.ceil(num_clusters * self.retrieval_frac)))
        e = min(num_clusters - r, int(num_clusters * self.estimation_frac))
        return r, e


@dataclass(frozen=True)
class QuestConfig:
    """Quest page top-k (Tang et al. 2024, arXiv 2406.10774), attention/quest.py. `budget` is the
    tokens each query head attends per decode step: None = wave's exactly attended tokens at that
    step under the engine's WaveConfig (its steady zone plus its retrieval zone: `wave_exact_tokens`),
    a number in (0, 1] = that share of the context, a larger one = that many tokens."""
    budget: float | None = None
    page_size: int = 16                # tokens per page (Quest's 16; the paged kernel's least)
    sink_page: bool = True             # the first page (wave's sink tokens) is always chosen
    dense_layers: int = 0              # the first layers attend fully (Quest's paper: 2)

    def __post_init__(self):
        checks = [
            (self.budget is None or self.budget > 0, "budget must be > 0 (a share <= 1, or tokens)"),
            (self.page_size >= 16 and self.page_size & (self.page_size - 1) == 0,
             "page_size must be a power of two >= 16"),
            (self.dense_layers >= 0, "dense_layers must be >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"quest config: {msg}")

    def budget_tokens(self, wave: WaveConfig, prompt: int, length: int) -> int:
        """Tokens to attend at a decode step of a sequence of `length` tokens (this step's one
        included) whose prompt had `prompt` tokens."""
        if self.budget is None:
            return wave_exact_tokens(wave, prompt, length)
        return math.ceil(self.budget * length) if self.budget <= 1 else math.ceil(self.budget)


def wave_exact_tokens(wave: WaveConfig, prompt: int, length: int) -> int:
    """Tokens wave attention attends exactly at the decode step of `length` tokens: its steady zone
    (sink + window + decoded tokens not yet indexed, or the whole sequence while the prompt was too
    short to index) replayed from attention/wave.py's bookkeeping, plus its retrieval zone, the top
    ceil(C * retrieval_frac) clusters of C = indexed / tokens_per_cluster, tokens_per_cluster
    tokens each (nominal: the mean cluster size)."""
    r, u = wave.sink + wave.window, wave.update_every
    steady0 = r if prompt - r >= u else prompt          # after prefill (wave.write_prefill)
    x = steady0 + (length - prompt - 1)                 # before this step, had no update run
    steady = (x if x < r + u else r + (x - r) % u) + 1  # an update moves the oldest u tokens out
    indexed = length - steady
    if indexed <= 0:
        return length
    per = wave.tokens_per_cluster
    return steady + min(indexed, per * max(1, math.ceil(wave.retrieval_frac * indexed / per)))


ATTENTIONS = ("full", "wave", "quest")      # the decode attention backends (attention.make_backend)


@dataclass(frozen=True)
class EngineConfig:
    model: str = "tiny"                  # a Hugging Face directory, or "tiny"
    dtype: str | None = None             # default: the checkpoint's (tiny: float32)
    device: str | None = None            # default: cuda if available, else cpu
    devices: tuple[str, ...] = ()        # split layers across these in order (pipeline stages)
    attention: str = "full"              # "full", "wave" or "quest"
    wave: WaveConfig = field(default_factory=WaveConfig)
    quest: QuestConfig = field(default_factory=QuestConfig)   # attention "quest" (its default budget
                                                              # reads `wave`)
    max_batch: int = 16                  # decode batch
    max_model_len: int | None = None     # default: the model's max_position_embeddings
    kv_budget_bytes: int | None = None   # default: what the device can hold
    offload: bool = False                # wave: cluster-sorted KV in pinned host memory (wave buffer)
    host_kv_budget_bytes: int | None = None   # offload: host pool per stage (default: half the free RAM)
    prefill_chunk: int = 16384           # tokens per MLP / projection chunk in prefill
    prefill_budget_tokens: int | None = 1024   # prefill per engine step, in prompt tokens through the
                                               # whole model (a chunk of c tokens through one of L layers
                                               # counts c / L); every step also decodes the running batch.
                                               # None: each step finishes every prefill in progress
    prefill_slice_s: float | None = None   # also end a step's prefill once it has run this long (after at
                                           # least one chunk of one layer; 0: one chunk a step)
    cuda_graphs: bool = True             # replay the decode step as a CUDA graph where the backend allows
    seed: int = 0

    def __post_init__(self):
        if self.attention not in ATTENTIONS:
            raise ConfigError(f"attention must be one of {', '.join(map(repr, ATTENTIONS))}, not {self.attention!r}")
        if self.max_batch < 1 or self.prefill_chunk < 1:
            raise ConfigError("max_batch and prefill_chunk must be >= 1")
        if self.prefill_budget_tokens is not None and self.prefill_budget_tokens < 1:
            raise ConfigError("prefill_budget_tokens must be >= 1 (or None: unbounded)")
        if self.dtype is not None:
            parse_dtype(self.dtype)
        if self.offload and self.attention != "wave":
            raise ConfigError("offload keeps the wave index's KV in host memory: it needs attention 'wave'")

    def with_overrides(self, **kw) -> "EngineConfig":
        names = {f.name for f in fields(self)}
        return replace(self, **{k: v for k, v in kw.items() if k in names and v is not None})
