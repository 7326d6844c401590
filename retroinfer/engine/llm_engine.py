"""The engine: requests in, tokens out. Continuous batching: a prompt joins by a whole-prompt,
layer-by-layer prefill; running sequences advance together one decode step at a time, and leave
the batch as they finish. Thread-safe entry points: `add_request`, `abort`; `step` runs on one
thread (the serving layer's engine loop).

Failures are kept to the request that caused them: a request's KV is reserved only after
everything that can fail on its own account before its prefill (its sampling generator, its
seed); an exception in its prefill, its sampling or its detokenising finishes that request with
an error (`finish_reason` "error") and frees its KV, and the other requests go on. An exception
`step` raises (the batched decode itself) is the engine's, not a request's."""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from typing import Callable

import torch

from ..attention import KVCapacityError
from ..config import ConfigError, EngineConfig, ModelConfig
from ..models.presets import is_preset, preset_config
from .executor import LocalExecutor
from .sampling import Sampler, SamplingParams
from .sequence import Phase, RequestOutput, Sequence
from .tokenizer import IncrementalDetokenizer, load_tokenizer

log = logging.getLogger("ray.serve.retroinfer")


class _Aborted(Exception):
    pass


def _no_yield(fn):
    """A blocking call in the shape of a prefill generator (executors without `prefill_steps`)."""
    return fn()
    yield  # noqa: unreachable: makes this a generator


def load_model_config(model: str) -> ModelConfig:
    if is_preset(model):
        return preset_config(model)
    return ModelConfig.from_dir(model)


def check_request(prompt_ids: list[int], params: SamplingParams, max_model_len: int, vocab_size: int) -> None:
    """The engine's admission check without an engine (the HTTP front end runs it before routing).
    Raises ValueError with a user-facing message if the request can never run."""
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    n = len(prompt_ids) + params.max_tokens
    if n > max_model_len:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens + max_tokens {params.max_tokens} = {n} "
                         f"exceeds the model's context of {max_model_len} tokens")
    bad = [t for t in prompt_ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the vocabulary (size {vocab_size})")


class LLMEngine:
    def __init__(self, cfg: EngineConfig, executor=None,
                 on_prefill_progress: Callable[[str, int, int], None] | None = None):
        self.cfg = cfg
        self.model_cfg = load_model_config(cfg.model)
        self.tokenizer = load_tokenizer(cfg.model)
        self.max_model_len = cfg.max_model_len or self.model_cfg.max_position_embeddings
        self.executor = executor or LocalExecutor(cfg, self.model_cfg)
        self.sampler = Sampler(self.executor.device)
        self.eos = set(self.model_cfg.eos_token_ids) | set(self.tokenizer.eos_token_ids)
        self.on_prefill_progress = on_prefill_progress
        self.seqs: dict[str, Sequence] = {}
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._prefill: tuple | None = None     # (sequence, its prefill generator, start time)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self.last_step: dict = {}

    # -- thread-safe entry points ----------------------------------------------------------
    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raises ValueError with a user-facing message if the request can never run."""
        check_request(prompt_ids, params, self.max_model_len, self.model_cfg.vocab_size)

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        self.validate(prompt_ids, params)
        with self._lock:
            if request_id in self.seqs:
                raise ValueError(f"request id {request_id!r} is already in use")
            seq = Sequence(request_id, list(prompt_ids), params, IncrementalDetokenizer(self.tokenizer))
            self.seqs[request_id] = seq
        self._inbox.put(seq)

    def abort(self, request_id: str) -> None:
        seq = self.seqs.get(request_id)
        if seq is not None:
            seq.aborted = True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._prefill or not self._inbox.empty())

    def kv_bytes_for(self, num_tokens: int) -> int:
        return num_tokens * self.model_cfg.kv_bytes_per_token(self.executor.dtype)

    def stats(self) -> dict:
        s = dict(self.executor.stats())
        s.update(waiting=len(self.waiting), running=len(self.running), prefilling=int(self._prefill is not None),
                 **self.last_step)
        return s

    # -- the loop ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        while not self._inbox.empty():
            self.waiting.append(self._inbox.get())
        outputs = self._reap_aborted()
        if self._prefill is None and self.waiting and len(self.running) < self.cfg.max_batch:
            outputs += self._start_prefill(self.waiting[0])
        if self._prefill is not None:
            done = self._advance_prefill()
            if done is not None:          # finished (or aborted) this step: its first token
                return outputs + done
        if self.running:
            outputs += self._decode()
        return outputs

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.phase, seq.finish_reason = Phase.DONE, reason
        if seq in self.running:
            self.running.remove(seq)
        self.executor.free(seq.request_id)
        self.seqs.pop(seq.request_id, None)

    def _reap_aborted(self) -> list[RequestOutput]:
        out = []
        if self._prefill is not None and self._prefill[0].aborted:
            out.append(self._drop_prefill())
        for seq in [s for s in list(self.waiting) + self.running if s.aborted]:
            if seq in self.waiting:
                self.waiting.remove(seq)
            self._finish(seq, "abort")
            out.append(seq.output([], ""))
        return out

    def _fail(self, seq: Sequence, e: BaseException) -> RequestOutput:
        """Ends a request that failed on its own account (not the engine's): it finishes with an
        error and its KV is freed; the other requests go on."""
        log.warning("request %s failed: %s: %s", seq.request_id, type(e).__name__, e,
                    exc_info=not isinstance(e, ValueError))
        if self._prefill is not None and self._prefill[0] is seq:
            self._prefill[1].close()
            self._prefill = None
        if seq in self.waiting:
            self.waiting.remove(seq)
        self._finish(seq, "error")
        return seq.output([], "", error=f"the request failed: {type(e).__name__}: {str(e)[:200]}")

    def _start_prefill(self, seq: Sequence) -> list[RequestOutput]:
        """Reserves the sequence's KV and starts its prefill (advanced by `_advance_prefill`).
        What can fail on the request's own account comes first, so a failure leaks no KV."""
        try:
            if seq.generator is None:
                seq.generator = self.sampler.generator(seq.params.seed)
        except Exception as e:           # noqa: BLE001 - the request's, e.g. a seed torch refuses
            return [self._fail(seq, e)]
        try:
            self.executor.reserve(seq.request_id, seq.footprint_tokens)
        except KVCapacityError as e:
            if e.ever and self.running:
                return []              # fits once running sequences finish: wait
            self.waiting.popleft()
            self._finish(seq, "error")
            return [seq.output([], "", error=f"KV cache cannot hold this request: {e}")]
        self.waiting.popleft()
        seq.phase = Phase.PREFILL
        try:
            self._open_prefill(seq)
        except Exception as e:           # noqa: BLE001
            return [self._fail(seq, e)]
        return []

    def _open_prefill(self, seq: Sequence) -> None:
        if self.on_prefill_progress:   # layers_done 0: the prefill has started (its KV is reserved)
            self.on_prefill_progress(seq.request_id, 0, self.model_cfg.num_layers)

        def progress(layer: int) -> None:
            seq.prefill_layers_done += 1
            if self.on_prefill_progress:
                self.on_prefill_progress(seq.request_id, seq.prefill_layers_done, self.model_cfg.num_layers)
            if seq.aborted:
                raise _Aborted

        ids = torch.tensor(seq.prompt_ids, dtype=torch.long)
        steps_fn = getattr(self.executor, "prefill_steps", None)
        steps = steps_fn(seq.request_id, ids, progress) if steps_fn else \
            _no_yield(lambda: self.executor.prefill(seq.request_id, ids, progress))
        self._prefill = (seq, steps, time.perf_counter())

    def _drop_prefill(self) -> RequestOutput:
        """Ends the prefill in progress as aborted and frees its KV."""
        seq, steps, _ = self._prefill
        steps.close()
        self._prefill = None
        self._finish(seq, "abort")
        return seq.output([], "")

    def _advance_prefill(self) -> list[RequestOutput] | None:
        """Runs the prefill in progress for up to `prefill_slice_s` while other sequences are
        decoding (to its end when none are). Returns None while it is unfinished."""
        seq, steps, t0 = self._prefill
        slice_s = self.cfg.prefill_slice_s
        deadline = time.perf_counter() + slice_s if self.running and slice_s is not None else None
        try:
            while True:
                next(steps)
                if deadline is not None and time.perf_counter() >= deadline:
                    return None
        except StopIteration as done:
            logits = done.value
        except _Aborted:
            return [self._drop_prefill()]
        except Exception as e:           # noqa: BLE001 - this request's prefill
            return [self._fail(seq, e)]
        self._prefill = None
        self.last_step = {"prefill_tokens": len(seq.prompt_ids), "prefill_s": time.perf_counter() - t0}
        seq.phase = Phase.DECODE
        self.running.append(seq)
        try:
            tok = self.sampler(logits, [seq.params], [seq.generator])[0]
            return [self._append(seq, tok)]
        except Exception as e:           # noqa: BLE001
            return [self._fail(seq, e)]

    def _decode(self) -> list[RequestOutput]:
        batch = list(self.running)
        ids = torch.tensor([s.output_ids[-1] for s in batch], dtype=torch.long)
        positions = torch.tensor([s.num_tokens - 1 for s in batch], dtype=torch.long)
        t0 = time.perf_counter()
        logits = self.executor.decode([s.request_id for s in batch], ids, positions)   # the engine's
        errors: dict[int, Exception] = {}
        toks = self.sampler(logits, [s.params for s in batch], [s.generator for s in batch], errors)
        self.last_step = {"decode_batch": len(batch), "decode_s": time.perf_counter() - t0}
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
            reason = "stop"
        elif p.stop:
            emitted = seq.detok.text
            window_start = max(0, len(emitted) - len(text) - max(map(len, p.stop)))
            hits = [i for s in p.stop if (i := emitted.find(s, window_start)) >= 0]
            if hits:
                cut = min(hits)
                text = text[: max(0, len(text) - (len(emitted) - cut))]
                seq.detok.text = emitted[:cut]
                reason = "stop"
        if reason is None and len(seq.output_ids) >= p.max_tokens:
            reason = "length"
        if reason is not None:
            self._finish(seq, reason)
        return seq.output([tok], text)

    def add_prefilled(self, request_id: str, prompt_len: int, params: SamplingParams, kv_source,
                      first_token: int = 0) -> None:
        """Benchmarks: a sequence whose prompt KV is synthesised straight into the cache
        (`kv_source(layer, prompt_len) -> (k, v)`, each [T, Hkv, D] on the stage's device), as if
        prefilled, then decoding from `first_token`. Skips the hours a real 1M-token prefill of
        every benchmark sequence would take; the decode step is the real one."""
        seq = Sequence(request_id, [0] * prompt_len, params, IncrementalDetokenizer(self.tokenizer))
        self.validate(seq.prompt_ids, params)
        self.executor.reserve(request_id, seq.footprint_tokens)
        for st in self.executor.stages:
            for layer in st.backend.layer_ids:
                k, v = kv_source(layer, prompt_len)
                st.backend.write_prefill(layer, request_id, k, v, 0)
        seq.phase, seq.generator = Phase.DECODE, self.sampler.generator(params.seed)
        seq.output_ids.append(first_token)
        self.seqs[request_id] = seq
        self.running.append(seq)

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
