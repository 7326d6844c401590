"""A request's life inside the engine, and what the engine reports about it."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from .sampling import SamplingParams
from .tokenizer import IncrementalDetokenizer


class Phase(str, enum.Enum):
    QUEUED = "queued"
    PREFILL = "prefill"
    DECODE = "decode"
    DONE = "done"


@dataclass
class RequestOutput:
    request_id: str
    token_ids: list[int]            # new this step
    text: str                       # new this step
    finished: bool = False
    finish_reason: str | None = None   # "stop" | "length" | "abort" | "error"
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    detok: IncrementalDetokenizer
    generator: torch.Generator | None = None
    output_ids: list[int] = field(default_factory=list)
    phase: Phase = Phase.QUEUED
    prefill_layers_done: int = 0
    aborted: bool = False
    finish_reason: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def footprint_tokens(self) -> int:
        """Tokens whose KV the sequence may hold at its end: reserved up front."""
        return len(self.prompt_ids) + self.params.max_tokens

    def output(self, new_ids: list[int], text: str, error: str | None = None) -> RequestOutput:
        return RequestOutput(self.request_id, new_ids, text, self.phase is Phase.DONE,
                             self.finish_reason, error, len(self.prompt_ids), len(self.output_ids))
