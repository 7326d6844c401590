"""The engine: requests in, tokens out. `step()` = the scheduler's plan (`scheduler.py`) -> the
executor runs it -> outputs. A step runs the planned prefill work (at most the step's prefill
budget, chunk by chunk, layer by layer) and then one decode step of every running sequence, so
streams keep their pace while long prompts prefill. Thread-safe entry points: `add_request`,
`abort`; `step` runs on one thread (the serving layer's engine loop).

A request is validated once, in `add_request`, which also admits it into the scheduler's KV
ledger (or raises `AdmissionError` with a typed reason). Failures are kept to the request that
caused them: its sampling generator is made before its KV is reserved; an exception in its
prefill, its sampling or its detokenising finishes that request with an error
(`FinishReason.ERROR`) and frees its KV, and the other requests go on. An exception `step` raises
(the batched decode itself) is the engine's, not a request's. An abort lands within one unit of
prefill work (one chunk through one layer)."""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import torch

from ..config import EngineConfig, ModelConfig
from ..models.presets import is_preset, preset_config
from .executor import LocalExecutor
from .protocol import EngineStats, ErrorCode, Executor, ExecutorFailure, FinishReason, RequestOutput
from .sampling import Sampler, SamplingParams
from .scheduler import PrefillWork, Scheduler
from .sequence import Phase, Sequence, footprint_tokens
from .tokenizer import IncrementalDetokenizer, load_tokenizer

log = logging.getLogger("ray.serve.retroinfer")


def load_model_config(model: str) -> ModelConfig:
    if is_preset(model):
        return preset_config(model)
    return ModelConfig.from_dir(model)


def check_request(prompt_ids: list[int], params: SamplingParams, max_model_len: int, vocab_size: int) -> None:
    """The engine's admission check without an engine (the HTTP front end runs it before routing).
    Raises ValueError with a user-facing message if the request can never run."""
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    n = footprint_tokens(len(prompt_ids), params)
    if n > max_model_len:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens + max_tokens {params.max_tokens} = {n} "
                         f"exceeds the model's context of {max_model_len} tokens")
    bad = [t for t in prompt_ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the vocabulary (size {vocab_size})")


class LLMEngine:
    def __init__(self, cfg: EngineConfig, executor: Executor | None = None,
                 on_prefill_progress: Callable[[str, int, int], None] | None = None):
        self.cfg = cfg
        self.model_cfg = load_model_config(cfg.model)
        self.tokenizer = load_tokenizer(cfg.model)
        self.max_model_len = cfg.max_model_len or self.model_cfg.max_position_embeddings
        self.executor: Executor = executor or LocalExecutor(cfg, self.model_cfg)
        self.sampler = Sampler(self.executor.device)
        self.eos = set(self.model_cfg.eos_token_ids) | set(self.tokenizer.eos_token_ids)
        self.on_prefill_progress = on_prefill_progress
        self.bytes_per_token = self.model_cfg.kv_bytes_per_token(self.executor.dtype)
        self.scheduler = Scheduler(
            self.executor, capacity_tokens=self.executor.stats().capacity_bytes // self.bytes_per_token,
            num_layers=self.model_cfg.num_layers, prefill_chunk=cfg.prefill_chunk, max_batch=cfg.max_batch,
            budget_tokens=cfg.prefill_budget_tokens, max_prefill_tokens=self.max_model_len,
            bytes_per_token=self.bytes_per_token)
        self.seqs: dict[str, Sequence] = {}
        self._lock = threading.Lock()
        self._last = {"prefill_tokens": 0, "prefill_s": 0.0, "decode_batch": 0, "decode_s": 0.0,
                      "step_prefill_tokens": 0.0}

    # -- thread-safe entry points ----------------------------------------------------------
    @property
    def reject_when_full(self) -> bool:
        """True: a request that does not fit the KV left now is refused (`AdmissionError`,
        NO_ROOM_NOW) instead of waiting; the serving layer sets it, so the ingress tries elsewhere."""
        return self.scheduler.reject_when_full

    @reject_when_full.setter
    def reject_when_full(self, value: bool) -> None:
        self.scheduler.reject_when_full = value

    @property
    def max_waiting(self) -> int | None:
        """How many requests may wait for KV room (None: any number); see `Scheduler.add`."""
        return self.scheduler.max_waiting

    @max_waiting.setter
    def max_waiting(self, value: int | None) -> None:
        self.scheduler.max_waiting = value

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raises ValueError with a user-facing message if the request can never run."""
        check_request(prompt_ids, params, self.max_model_len, self.model_cfg.vocab_size)

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    wait: bool | None = None) -> None:
        """Validates and admits the request (ValueError, or its subclass `AdmissionError` whose
        `admission` is NEVER_FITS or NO_ROOM_NOW, if it is refused). `wait`: whether it may wait
        for KV room (None: unless `reject_when_full`; see `Scheduler.add`)."""
        self.validate(prompt_ids, params)
        seq = Sequence(request_id, list(prompt_ids), params, IncrementalDetokenizer(self.tokenizer))
        try:
            seq.generator = self.sampler.generator(params.seed)
        except Exception as e:           # noqa: BLE001 - the request's (a seed torch refuses): fails at its step
            seq.setup_error = e
        with self._lock:
            if request_id in self.seqs:
                raise ValueError(f"request id {request_id!r} is already in use")
            self.seqs[request_id] = seq
            try:
                self.scheduler.add(seq, wait)
            except Exception:
                del self.seqs[request_id]
                raise

    def abort(self, request_id: str) -> None:
        seq = self.seqs.get(request_id)
        if seq is not None:
            seq.aborted = True

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    @property
    def running(self) -> list[Sequence]:
        """The decode batch (read-only; benchmarks read it)."""
        return self.scheduler.running

    def engine_stats(self) -> EngineStats:
        s, sch = self.executor.stats(), self.scheduler
        s.outstanding_bytes = sch.outstanding_tokens * self.bytes_per_token
        s.waiting, s.prefilling, s.running = len(sch.waiting) + len(sch._inbox), len(sch.prefilling), len(sch.running)
        for k, v in self._last.items():
            setattr(s, k, v)
        return s

    def stats(self) -> dict:
        """`engine_stats()` as the flat dict the serving layer and the benchmarks read."""
        return self.engine_stats().as_dict()

    # -- the loop ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        outputs = [self._output(s) for s in plan.finished]
        for seq in plan.started:
            if self.on_prefill_progress:      # layers_done 0: the prefill has started (its KV is reserved)
                self.on_prefill_progress(seq.request_id, 0, self.model_cfg.num_layers)
        outputs += self._prefill(plan.prefills)
        if plan.decode:
            outputs += self._decode(plan.decode)
        return outputs

    def _output(self, seq: Sequence, new_ids: list[int] | None = None, text: str = "") -> RequestOutput:
        if seq.phase is Phase.DONE:
            self.seqs.pop(seq.request_id, None)
        return seq.output(new_ids or [], text)

    def _finish(self, seq: Sequence, reason: FinishReason, error: str | None = None,
                code: ErrorCode | None = None) -> None:
        self.scheduler.finish(seq, reason, error, code)

    def _fail(self, seq: Sequence, e: BaseException) -> RequestOutput:
        """Ends a request that failed on its own account (not the engine's): it finishes with an
        error and its KV is freed; the other requests go on."""
        log.warning("request %s failed: %s: %s", seq.request_id, type(e).__name__, e,
                    exc_info=not isinstance(e, ValueError))
        self._finish(seq, FinishReason.ERROR, f"the request failed: {type(e).__name__}: {str(e)[:200]}",
                     ErrorCode.REQUEST_FAILED)
        return self._output(seq)

    def _open_prefill(self, seq: Sequence) -> None:
        num_layers = self.model_cfg.num_layers

        def progress(layer: int) -> None:
            seq.prefill_layers_done += 1
            if self.on_prefill_progress:
                self.on_prefill_progress(seq.request_id, seq.prefill_layers_done, num_layers)

        ids = torch.tensor(seq.prompt_ids, dtype=torch.long)
        seq.prefill_t0 = time.perf_counter()
        seq.prefill_gen = self.executor.prefill_steps(seq.request_id, ids, progress)

    def _prefill(self, work: list[PrefillWork]) -> list[RequestOutput]:
        """Runs the planned prefill units (and stops once past `prefill_slice_s`, after at least
        one). A prefill that returns samples its first token; it decodes from the next step."""
        slice_s = self.cfg.prefill_slice_s
        deadline = None if slice_s is None else time.perf_counter() + slice_s
        sch, outputs, done_cost, ran = self.scheduler, [], 0, 0
        for w in work:
            seq, n, logits = w.seq, 0, None
            if seq.phase is not Phase.PREFILL:
                continue
            total = sch.units_total(seq)
            try:
                if seq.prefill_gen is None:
                    self._open_prefill(seq)
                while n < w.units and not seq.aborted:
                    if deadline is not None and ran and time.perf_counter() >= deadline:
                        break
                    try:
                        next(seq.prefill_gen)
                        n, ran = n + 1, ran + 1
                        if seq.prefill_units_done + n == total:   # after the last unit: its layer's KV, logits
                            next(seq.prefill_gen)
                            raise RuntimeError(f"prefill_steps yielded more than {total} times")
                    except StopIteration as stop:
                        logits = stop.value
                        break
            except ExecutorFailure:      # the executor's, not this request's
                raise
            except Exception as e:       # noqa: BLE001 - this request's prefill
                outputs.append(self._fail(seq, e))
                continue
            done_cost += sch.cost_done(seq, seq.prefill_units_done + n) - sch.cost_done(seq, seq.prefill_units_done)
            sch.prefill_advanced(seq, n)
            if seq.aborted:
                self._finish(seq, FinishReason.ABORT)
                outputs.append(self._output(seq))
            elif logits is not None:
                outputs.append(self._first_token(seq, logits))
            if deadline is not None and ran and time.perf_counter() >= deadline:
                break
        self._last["step_prefill_tokens"] = done_cost / self.model_cfg.num_layers
        return outputs

    def _first_token(self, seq: Sequence, logits: torch.Tensor) -> RequestOutput:
        self.scheduler.prefill_done(seq)
        self._last.update(prefill_tokens=len(seq.prompt_ids), prefill_s=time.perf_counter() - seq.prefill_t0)
        try:
            tok = self.sampler(logits, [seq.params], [seq.generator])[0]
            return self._append(seq, tok)
        except Exception as e:           # noqa: BLE001
            return self._fail(seq, e)

    def _decode(self, batch: list[Sequence]) -> list[RequestOutput]:
        ids = torch.tensor([s.output_ids[-1] for s in batch], dtype=torch.long)
        positions = torch.tensor([s.num_tokens - 1 for s in batch], dtype=torch.long)
        t0 = time.perf_counter()
        sampled = [i for i, s in enumerate(batch) if not s.params.greedy]
        logits = self.executor.decode([s.request_id for s in batch], ids, positions, sampled)   # the engine's
        errors: dict[int, Exception] = {}
        toks = self.sampler(logits, [s.params for s in batch], [s.generator for s in batch], errors)
        self._last.update(decode_batch=len(batch), decode_s=time.perf_counter() - t0)
        out = []
        for i, (s, t) in enumerate(zip(batch, toks)):
            try:
                if i in errors:
                    raise errors[i]
                out.append(self._append(s, t))
            except Exception as e:       # noqa: BLE001 - that request's sampling or detokenising
                out.append(self._fail(s, e))
        return out

    def _append(self, seq: Sequence, tok: int) -> RequestOutput:
        p = seq.params
        seq.output_ids.append(tok)
        text = seq.detok.delta(seq.output_ids)
        reason = None
        if (tok in self.eos and not p.ignore_eos) or tok in p.stop_token_ids:
            reason = FinishReason.STOP
        elif p.stop:
            emitted = seq.detok.text
            window_start = max(0, len(emitted) - len(text) - max(map(len, p.stop)))
            hits = [i for s in p.stop if (i := emitted.find(s, window_start)) >= 0]
            if hits:
                cut = min(hits)
                text = text[: max(0, len(text) - (len(emitted) - cut))]
                seq.detok.text = emitted[:cut]
                reason = FinishReason.STOP
        if reason is None and len(seq.output_ids) >= p.max_tokens:
            reason = FinishReason.LENGTH
        if reason is not None:
            self._finish(seq, reason)
        return self._output(seq, [tok], text)

    def add_prefilled(self, request_id: str, prompt_len: int, params: SamplingParams, kv_source,
                      first_token: int = 0) -> None:
        """Benchmarks: a sequence whose prompt KV is synthesised straight into the cache
        (`kv_source(layer, prompt_len) -> (k, v)`, each [T, Hkv, D] on the stage's device), as if
        prefilled, then decoding from `first_token`. Skips the hours a real 1M-token prefill of
        every benchmark sequence would take; the decode step is the real one. LocalExecutor only."""
        seq = Sequence(request_id, [0] * prompt_len, params, IncrementalDetokenizer(self.tokenizer))
        self.validate(seq.prompt_ids, params)
        self.executor.reserve(request_id, seq.footprint_tokens)
        for st in self.executor.stages:
            for layer in st.backend.layer_ids:
                k, v = kv_source(layer, prompt_len)
                st.backend.write_prefill(layer, request_id, k, v, 0)
        seq.generator = self.sampler.generator(params.seed)
        seq.output_ids.append(first_token)
        self.seqs[request_id] = seq
        self.scheduler.adopt_running(seq)

    # -- convenience for the CLI and tests ------------------------------------------------------
    def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str = "0"):
        """Runs one request to completion alone, yielding its outputs as they come."""
        self.add_request(request_id, prompt_ids, params)
        while self.has_work():
            for out in self.step():
                if out.request_id == request_id:
                    yield out
                    if out.finished:
                        return
