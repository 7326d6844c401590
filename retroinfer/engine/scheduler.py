"""The scheduler: plain bookkeeping, no tensors. It owns the request queues (waiting -> prefilling
-> running), the one KV ledger that admits requests, and the plan of each engine step.

**Admission** (`add`, any thread). A request's footprint (prompt + max_tokens) is checked against
the ledger: larger than the engine's whole KV is `NEVER_FITS` (a 400, refused at once); larger than
what requests already admitted leave is `NO_ROOM_NOW`: the request waits in the queue, unless the
engine is told to `reject_when_full` (the serving layer, so the ingress can try another replica
first) and the caller did not ask it to wait (`add(seq, wait=True)`: the ingress, once no replica
has room). At most `max_waiting` requests wait for room (beyond that, NO_ROOM_NOW is refused
whatever the caller asked), so a full replica's queue stays bounded. The executor's `reserve` at
prefill start is the physical allocation that the ledger's promise precedes.

**A step** (`schedule`). Every running sequence decodes one token in every step. Beside that the
step does at most `budget_tokens` of prefill: a unit of prefill is one chunk of c prompt tokens
through one of the model's L layers and counts c / L tokens, so a prompt of T tokens costs T in
all, whether it is prefilled in one step or over many. Whatever the budget, the oldest prefill in
progress advances by at least one unit a step, so a prefill always finishes.

**Policy between long and short prompts.** Admission is first come, first served: the waiting
queue starts prefills in arrival order and a request that does not fit (KV, batch slots) holds up
those behind it, so a 1M-token job is never starved of KV by a stream of chats. The prefill budget
of a step goes to the prefilling sequences with the least prefill left first, so a chat admitted
while a 1M-token prefill runs is prefilled within a step or two (it is not queued behind the long
prefill); the oldest prefill still gets its unit every step. Prefills in progress each hold their
activations (the residual stream and one layer's K/V of the whole prompt), so prompts longer than
the budget start only while the prompt tokens of such prefills in flight stay within
`max_prefill_tokens` (the context the stage sized its headroom for); a short prompt (at most the
budget) may start beside them, also when a long one ahead of it waits for that room.
"""
from __future__ import annotations

import itertools
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Hashable, Protocol

from ..attention import KVCapacityError
from ..kernels import cdiv
from .protocol import Admission, AdmissionError, ErrorCode, FinishReason
from .sequence import Phase, Sequence


@dataclass
class PrefillWork:
    """Advance `seq`'s prefill by `units` units: a unit is one chunk (`prefill_chunk` tokens or
    the prompt's last, shorter one) through one layer: one `next()` of the executor's
    `prefill_steps` generator."""
    seq: Sequence
    units: int


@dataclass
class SchedulerOutput:
    """One engine step: the prefill work, in the order to run it, then one decode step of `decode`."""
    prefills: list[PrefillWork] = field(default_factory=list)
    decode: list[Sequence] = field(default_factory=list)
    started: list[Sequence] = field(default_factory=list)    # KV reserved this step (prefill begins)
    finished: list[Sequence] = field(default_factory=list)   # ended by the scheduler (aborted, refused)
    budget: float | None = None        # the step's prefill budget in token-layers (None: unbounded)

    @property
    def empty(self) -> bool:
        return not (self.prefills or self.decode or self.finished)


class KVAllocator(Protocol):
    def reserve(self, seq_id: Hashable, num_tokens: int) -> None: ...

    def free(self, seq_id: Hashable) -> None: ...


class Scheduler:
    def __init__(self, kv: KVAllocator, *, capacity_tokens: int, num_layers: int, prefill_chunk: int,
                 max_batch: int, budget_tokens: float | None, max_prefill_tokens: int,
                 bytes_per_token: int = 1):
        self.kv, self.capacity_tokens = kv, capacity_tokens
        self.num_layers, self.chunk, self.max_batch = num_layers, prefill_chunk, max_batch
        self.budget_tokens, self.max_prefill_tokens = budget_tokens, max_prefill_tokens
        self.bytes_per_token = bytes_per_token
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []      # in admission order
        self.running: list[Sequence] = []
        self.reject_when_full = False
        self.max_waiting: int | None = None      # requests that may wait for room (None: any number)
        self._ledger: dict[str, int] = {}         # admitted request -> footprint tokens
        self._outstanding = 0
        self._inbox: deque[Sequence] = deque()
        self._lock = threading.Lock()
        self._order = itertools.count()

    # -- admission (any thread) --------------------------------------------------------------
    def check(self, tokens: int) -> Admission:
        if tokens > self.capacity_tokens:
            return Admission.NEVER_FITS
        if self._outstanding + tokens > self.capacity_tokens:
            return Admission.NO_ROOM_NOW
        return Admission.ADMITTED

    def add(self, seq: Sequence, wait: bool | None = None) -> None:
        """Admits `seq` into the ledger and the queue, or raises `AdmissionError`. `wait`: whether a
        request with no room now may wait for it (None: unless `reject_when_full`)."""
        need = seq.footprint_tokens
        with self._lock:
            if seq.request_id in self._ledger:
                raise ValueError(f"request id {seq.request_id!r} is already in use")
            verdict = self.check(need)
            if verdict is Admission.NO_ROOM_NOW:
                may_wait = (not self.reject_when_full) if wait is None else wait
                if not may_wait:
                    raise AdmissionError(verdict, self._refusal(verdict, need))
                if self.max_waiting is not None:
                    waiting = sum(s.waits_for_room for s in (*self.waiting, *self._inbox))
                    if waiting >= self.max_waiting:
                        raise AdmissionError(verdict, self._refusal(verdict, need) +
                                             f", and {waiting} request(s) already wait for room")
                seq.waits_for_room = True
            elif verdict is Admission.NEVER_FITS:
                raise AdmissionError(verdict, self._refusal(verdict, need))
            self._ledger[seq.request_id] = need
            self._outstanding += need
            seq.arrival = next(self._order)
            self._inbox.append(seq)

    def _refusal(self, verdict: Admission, need: int) -> str:
        b = self.bytes_per_token
        if verdict is Admission.NEVER_FITS:
            return (f"the request needs {need * b} bytes of KV cache ({need} tokens); this engine holds at "
                    f"most {self.capacity_tokens * b} ({self.capacity_tokens} tokens)")
        free = max(0, self.capacity_tokens - self._outstanding)
        return (f"the request needs {need * b} bytes of KV cache; {free * b} of {self.capacity_tokens * b} "
                f"are free on this replica now")

    @property
    def outstanding_tokens(self) -> int:
        return self._outstanding

    def has_work(self) -> bool:
        return bool(self._inbox or self.waiting or self.prefilling or self.running)

    # -- the cost of prefill -----------------------------------------------------------------
    def units_total(self, seq: Sequence) -> int:
        return self.num_layers * cdiv(len(seq.prompt_ids), self.chunk)

    def cost_done(self, seq: Sequence, units: int) -> int:
        """Token-layers of a prompt's first `units` units (chunk-major within a layer)."""
        T = len(seq.prompt_ids)
        per_layer = cdiv(T, self.chunk)
        return (units // per_layer) * T + min(T, (units % per_layer) * self.chunk)

    def cost_left(self, seq: Sequence) -> int:
        return self.num_layers * len(seq.prompt_ids) - self.cost_done(seq, seq.prefill_units_done)

    def _units_within(self, seq: Sequence, budget: float) -> tuple[int, int]:
        """The most units of `seq` whose cost fits `budget`, and that cost."""
        u0, total = seq.prefill_units_done, self.units_total(seq)
        base, u = self.cost_done(seq, u0), u0
        while u < total and self.cost_done(seq, u + 1) - base <= budget:
            u += 1
        return u - u0, self.cost_done(seq, u) - base

    # -- a step (the engine thread) ------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        with self._lock:
            self.waiting.extend(self._inbox)
            self._inbox.clear()
        for seq in [s for s in (*self.waiting, *self.prefilling, *self.running) if s.aborted or s.setup_error]:
            if seq.aborted:
                self.finish(seq, FinishReason.ABORT)
            else:
                e = seq.setup_error
                self.finish(seq, FinishReason.ERROR, f"the request failed: {type(e).__name__}: {str(e)[:200]}",
                            ErrorCode.REQUEST_FAILED)
            out.finished.append(seq)
        self._admit(out)
        out.budget = None if self.budget_tokens is None else self.budget_tokens * self.num_layers
        out.prefills = self._plan_prefill(out.budget)
        out.decode = list(self.running)
        return out

    def _admit(self, out: SchedulerOutput) -> None:
        """Starts prefills from the waiting queue in arrival order (see the module's policy)."""
        long_in_flight = sum(len(s.prompt_ids) for s in self.prefilling if not self._short(s))
        blocked_long = False
        for seq in list(self.waiting):
            if len(self.running) + len(self.prefilling) >= self.max_batch:
                return
            T, short = len(seq.prompt_ids), self._short(seq)
            if not short and (blocked_long or (long_in_flight and long_in_flight + T > self.max_prefill_tokens)):
                blocked_long = True          # waits for activation room; short prompts may pass it
                continue
            try:
                self.kv.reserve(seq.request_id, seq.footprint_tokens)
            except KVCapacityError as e:
                if e.ever and (self.running or self.prefilling):
                    return                   # fits once others finish: it and those behind it wait
                self.finish(seq, FinishReason.ERROR, f"KV cache cannot hold this request: {e}",
                            ErrorCode.KV_CAPACITY_EXCEEDED)
                out.finished.append(seq)
                continue
            seq.kv_reserved, seq.phase = True, Phase.PREFILL
            self.waiting.remove(seq)
            self.prefilling.append(seq)
            out.started.append(seq)
            if not short:
                long_in_flight += T

    def _short(self, seq: Sequence) -> bool:
        return self.budget_tokens is not None and len(seq.prompt_ids) <= self.budget_tokens

    def _plan_prefill(self, budget: float | None) -> list[PrefillWork]:
        if not self.prefilling:
            return []
        if budget is None:
            return [PrefillWork(s, self.units_total(s) - s.prefill_units_done) for s in self.prefilling]
        plan: dict[Sequence, int] = {}
        left = budget
        for seq in sorted(self.prefilling, key=lambda s: (self.cost_left(s), s.arrival)):
            units, cost = self._units_within(seq, left)
            if units:
                plan[seq], left = units, left - cost
        oldest = self.prefilling[0]
        if oldest not in plan:
            plan[oldest] = 1
        return [PrefillWork(s, n) for s, n in plan.items()]

    def adopt_running(self, seq: Sequence) -> None:
        """A sequence whose KV the caller reserved and filled (benchmarks' `add_prefilled`)."""
        with self._lock:
            self._ledger[seq.request_id] = seq.footprint_tokens
            self._outstanding += seq.footprint_tokens
            seq.arrival = next(self._order)
        seq.kv_reserved, seq.phase = True, Phase.DECODE
        self.running.append(seq)

    def prefill_advanced(self, seq: Sequence, units: int) -> None:
        seq.prefill_units_done += units

    def prefill_done(self, seq: Sequence) -> None:
        """Its prefill returned: it decodes from the next step on."""
        self.prefilling.remove(seq)
        seq.phase, seq.prefill_gen = Phase.DECODE, None
        self.running.append(seq)

    def finish(self, seq: Sequence, reason: FinishReason, error: str | None = None,
               code: ErrorCode | None = None) -> None:
        """Ends `seq` wherever it is: closes its prefill, frees its KV, leaves the ledger."""
        if seq.phase is Phase.DONE:
            return
        for q in (self.waiting, self.prefilling, self.running):
            if seq in q:
                q.remove(seq)
        if seq.prefill_gen is not None:
            seq.prefill_gen.close()
            seq.prefill_gen = None
        if seq.kv_reserved:
            self.kv.free(seq.request_id)
            seq.kv_reserved = False
        with self._lock:
            self._outstanding -= self._ledger.pop(seq.request_id, 0)
        seq.phase, seq.finish_reason, seq.error, seq.error_code = Phase.DONE, reason, error, code
