"""A request's life inside the engine: QUEUED (admitted, waiting) -> PREFILL (KV reserved) ->
DECODE (in the running batch) -> DONE."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from .protocol import ErrorCode, FinishReason, RequestOutput
from .sampling import SamplingParams
from .tokenizer import IncrementalDetokenizer

__all__ = ["Phase", "RequestOutput", "Sequence", "footprint_tokens"]


def footprint_tokens(prompt_tokens: int, params: SamplingParams) -> int:
    """Tokens whose KV a request may hold at its end (prompt + max_tokens): reserved whole before
    its prefill, so that a running request never runs out of KV."""
    return prompt_tokens + params.max_tokens


class Phase(str, enum.Enum):
    QUEUED = "queued"
    PREFILL = "prefill"
    DECODE = "decode"
    DONE = "done"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    detok: IncrementalDetokenizer | None = None
    generator: Any = None                    # its torch.Generator (made before its KV is reserved)
    output_ids: list[int] = field(default_factory=list)
    phase: Phase = Phase.QUEUED
    prefill_layers_done: int = 0
    prefill_units_done: int = 0              # chunks x layers (see PrefillWork)
    prefill_gen: Any = None                  # the executor's prefill generator, once opened
    prefill_t0: float = 0.0
    kv_reserved: bool = False                # the executor holds its KV
    arrival: int = 0                         # admission order (FCFS)
    aborted: bool = False
    waits_for_room: bool = False               # admitted with no KV room (queued for it)
    setup_error: BaseException | None = None   # failed before its KV was reserved (e.g. its seed)
    finish_reason: FinishReason | None = None
    error: str | None = None
    error_code: ErrorCode | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def footprint_tokens(self) -> int:
        return footprint_tokens(len(self.prompt_ids), self.params)

    def output(self, new_ids: list[int], text: str) -> RequestOutput:
        return RequestOutput(self.request_id, new_ids, text, self.phase is Phase.DONE, self.finish_reason,
                             self.error, len(self.prompt_ids), len(self.output_ids), self.error_code)
