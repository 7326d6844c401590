"""The engine's typed messages: what a request gets back (`RequestOutput`), why it was refused
(`Admission`), what the engine reports (`EngineStats`), and the contract every executor keeps
(`Executor`). The plan of a step (`SchedulerOutput`) holds sequences, so it lives with its maker,
`scheduler.py`, above `sequence.py`, which builds the `RequestOutput`s here."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Callable, Generator, Hashable, Protocol

if TYPE_CHECKING:
    import torch

    from .sampling import SparseLogits


class FinishReason(enum.StrEnum):
    STOP = "stop"          # an EOS or stop token, or a stop string
    LENGTH = "length"      # max_tokens
    ABORT = "abort"        # the caller cancelled (disconnect, DELETE of a job, abort())
    ERROR = "error"        # the request failed on its own account; `error` says why


class ErrorCode(enum.StrEnum):
    """Why a request finished with `FinishReason.ERROR` (OpenAI-style `code`)."""
    KV_CAPACITY_EXCEEDED = "kv_capacity_exceeded"   # its KV can never fit this engine (a 400)
    REQUEST_FAILED = "request_failed"               # its prefill, sampling or detokenising raised


class Admission(enum.Enum):
    """The KV ledger's answer to a new request, with the HTTP status and code it maps to."""
    ADMITTED = (200, None)
    NO_ROOM_NOW = (429, "kv_cache_full")             # fits once admitted requests finish
    NEVER_FITS = (400, "kv_capacity_exceeded")       # larger than the engine's whole KV

    @property
    def status(self) -> int:
        return self.value[0]

    @property
    def code(self) -> str | None:
        return self.value[1]


class AdmissionError(ValueError):
    """`add_request` refused the request: `admission` says why (NO_ROOM_NOW or NEVER_FITS)."""

    def __init__(self, admission: Admission, message: str):
        super().__init__(message)
        self.admission = admission


class ExecutorFailure(RuntimeError):
    """The executor itself failed (a pipeline stage died), not the request it was working on: the
    engine raises it out of `step` wherever it happens, prefill included, so the serving layer
    fails the replica instead of failing its requests one by one."""


@dataclass
class RequestOutput:
    request_id: str
    token_ids: list[int]            # new this step
    text: str                       # new this step
    finished: bool = False
    finish_reason: FinishReason | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error_code: ErrorCode | None = None


def _additive(default: Any = 0):
    return field(default=default, metadata={"additive": True})


@dataclass
class EngineStats:
    """What an engine reports. Stages' backend dicts become one through `merge` (KV bytes, PCIe
    traffic, pool and cache sizes add up: a sequence fits only where every stage has room; other
    numbers are the first stage's); the engine adds its scheduler's counts. `as_dict` is the flat
    dict the serving layer and the benchmarks read (`engine.stats()`)."""
    capacity_bytes: int = _additive()
    used_bytes: int = _additive()
    # wave offload (present when a backend reports them)
    retrieved_clusters: int | None = _additive(None)
    cache_hits: int | None = _additive(None)
    gathered_rows: int | None = _additive(None)
    pcie_rows: int | None = _additive(None)
    pcie_bytes_total: int | None = _additive(None)
    pcie_bytes_per_step: float | None = _additive(None)
    host_pool_bytes: int | None = _additive(None)
    host_pinned_bytes: int | None = _additive(None)
    cache_bytes: int | None = _additive(None)
    # the scheduler
    outstanding_bytes: int = 0         # KV promised to admitted requests (the ledger)
    waiting: int = 0
    prefilling: int = 0
    running: int = 0
    prefill_tokens: int = 0            # the last finished prefill: its prompt and wall time
    prefill_s: float = 0.0
    decode_batch: int = 0              # the last decode step
    decode_s: float = 0.0
    step_prefill_tokens: float = 0.0   # prefill work of the last step, in prompt tokens through the model
    extra: dict = field(default_factory=dict)     # other numbers a backend reports
    stages: list[dict] = field(default_factory=list)

    @classmethod
    def from_backend(cls, d: dict) -> "EngineStats":
        names = {f.name for f in fields(cls)} - {"extra", "stages"}
        return cls(**{k: v for k, v in d.items() if k in names},
                   extra={k: v for k, v in d.items() if k not in names and isinstance(v, (int, float))},
                   stages=[d])

    @classmethod
    def from_stages(cls, per: list[dict]) -> "EngineStats":
        out = cls.from_backend(per[0])
        for d in per[1:]:
            out = out.merge(cls.from_backend(d))
        return out

    def merge(self, other: "EngineStats") -> "EngineStats":
        """Additive fields summed (None + None stays None), the rest taken from self, stages joined."""
        kw = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.metadata.get("additive"):
                kw[f.name] = None if a is None and b is None else (a or 0) + (b or 0)
            elif f.name == "extra":
                kw[f.name] = {**b, **a}
            elif f.name == "stages":
                kw[f.name] = a + b
            else:
                kw[f.name] = a
        return EngineStats(**kw)

    @property
    def cache_hit_ratio(self) -> float | None:
        return self.cache_hits / self.retrieved_clusters if self.retrieved_clusters else None

    @property
    def cache_row_hit_ratio(self) -> float | None:
        return 1 - (self.pcie_rows or 0) / self.gathered_rows if self.gathered_rows else None

    def as_dict(self) -> dict:
        out = {**self.extra}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name != "extra" and v is not None:
                out[f.name] = v
        for k in ("cache_hit_ratio", "cache_row_hit_ratio"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        return out


class Executor(Protocol):
    """Runs the model's stages for the engine: in process (`executor.LocalExecutor`), as Ray stage
    actors (`retroinfer.cluster.serve.pipeline.RayPipelineExecutor`), or not at all (`FakeExecutor`).

    `reserve` takes a sequence's whole KV footprint before any of its work (raising
    `KVCapacityError`, whose `ever` says whether it could fit once others finish); `free` returns
    it. `prefill_steps` is a generator that yields once per unit of work, one chunk of
    `prefill_chunk` prompt tokens through one layer (so `num_layers * ceil(T / prefill_chunk)`
    times), calls `progress(layer)` as each layer finishes, and returns the last prompt token's
    logits [1, V]; closing it mid-way abandons the prefill (the engine then frees the KV).
    `decode` runs one step for a batch and returns logits [B, V] (valid until the next call), or
    `sampling.SparseLogits`: every row's argmax and the whole rows of `sampled_rows` only (the
    batch rows whose requests sample; the others are greedy), for an executor that would otherwise
    move [B, V] between processes.
    """
    device: "torch.device"           # where logits arrive
    dtype: "torch.dtype"             # of the KV cache

    def reserve(self, seq_id: Hashable, num_tokens: int) -> None: ...

    def free(self, seq_id: Hashable) -> None: ...

    def prefill_steps(self, seq_id: Hashable, ids: "torch.Tensor",
                      progress: Callable[[int], None] | None = None) -> Generator[None, None, "torch.Tensor"]: ...

    def decode(self, seq_ids: list, ids: "torch.Tensor", positions: "torch.Tensor",
               sampled_rows: list[int] | None = None) -> "torch.Tensor | SparseLogits": ...

    def stats(self) -> EngineStats: ...

    def shutdown(self) -> None: ...
